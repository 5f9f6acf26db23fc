"""POST predict without the service's work: the `Order` is parsed and validated as the service's is, and the answer
is a fixed `Prediction` with five contributions; with FLOOR_REDIS_URL set, one Redis call (`EVAL "return 1" 0`) on the
service's hot-path connection (`RedisPipe`) first. No API file (its validation), no middleware of the service's, no
features, model or state."""

import os

from hopeit.app.api import event_api
from hopeit.app.context import EventContext

from fraud_poc.core.service_payloads import Contribution, KnownEntities, Order, Prediction
from fraud_poc.store.redis_pipe import RedisPipe

__steps__ = ["score"]
__api__ = event_api(payload=(Order, "the order"), responses={200: (Prediction, "a fixed prediction")})

PIPE = RedisPipe(os.environ["FLOOR_REDIS_URL"]) if os.environ.get("FLOOR_REDIS_URL") else None
CALL = [("EVAL", "return 1", 0)]
ENTITIES_KNOWN = KnownEntities(customer_id=True, email=True, ip_addr=True)


async def score(payload: Order, context: EventContext, **query_args: str) -> Prediction:
    if PIPE is not None:
        await PIPE.execute(CALL)
    return Prediction(
        order_id=payload.order_id,
        fraud_score=0.01,
        is_fraud=False,
        threshold=0.5,
        model_id="xgb-floor",
        feature_store_version="floor",
        known_entities=ENTITIES_KNOWN,
        cold_start=False,
        features={},
        top_contributions=[Contribution(feature=f"f{i}", contribution=0.1) for i in range(5)],
        margin=-4.6,
        bias=-3.0,
    )
