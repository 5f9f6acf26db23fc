"""Every event through hopeit's own test harness (`hopeit.testing.apps.execute_event`), as hopeit's example apps
test theirs: the app configs as the services load them, real Redis, a real local Dask cluster, real XGBoost.
`execute_event` does not write streams, so the six steps are chained here by hand, job to job; the chain
through the streams themselves is `test_end_to_end.py`'s."""

import asyncio
import json
import os
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import hopeit.testing.apps
import pandas as pd
import pytest
import pytest_asyncio
from conftest import API_TOKEN, REDIS_URL, ROOT
from hopeit.testing.apps import config, execute_event
from multidict import CIMultiDict

from fraud_poc.core.payloads import (
    CleanRunsRequest,
    DeliveryCheck,
    PipelineJob,
    PromoteRequest,
    RawDataRequest,
    RollbackRequest,
    RunPipelineRequest,
    StepState,
)
from fraud_poc.core.schema import FeatureSpec
from fraud_poc.core.service_payloads import BatchRequest, ErrorResponse, LabelReport, Order, Prediction
from fraud_poc.pipeline.dask_client import close_dask_client
from fraud_poc.store.carry_over import added_key, log_state
from fraud_poc.store.datasets import (
    FEATURE_SPEC_FILE,
    FeatureSpecError,
    raw_dir,
    read_dataset,
    serving_state_dir,
)
from fraud_poc.store.redis_store import Keys, async_redis
from fraud_poc.store.registry import load_metadata
from fraud_poc.store.run_status import create_run, now, update_step

# an explicit start date (the default ends the sample today): the steps' details below name its months
SMALL = {
    "num_orders": 30_000,
    "num_customers": 600,
    "months": 3,
    "fraud_rate": 0.02,
    "seed": 11,
    "start_date": "2025-01-01",
}
pytestmark = pytest.mark.asyncio(loop_scope="module")  # the module's tests share one loop and its clients
STEPS = ["sample-data", "preprocess", "feature-calc", "training-data", "train-model", "prepare-db"]


@contextmanager
def app_configs(key_prefix: str, data_root: Path, find_orders: bool):
    """Both app configs, loaded as the services load them, with this Redis prefix and data root in the environment
    (restored after): (training, service, data root)."""
    env = {
        "FRAUD_REDIS_URL": REDIS_URL,
        "FRAUD_KEY_PREFIX": key_prefix,
        "FRAUD_DATA_ROOT": str(data_root),
        "DASK_SCHEDULER_ADDRESS": "",
        "FRAUD_API_TOKEN": API_TOKEN,
        "FRAUD_FIND_ORDERS_ENABLED": "true" if find_orders else "false",
        "FRAUD_PREDICT_REQUIRES_TOKEN": "false",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield (
            config(ROOT / "config" / "training-pipeline.json"),
            config(ROOT / "config" / "fraud-service.json"),
            data_root,
        )
    finally:
        close_dask_client()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def orders_like(rows: pd.DataFrame, tag: str, dates: list[pd.Timestamp]) -> list[Order]:
    """One order per row (its customer, email, IP and amount, as it usually orders), `<tag>-<i>` on `dates[i]`."""
    return [
        Order(
            order_id=f"{tag}-{i}",
            order_date=date.to_pydatetime(),
            customer_id=str(row.customer_id),
            email=str(row.email),
            ip_addr=str(row.ip_addr),
            order_amount=float(row.order_amount),
            location_lat=float(row.location_lat),
            location_long=float(row.location_long),
        )
        for i, (row, date) in enumerate(zip(rows.itertuples(), dates, strict=True))
    ]


@pytest.fixture(scope="module")
def apps(key_prefix, tmp_path_factory):
    """Both app configs against this module's Redis prefix and data root."""
    with app_configs(
        key_prefix + "events:", tmp_path_factory.mktemp("event-data"), find_orders=True
    ) as configs:
        yield configs


@contextmanager
def token_sent():
    """Requests made by `execute_event(..., preprocess=True)` carry this session's API token (the harness sends
    no headers of its own): the events' real token check lets them through."""
    headers = CIMultiDict({"Authorization": f"Bearer {API_TOKEN}"})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hopeit.testing.apps, "CIMultiDict", lambda: headers)
        yield


async def call(app, event: str, payload=None, **query: str):
    """One event as a request with the token would run it: `__preprocess__` (body and query checks), its steps."""
    with token_sent():
        return await execute_event(app, event, payload, preprocess=True, **query)


async def run_chain(training, request: RunPipelineRequest) -> tuple[str, PipelineJob | None]:
    """run-pipeline's step, then each pipeline step on the job the one before returned."""
    job = await call(training, "run-pipeline", request)
    assert isinstance(job, PipelineJob) and job.source == "sample"
    run_id = job.run_id
    for step in STEPS:
        job = await call(training, step, job)
        if job is None:  # train-model passes nothing on when the model may not go live
            break
    return run_id, job


async def status(training, run_id: str):
    return await call(training, "pipeline-status", run_id=run_id)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def first_run(apps):
    training, _, _ = apps
    run_id, job = await run_chain(training, RunPipelineRequest(**SMALL))
    assert job is None  # prepare-db ends the chain
    return run_id


async def test_run_pipeline_needs_the_token(apps):
    training, _, _ = apps
    before = await call(training, "list-runs", limit="100")
    answer = await execute_event(training, "run-pipeline", RunPipelineRequest(**SMALL), preprocess=True)
    assert isinstance(answer, ErrorResponse) and answer.status == 401, answer
    assert await call(training, "list-runs", limit="100") == before  # no run was created


async def test_six_steps_promote_the_first_model(apps, first_run, redis_client, key_prefix):
    training, _, _ = apps
    run = await status(training, first_run)
    assert run.state.value == "done" and run.promoted is True, run
    assert [s.step for s in run.steps] == STEPS and all(s.state.value == "done" for s in run.steps), run.steps
    assert all(s.rows_out for s in run.steps[:4]), run.steps  # steps 1-4 report the rows they wrote
    details = {s.step: s.details for s in run.steps}  # what each step reported is kept and shown
    assert details["sample-data"]["files"] == [f"orders-2025-0{m}.parquet" for m in (1, 2, 3)], details
    assert details["preprocess"]["duplicates_dropped"] == 0 and details["preprocess"]["partitions"] >= 1, (
        details
    )
    assert details["feature-calc"]["feature_spec"] == FeatureSpec(window=10, label_delay_days=7).to_json(), (
        details
    )
    assert details["training-data"]["holdout_rows"] == run.steps[4].rows_out, details
    assert details["train-model"]["model_id"] == run.model_id and not details["train-model"]["reused"], (
        details
    )
    assert details["prepare-db"]["version"] == first_run and details["prepare-db"]["loaded"], details
    live = json.loads(redis_client.get(Keys(key_prefix + "events:").live))
    assert live["model_id"] == run.model_id
    listed = await call(training, "list-runs", limit="5")
    assert [r for r in listed.runs if r.run_id == first_run] == [run]  # with the same details


async def test_gate_keeps_a_worse_model_out(apps, first_run, redis_client, key_prefix):
    training, _, _ = apps
    settings = training.effective_settings["train-model"]["extras"]["train_model"]
    saved = settings["min_average_precision"]
    settings["min_average_precision"] = 1.01  # no model can pass
    try:
        run_id, job = await run_chain(training, RunPipelineRequest(**{**SMALL, "seed": 12}))
    finally:
        settings["min_average_precision"] = saved
    assert job is None
    run = await status(training, run_id)
    assert run.state.value == "done" and run.promoted is False, run
    assert "average precision" in run.promotion_reason
    assert run.steps[-1].state.value == "skipped" and run.steps[-1].attempts == 0  # prepare-db never ran
    live = json.loads(redis_client.get(Keys(key_prefix + "events:").live))
    assert live["model_id"] != run.model_id
    models = await call(training, "list-models")
    assert run.model_id in [m.model_id for m in models.models]  # registered, not live


async def test_prediction_events(apps, first_run):
    training, service, data_root = apps
    orders = read_dataset(raw_dir(data_root, first_run)).compute()
    known = orders.sort_values("order_date").iloc[-1]
    order = Order(
        order_id="event-test-1",
        # just after the history's newest order: a retry of an order that is not its values' newest is scored from a
        # state that has kept only the last W records, which may no longer hold its oldest predecessor (README)
        order_date=(known.order_date + pd.Timedelta(milliseconds=1)).to_pydatetime(),
        customer_id=str(known.customer_id),
        email=str(known.email),
        ip_addr=str(known.ip_addr),
        order_amount=float(known.order_amount),
        location_lat=float(known.location_lat),
        location_long=float(known.location_long),
    )
    info = await call(service, "model-info")
    run = await status(training, first_run)
    assert info.model_id == run.model_id
    prediction = await call(service, "predict", order)
    assert isinstance(prediction, Prediction), prediction
    assert prediction.known_entities.customer_id and 0 <= prediction.fraud_score <= 1
    batch = await call(service, "predict-batch", BatchRequest(orders=[order]))
    assert batch.predictions[0].fraud_score == prediction.fraud_score  # a retry: scored the same
    recorded = await call(service, "report-label", LabelReport(order_id="event-test-1", is_fraud=True))
    assert recorded.states_changed == 3, recorded
    unknown = await call(service, "report-label", LabelReport(order_id="no-such-order", is_fraud=True))
    assert isinstance(unknown, ErrorResponse) and unknown.status == 404, unknown
    found = await call(service, "find-orders", prefix=str(known.customer_id))
    assert str(known.customer_id) in str(found), found


async def test_registry_events(apps, first_run):
    training, _, _ = apps
    first = (await status(training, first_run)).model_id
    models = await call(training, "list-models")
    assert models.live.model_id == first
    challenger = next(
        m.model_id for m in models.models if not m.live and m.features_on_disk
    )  # the gate's loser
    same = await call(training, "promote-model", PromoteRequest(model_id=first))
    assert same.action == "already live", same
    unknown = await call(training, "promote-model", PromoteRequest(model_id="no-such-model"))
    assert isinstance(unknown, ErrorResponse) and unknown.status == 404, unknown
    promoted = await call(training, "promote-model", PromoteRequest(model_id=challenger))
    assert promoted.action == "promoted" and promoted.live.model_id == challenger, promoted
    assert promoted.previous.model_id == first and promoted.loaded_features, promoted
    back = await call(training, "rollback", RollbackRequest())
    assert back.action == "rolled back" and back.live.model_id == first, back
    dry = await call(training, "clean-runs", CleanRunsRequest(keep_runs=0, dry_run=True))
    assert not isinstance(dry, ErrorResponse), dry
    assert (await call(training, "list-models")).live.model_id == first  # a dry run removes nothing


@contextmanager
def feature_store_settings(training, **values):
    """Every training event's feature_store settings with `values` (as if the configuration changed), restored
    after."""
    saved = {}
    for event, settings in training.effective_settings.items():
        store = (settings.get("extras") or {}).get("feature_store")
        if store is not None:
            saved[event] = deepcopy(store)
            store.update(values)
    try:
        yield
    finally:
        for event, store in saved.items():
            training.effective_settings[event]["extras"]["feature_store"].clear()
            training.effective_settings[event]["extras"]["feature_store"].update(store)


async def test_later_steps_use_the_runs_feature_spec_whatever_the_settings_say_now(
    apps, first_run, redis_client, key_prefix
):
    """Feature-calc ran with W = 11 (δ = 7); then the settings say W = 12, δ = 4. Train-model trains with the run's
    spec (its metadata's feature_spec is the run's), list-models calls the model promotable, promote-model loads the
    run's states as a version of that spec, and rollback goes back to the first model with its own spec."""
    training, _, data_root = apps
    keys = Keys(key_prefix + "events:")
    first = (await status(training, first_run)).model_id
    with feature_store_settings(training, window=11):
        job = await call(
            training, "run-pipeline", RunPipelineRequest(**{**SMALL, "seed": 13, "train_only": True})
        )
        for step in STEPS[:3]:
            job = await call(training, step, job)
    spec = FeatureSpec(window=11, label_delay_days=7)
    run_id = job.run_id
    with feature_store_settings(training, window=12, label_delay_days=4):
        job = await call(training, "training-data", job)
        assert await call(training, "train-model", job) is None  # train_only: registered, not promoted
        run = await status(training, run_id)
        assert run.state.value == "done" and run.model_id is not None, run
        assert run.steps[2].details["feature_spec"] == spec.to_json(), run.steps[2]
        metadata = load_metadata(data_root, run.model_id)
        assert (
            metadata["feature_spec"] == spec.to_json()
            and metadata["feature_set_fingerprint"] == spec.fingerprint
        )
        assert (metadata["window"], metadata["label_delay_days"]) == (11, 7)
        listed = {m.model_id: m for m in (await call(training, "list-models")).models}
        assert listed[run.model_id].promotable == "yes", listed[run.model_id]
        assert listed[first].promotable == "no: live already", listed[first]
        try:
            promoted = await call(training, "promote-model", PromoteRequest(model_id=run.model_id))
            assert promoted.action == "promoted" and promoted.loaded_features, promoted
            version = json.loads(redis_client.get(keys.fs_meta(run_id)))
            assert version["feature_spec"] == spec.to_json() and version["window"] == 11, version
        finally:
            back = await call(training, "rollback", RollbackRequest())
        assert back.action == "rolled back" and back.live.model_id == first, back
    live = json.loads(redis_client.get(keys.live))
    assert live["model_id"] == first
    first_spec = json.loads(redis_client.get(keys.fs_meta(live["fs_version"])))["feature_spec"]
    assert first_spec == FeatureSpec(window=10, label_delay_days=7).to_json()


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
async def test_a_run_without_a_usable_feature_spec_fails_at_once(apps, damage):
    """A run whose feature_spec.json is gone or unreadable after feature-calc: train-model fails at its first
    attempt with FeatureSpecError naming the run (a permanent error: no redelivery can mend it), and says why in
    the step's status."""
    training, _, data_root = apps
    seed = {"missing": 14, "corrupt": 15}[damage]
    job = await call(
        training,
        "run-pipeline",
        RunPipelineRequest(**{**SMALL, "num_orders": 10_000, "seed": seed, "train_only": True}),
    )
    for step in STEPS[:4]:
        job = await call(training, step, job)
    path = serving_state_dir(data_root, job.run_id) / FEATURE_SPEC_FILE
    if damage == "missing":
        path.unlink()
        message = f"run {job.run_id} has no feature spec .*: its feature-calc did not finish"
    else:
        path.write_text('{"window": 10, "label_delay_days":')
        message = f"run {job.run_id}: its feature spec .* is unusable"
    with pytest.raises(FeatureSpecError, match=message):
        await call(training, "train-model", job)
    run = await status(training, job.run_id)
    step = run.steps[4]
    assert (run.state.value, step.state.value, step.attempts) == ("failed", "failed", 1), run
    assert step.error.startswith(f"run {job.run_id}"), step
    assert "feature spec" in step.error and run.model_id is None, run


async def test_run_from_raw_refuses_a_path_outside_the_data_root(apps):
    training, _, _ = apps
    answer = await call(training, "run-from-raw", RawDataRequest(path="../outside.csv"))
    assert isinstance(answer, ErrorResponse) and answer.status == 400 and "outside" in answer.error, answer


async def test_redeliver_drops_finished_or_unknown_runs_and_delivers_failed_attempts_again(
    apps, first_run, redis_client, key_prefix
):
    """The redeliver SERVICE's step on a stream of this test's own: what it does with each pending message."""
    training, _, _ = apps
    delivery = training.effective_settings["redeliver"]["extras"]["delivery"]
    stream = f"{key_prefix}events:sample-data-stream"
    saved = delivery["streams"], delivery["retry_after_seconds"]
    delivery["streams"], delivery["retry_after_seconds"] = {stream: "sample-data"}, 0.0
    redis, keys = async_redis(REDIS_URL), Keys(key_prefix + "events:")
    await create_run(redis, keys, "retry-me", "sample")  # a run whose first attempt at sample-data failed
    redis_client.xgroup_create(stream, "steps", id="0", mkstream=True)
    ids = {run: redis_client.xadd(stream, {"id": run}) for run in ("no-such-run", first_run, "retry-me")}
    redis_client.xreadgroup("steps", "a-consumer", {stream: ">"})  # read, never acknowledged: all pending
    await asyncio.sleep(0.05)  # the attempt ends after its message was read (Redis counts idle time in ms)
    await update_step(
        redis, keys, "retry-me", "sample-data", state=StepState.RETRYING, attempts=1, ended=now()
    )
    try:
        check = await call(training, "redeliver", DeliveryCheck())
    finally:
        delivery["streams"], delivery["retry_after_seconds"] = saved
    assert check.counts == {"dropped": 2, "redelivered": 1}, check.counts
    assert redis_client.xpending(stream, "steps")["pending"] == 0  # each one acknowledged
    copies = redis_client.xrange(stream, min=f"({ids['retry-me'].decode()}")
    assert [fields[b"id"] for _, fields in copies] == [b"retry-me"]  # the failed attempt's job, once more


async def test_export_orders_keeps_the_newest_exports(apps, first_run):
    """export-orders removes the exports beyond `retention.keep_exports`, oldest first, and never a folder it did
    not name."""
    training, _, data_root = apps
    retention = training.effective_settings["export-orders"]["extras"]["retention"]
    saved = retention["keep_exports"]
    retention["keep_exports"] = 2
    (data_root / "exports" / "mine").mkdir(parents=True, exist_ok=True)
    try:
        answers = [await call(training, "export-orders") for _ in range(3)]
    finally:
        retention["keep_exports"] = saved
    assert [a.removed_exports for a in answers] == [0, 0, 1], answers
    left = sorted(p.name for p in (data_root / "exports").iterdir())
    assert left == sorted(["mine", *(a.path.split("/")[-1] for a in answers[1:])]), left


async def test_a_run_whose_promotion_would_lose_logged_events_stays_registered(
    apps, first_run, redis_client, key_prefix
):
    """Last in the module (it empties the event log): the log trimmed past a run's data cut-off, the run's
    automatic promotion is refused; the model is registered, not live, and pipeline-status says how many events
    are missing."""
    training, _, _ = apps
    keys = Keys(key_prefix + "events:")
    for i in range(3):  # some events, then every one trimmed (by length, as the service's bound does)
        redis_client.xadd(keys.events, {"kind": "order", "order_id": f"gone-{i}"})
        redis_client.incr(added_key(keys))  # as the scripts count (Redis 6.2 has no entries-added)
    redis_client.xtrim(keys.events, maxlen=0, approximate=False)
    trimmed = log_state(redis_client, keys).trimmed
    before = redis_client.get(keys.live)
    run_id, job = await run_chain(
        training, RunPipelineRequest(**SMALL)
    )  # the first run's data: passes the gate
    assert job is None
    run = await status(training, run_id)
    assert run.state.value == "done" and run.promoted is False, run
    assert f"no longer holds up to {trimmed} event(s)" in run.promotion_reason, run.promotion_reason
    assert "accept_loss" in run.promotion_reason
    prepare = run.steps[-1]
    assert prepare.state.value == "done" and prepare.details["events_lost"]["missing_events"] == trimmed
    assert redis_client.get(keys.live) == before
    models = await call(training, "list-models")
    assert run.model_id in [m.model_id for m in models.models]  # registered, not live


async def test_model_health_names_recall_when_reported_fraud_was_missed(apps, first_run):
    """Orders scored through predict-batch over the last 20 days, 30 of the matured ones the model let through
    reported as fraud: model-health says degraded, recall first among the reasons, with the figures, the drift
    against the holdout's bins and the plot in the model's report folder; refusals as documented."""
    training, service, data_root = apps
    now = pd.Timestamp.now(tz="UTC").floor("s")
    history = read_dataset(raw_dir(data_root, first_run)).compute()
    known = history[~history["is_fraud"]].drop_duplicates("customer_id").head(120)
    # 20 days, an order every 4 hours, each of a known customer as it usually orders
    orders = orders_like(known, "health", [now - pd.Timedelta(hours=4 * i + 1) for i in range(len(known))])
    answer = await call(service, "predict-batch", BatchRequest(orders=orders))
    model_id = answer.predictions[0].model_id
    missed = [
        p.order_id
        for p, o in zip(answer.predictions, orders, strict=True)
        if not p.is_fraud and o.order_date < (now - pd.Timedelta(days=8)).to_pydatetime()
    ][:30]
    assert len(missed) >= 25, missed
    for order_id in missed:
        recorded = await call(service, "report-label", LabelReport(order_id=order_id, is_fraud=True))
        assert recorded.order_id == order_id, recorded
    await asyncio.sleep(0.5)  # the score log is written in the background (every 0.2 s)

    report = await call(training, "model-health", model_id=model_id)
    assert report.model_id == model_id and report.verdict == "degraded", report
    assert report.reasons[0].startswith("recall 0.000 on "), report.reasons
    live = report.quality[model_id].live
    assert live.confirmed_fraud >= len(missed) and live.true_alerts == 0 and live.orders >= 120, live
    assert report.quality[model_id].holdout.recall == load_metadata(data_root, model_id)["metrics"]["recall"]
    assert report.drift.available and report.drift.orders >= 42 and report.drift.features, report.drift
    assert report.plot == str(data_root / "models" / model_id / "report" / "health.png")
    assert (data_root / "models" / model_id / "report" / "health.png").read_bytes().startswith(b"\x89PNG")
    assert report.computed["scores_read"] >= 120

    refused = await execute_event(training, "model-health", None, preprocess=True)
    assert isinstance(refused, ErrorResponse) and refused.status == 401, refused
    bad = await call(training, "model-health", window_days="0")
    assert isinstance(bad, ErrorResponse) and bad.status == 400 and bad.fields[0].field == "window_days", bad
    unknown = await call(training, "model-health", model_id="xgb-nope")
    assert isinstance(unknown, ErrorResponse) and unknown.status == 404, unknown
    other = await call(training, "model-health", days="3")
    assert isinstance(other, ErrorResponse) and other.status == 400, other
