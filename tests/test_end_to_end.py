"""End to end: both services started with `hopeit_server run --start-streams`; pipeline runs driven over HTTP
through the real Redis streams, checked through pipeline-status, the model registry and the live feature store;
then predictions over HTTP from the model and features the pipeline made live."""

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
from conftest import AUTH, Service, service_env

from fraud_poc.features.definitions import compute_features, hours_of, timestamp_us
from fraud_poc.features.generator import generate_orders
from fraud_poc.features.serving_state import decode_state, decode_tile
from fraud_poc.store.datasets import read_orders_file
from fraud_poc.store.redis_store import Keys

pytestmark = pytest.mark.system  # services in subprocesses (the system tier)

API = "/api/training-pipeline/0x2"
SERVICE_API = "/api/fraud-service/0x2"
SMALL = {"num_orders": 30_000, "num_customers": 600, "months": 3, "fraud_rate": 0.02, "seed": 7}


def running(name: str, key_prefix: str, data_root: Path, tmp_path_factory):
    """One of the two services, ready, for the length of a fixture; stopped after."""
    service = Service(
        name, service_env(key_prefix, data_root), tmp_path_factory.mktemp("logs") / f"{name}.log"
    )
    try:
        service.wait_ready()
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def training(key_prefix, data_root, tmp_path_factory):
    yield from running("training", key_prefix, data_root, tmp_path_factory)


def start(service: Service, event: str, body: dict) -> str:
    response = requests.post(f"{service.base}{API}/{event}", json=body, headers=AUTH, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["run_id"]


def wait_for(service: Service, run_id: str, until, timeout: float = 240.0, seen: set | None = None) -> dict:
    """Poll pipeline-status until `until(status)` holds; `seen` collects the (step, state) pairs observed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = requests.get(f"{service.base}{API}/pipeline-status", params={"run_id": run_id}, timeout=10)
        assert response.status_code == 200, response.text
        status = response.json()
        if seen is not None:
            seen.update((step["step"], step["state"]) for step in status["steps"])
        if until(status):
            return status
        if finished(status):
            raise AssertionError(
                f"run {run_id} ended without getting there: {json.dumps(status['steps'], indent=1)}"
            )
        time.sleep(0.5)
    raise TimeoutError(f"run {run_id} did not get there: {status}")


def finished(status: dict) -> bool:
    return status["state"] in ("done", "failed")


def live(redis_client, key_prefix) -> dict | None:
    raw = redis_client.get(Keys(key_prefix).live)
    return None if raw is None else json.loads(raw)


def write_orders(data_root: Path, name: str, frame) -> str:
    path = data_root / "user" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return f"user/{name}"


@pytest.fixture(scope="module")
def prediction(key_prefix, data_root, tmp_path_factory):
    yield from running("prediction", key_prefix, data_root, tmp_path_factory)


@pytest.fixture(scope="module")
def first_run(training, redis_client, key_prefix) -> dict:
    run_id = start(training, "run-pipeline", SMALL)
    seen: set = set()
    status = wait_for(training, run_id, finished, seen=seen)
    status["seen_while_running"] = seen
    return status


def test_pipeline_run_promotes_model_and_features(first_run, redis_client, key_prefix, data_root):
    status = first_run
    assert status["state"] == "done", status
    steps = {s["step"]: s for s in status["steps"]}
    assert [s["state"] for s in status["steps"]] == ["done"] * 6
    assert steps["sample-data"]["rows_out"] == SMALL["num_orders"]
    assert steps["preprocess"]["rows_in"] == SMALL["num_orders"] == steps["feature-calc"]["rows_out"]
    assert all(
        s["started"] and s["ended"] and s["attempts"] == 1 and s["error"] is None for s in steps.values()
    )
    assert status["promoted"] is True and status["model_id"]
    assert status["metrics"]["average_precision"] >= 0.3
    # pipeline-status answered while steps ran (the work runs on Dask, off the service's event loop)
    assert ("train-model", "running") in status["seen_while_running"]
    model_dir = data_root / "models" / status["model_id"]
    metadata = json.loads((model_dir / "metadata.json").read_text())
    assert metadata["run_id"] == status["run_id"] and (model_dir / "model.ubj").stat().st_size > 0
    assert len(list((model_dir / "report").glob("*.png"))) >= 3
    pointer = live(redis_client, key_prefix)
    assert (pointer["model_id"], pointer["fs_version"]) == (status["model_id"], status["run_id"])
    keys = Keys(key_prefix)
    customer = redis_client.zrange(keys.fs_index(pointer["fs_version"], "customer_id"), 0, 0)[0].decode()
    assert redis_client.exists(keys.fs_state(pointer["fs_version"], "customer_id", customer))
    assert redis_client.exists(keys.model(status["model_id"]))


def test_model_failing_gate_leaves_live_untouched(training, first_run, redis_client, key_prefix, data_root):
    before = live(redis_client, key_prefix)
    orders = generate_orders(
        num_orders=8000, num_customers=300, months=3, start_date="2025-03-01", fraud_rate=0.02, seed=3
    )
    orders["is_fraud"] = (
        orders["is_fraud"].sample(frac=1.0, random_state=0).to_numpy()
    )  # labels without signal
    run_id = start(training, "run-from-raw", {"path": write_orders(data_root, "noise.csv", orders)})
    status = wait_for(training, run_id, finished)
    assert status["state"] == "done" and status["promoted"] is False, status
    assert status["steps"][0]["state"] == "skipped" and status["steps"][-1]["state"] == "skipped"
    assert "average precision" in status["promotion_reason"]
    assert live(redis_client, key_prefix) == before


def negative_amount(orders: pd.DataFrame) -> pd.DataFrame:
    orders.loc[3, "order_amount"] = -5.0
    return orders


def year_2500(orders: pd.DataFrame) -> pd.DataFrame:
    orders["order_date"] = orders["order_date"].astype(str)
    orders.loc[3, "order_date"] = "2500-01-01T00:00:00+00:00"
    return orders


@pytest.mark.parametrize(
    "name, spoil, column",
    [
        ("negative.csv", negative_amount, "order_amount"),
        ("year-2500.csv", year_2500, "order_date"),  # a missing column is refused at request time (400)
    ],
)
def test_bad_raw_file_fails_run_and_dead_letters(
    training, first_run, redis_client, key_prefix, data_root, name, spoil, column
):
    before = live(redis_client, key_prefix)
    orders = generate_orders(
        num_orders=500, num_customers=50, months=3, start_date="2025-03-01", fraud_rate=0.02, seed=5
    )
    run_id = start(training, "run-from-raw", {"path": write_orders(data_root, name, spoil(orders))})
    status = wait_for(training, run_id, finished, timeout=120)
    assert status["state"] == "failed", status
    preprocess = status["steps"][1]
    # bad input can never succeed: the run fails at the first attempt with its message, no retry
    assert preprocess["state"] == "failed" and preprocess["attempts"] == 1
    assert name in preprocess["error"] and column in preprocess["error"]
    assert [s["state"] for s in status["steps"][2:]] == ["pending"] * 4
    deadline = time.monotonic() + 30
    while True:  # the redeliver service moves its message to the dead-letter stream, with the reason
        dead = redis_client.xrange("training-pipeline.0.2.dead-letter", "-", "+")
        reasons = {fields[b"id"]: fields[b"reason"].decode() for _, fields in dead}
        if run_id.encode() in reasons or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert reasons[run_id.encode()] == f"preprocess failed: {preprocess['error']}"
    assert live(redis_client, key_prefix) == before


@pytest.mark.parametrize("path", ["../outside.csv", "/etc/passwd", "user/../../x.csv"])
def test_run_from_raw_rejects_paths_outside_data_root(training, path):
    response = requests.post(
        f"{training.base}{API}/run-from-raw", json={"path": path}, headers=AUTH, timeout=10
    )
    assert response.status_code == 400 and "data root" in response.text


def test_unknown_run_is_404(training):
    response = requests.get(f"{training.base}{API}/pipeline-status", params={"run_id": "nope"}, timeout=10)
    assert response.status_code == 404 and "nope" in response.text


def raw_orders(data_root: Path, run_id: str) -> pd.DataFrame:
    files = sorted((data_root / "runs" / run_id / "raw").glob("*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def next_order(last: pd.Series, order_id: str, minutes: int, amount: float) -> dict:
    return {
        "order_id": order_id,
        "order_date": (last["order_date"] + pd.Timedelta(minutes=minutes)).isoformat(),
        "customer_id": last["customer_id"],
        "email": last["email"],
        "ip_addr": last["ip_addr"],
        "order_amount": amount,
        "location_lat": 40.4,
        "location_long": -3.7,
    }


def test_prediction_uses_promoted_model_and_pipeline_state(prediction, first_run, data_root):
    orders = raw_orders(data_root, first_run["run_id"]).sort_values(["order_date", "order_id"])
    last = orders.iloc[-1]
    new = next_order(last, "e2e-next-1", minutes=30, amount=987.65)
    response = requests.post(f"{prediction.base}{SERVICE_API}/predict?features=true", json=new, timeout=10)
    assert response.status_code == 200, response.text
    scored = response.json()
    assert (scored["model_id"], scored["feature_store_version"]) == (
        first_run["model_id"],
        first_run["run_id"],
    )
    assert scored["cold_start"] is False and 0.0 <= scored["fraud_score"] <= 1.0
    appended = pd.DataFrame([{**new, "order_date": pd.Timestamp(new["order_date"])}])
    expected = compute_features(pd.concat([orders, appended], ignore_index=True)).set_index("order_id")
    got = pd.Series(scored["features"])
    np.testing.assert_allclose(
        got[expected.columns].to_numpy(), expected.loc["e2e-next-1"].to_numpy(), atol=1e-9
    )
    info = requests.get(f"{prediction.base}{SERVICE_API}/model-info", timeout=10).json()
    assert json.dumps(first_run["model_id"]) in json.dumps(info)


def test_new_promotion_switches_prediction_service_without_restart(
    training, prediction, first_run, data_root, redis_client, key_prefix
):
    run_id = start(training, "run-pipeline", SMALL)  # same data: the same model, not worse than the champion
    # while the run works: a new customer's order is scored and reported as fraud (after the run's cut-off)
    newcomer = {
        **next_order(raw_orders(data_root, first_run["run_id"]).iloc[-1], "e2e-carried", 60, 55.0),
        "customer_id": "e2e-carried-customer",
        "email": "carried@example.com",
        "ip_addr": "203.0.113.200",
    }
    response = requests.post(f"{prediction.base}{SERVICE_API}/predict", json=newcomer, timeout=10)
    assert response.status_code == 200 and response.json()["cold_start"] is True, response.text
    # dated now, or just after the order when the run's data ends less than an hour ago (a run just after midnight)
    label_date = max(
        pd.Timestamp.now(tz="UTC"), pd.Timestamp(newcomer["order_date"]) + pd.Timedelta(seconds=1)
    )
    label = {"order_id": "e2e-carried", "is_fraud": True, "label_date": label_date.isoformat()}
    response = requests.post(
        f"{prediction.base}{SERVICE_API}/report-label", json=label, headers=AUTH, timeout=10
    )
    assert response.status_code == 200 and response.json()["states_changed"] == 3, response.text
    label_ts = pd.Timestamp(response.json()["label_date"]).value // 1000
    status = wait_for(training, run_id, finished)
    assert status["state"] == "done" and status["promoted"] is True, status
    # carried over into the new version: the order in each of its states, its label counted in its hour's tile
    keys = Keys(key_prefix)
    hour = hours_of(timestamp_us(newcomer["order_date"]))
    for entity in ("customer_id", "email", "ip_addr"):
        raw = redis_client.get(keys.fs_state(run_id, entity, newcomer[entity]))
        assert raw is not None, entity
        assert [r[0] for r in decode_state(raw)] == ["e2e-carried"], entity
        tiles = [
            decode_tile(member)
            for member in redis_client.zrange(keys.fs_tiles(run_id, entity, newcomer[entity]), 0, -1)
        ]
        # TILE_FIELDS: hour, n_orders, cents, n_fraud, then running sums
        assert [t[:4] for t in tiles] == [(hour, 1, 5500, 1)], (entity, tiles)
    # and exported, with its label, as raw orders that run-from-raw reads
    response = requests.post(f"{training.base}{API}/export-orders", headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    exported = read_orders_file(data_root / response.json()["path"] / "orders.parquet", require_label=True)
    carried = exported.set_index("order_id").loc["e2e-carried"]
    assert carried["is_fraud"] and carried["label_date"] == pd.Timestamp(label_ts, unit="us", tz="UTC")
    orders = raw_orders(data_root, run_id).sort_values(["order_date", "order_id"])
    new = next_order(orders.iloc[-1], "e2e-next-2", minutes=45, amount=12.5)
    response = requests.post(f"{prediction.base}{SERVICE_API}/predict", json=new, timeout=10)
    assert response.status_code == 200, response.text
    assert (response.json()["model_id"], response.json()["feature_store_version"]) == (
        status["model_id"],
        run_id,
    )
