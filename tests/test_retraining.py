"""Retraining on its own (issue 23 part 4), through hopeit's test harness as `test_events.py` runs the events: a live
model meets fraud it misses, the labels are reported and mature; with `health.retrain_on_degraded` on, the
health-watch pass asks for a run with its reason, the run starts once (a second pass or step starts nothing), trains
on the reported labels, and the gate decides. Its own app configs and Redis prefix, so that no other test's orders
are in its logs."""

import asyncio
from copy import deepcopy
from datetime import UTC, datetime

import pandas as pd
import pytest
import pytest_asyncio
from hopeit.testing.apps import create_test_context, execute_event
from test_events import SMALL, STEPS, app_configs, call, orders_like, run_chain, status

from fraud_poc.datasets import history_dir, raw_dir, read_dataset
from fraud_poc.payloads import PipelineJob, RunPipelineRequest
from fraud_poc.service_payloads import BatchRequest, LabelReport
from fraud_poc.training.health_watch import RetrainRequest, watch_pass

pytestmark = pytest.mark.asyncio(loop_scope="module")
NOW = datetime(2025, 4, 25, tzinfo=UTC)  # the replay's "now": 25 days after the history (SMALL) ends


@pytest.fixture(scope="module")
def apps(key_prefix, tmp_path_factory):
    """Both app configs against this module's Redis prefix and data root."""
    data_root = tmp_path_factory.mktemp("retrain-data")
    with app_configs(key_prefix + "retrain:", data_root, find_orders=False) as (training, service, _):
        yield training, service, str(data_root)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def first_run(apps):
    training, _, _ = apps
    run_id, job = await run_chain(training, RunPipelineRequest(**SMALL))
    assert job is None
    return run_id


def retraining_on(training):
    """A copy of the training app's config with `health.retrain_on_degraded` on."""
    on = deepcopy(training)
    on.effective_settings["health-watch"]["extras"]["health"]["retrain_on_degraded"] = True
    return on


async def test_retraining_starts_once_with_its_reason_trains_on_the_labels_and_the_gate_decides(
    apps, first_run
):
    training, service, data_root = apps
    history = read_dataset(raw_dir(data_root, first_run)).compute()
    known = history[~history["is_fraud"]].drop_duplicates("customer_id")
    known = known.sample(n=400, replace=True, random_state=1).reset_index(drop=True)
    start = pd.Timestamp("2025-04-01", tz="UTC")
    orders = orders_like(known, "replay", [start + pd.Timedelta(minutes=85 * i) for i in range(len(known))])
    predictions = []
    for at in range(0, len(orders), 200):
        answer = await call(service, "predict-batch", BatchRequest(orders=orders[at : at + 200]))
        predictions += answer.predictions
    live_model = predictions[0].model_id
    matured = pd.Timestamp("2025-04-17", tz="UTC").to_pydatetime()  # older than δ = 7 days at NOW
    missed = [
        p.order_id
        for p, o in zip(predictions, orders, strict=True)
        if not p.is_fraud and o.order_date < matured
    ]
    missed = missed[::8][:40]  # a new pattern the model lets through: reported as chargebacks
    assert len(missed) >= 25, len(missed)
    for order_id in missed:
        await call(service, "report-label", LabelReport(order_id=order_id, is_fraud=True, label_date=NOW))
    await asyncio.sleep(0.5)  # the score log is written in the background, every 0.2 s

    # retraining off (the default): nothing starts, however the model does
    assert await watch_pass(create_test_context(training, "health-watch"), now=NOW) is None
    on = retraining_on(training)
    context = create_test_context(on, "health-watch")
    request = await watch_pass(context, now=NOW)
    assert isinstance(request, RetrainRequest) and request.model_id == live_model, request
    assert request.reason.startswith("degraded: recall 0."), request.reason

    job = await execute_event(on, "health-watch", request)
    assert isinstance(job, PipelineJob) and job.source == "raw" and job.history_path, job
    run = await status(training, job.run_id)
    assert run.started_by == request.reason and run.state.value == "queued", run
    listed = await call(training, "list-runs", limit="5")
    assert listed.runs[0].run_id == job.run_id and listed.runs[0].started_by == request.reason
    # at most one at a time: while it has not finished, neither a pass nor the step starts another
    assert await watch_pass(context, now=NOW) is None
    assert await execute_event(on, "health-watch", request) is None
    assert (await call(training, "list-runs", limit="5")).runs[0].run_id == job.run_id

    # the run: the history and the export, every reported label in its orders; the gate decides
    for step in STEPS[1:]:
        job = await call(training, step, job)
        if job is None:
            break
    run = await status(training, run.run_id)
    assert run.state.value == "done" and run.promotion_reason, run
    steps = {s.step: s for s in run.steps}
    assert steps["train-model"].details["gate"] == run.promotion_reason or run.promoted is not None
    trained = pd.read_parquet(history_dir(data_root, run.run_id), columns=["order_id", "is_fraud"])
    replayed = trained[trained["order_id"].str.startswith("replay-")]
    assert len(replayed) == len(orders)
    assert set(replayed.loc[replayed["is_fraud"], "order_id"]) == set(missed)
