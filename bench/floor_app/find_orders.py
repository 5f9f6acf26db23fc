"""GET find-orders: 100 fixed customer / email / IP combinations, the orders `bench_service.py` sends."""

from datetime import UTC, datetime

from hopeit.app.api import event_api
from hopeit.app.context import EventContext

from fraud_poc.core.service_payloads import FoundOrders, KnownOrder

__steps__ = ["find"]
__api__ = event_api(responses={200: (FoundOrders, "the combinations")})


async def find(payload: None, context: EventContext, **query_args: str) -> FoundOrders:
    return FoundOrders(
        items=[
            KnownOrder(
                customer_id=f"floor-c-{i}",
                email=f"floor-{i}@example.com",
                ip_addr=f"10.0.0.{i}",
                matched="customer_id",
                last_order_id=f"floor-o-{i}",
                last_order_date=datetime.now(UTC),
                last_order_amount=10.0,
            )
            for i in range(100)
        ]
    )
