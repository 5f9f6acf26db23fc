"""The training service's model registry API and strict requests, over HTTP against a real `hopeit_server run`:
train-only runs leave live untouched, promote-model and rollback switch model and feature store together, the
gate refuses a toy holdout, clean-runs keeps the live and previous runs, and every refusal is a 4xx in the error
schema (`{"status", "error", "fields"}`)."""

import json
import time
from datetime import timedelta
from pathlib import Path
from uuid import uuid4

import pytest
import requests
from conftest import AUTH, Service, service_env
from test_end_to_end import finished, live, start, wait_for, write_orders

from fraud_poc.features.generator import generate_orders
from fraud_poc.store.carry_over import added_key, marks_key
from fraud_poc.store.datasets import data_cutoff
from fraud_poc.store.redis_store import Keys

pytestmark = pytest.mark.system  # services in subprocesses (the system tier)

API = "/api/training-pipeline/0x2"
RUN = {"num_orders": 12_000, "num_customers": 300, "months": 3, "fraud_rate": 0.03, "seed": 7}


@pytest.fixture(scope="module")
def prefix(redis_client) -> str:
    """A key prefix of this module's own: it needs a registry where nothing was live before it."""
    value = f"fraudtest:{uuid4().hex[:12]}:"
    yield value
    for key in redis_client.scan_iter(match=f"{value}*", count=1000):
        redis_client.unlink(key)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def training(prefix, data_root, tmp_path_factory):
    service = Service(
        "training", service_env(prefix, data_root), tmp_path_factory.mktemp("logs") / "training.log"
    )
    try:
        service.wait_ready()
        yield service
    finally:
        service.stop()


def post(
    service: Service, event: str, body=None, headers=AUTH, data: bytes | None = None
) -> requests.Response:
    url = f"{service.base}{API}/{event}"
    if data is not None:
        return requests.post(
            url, data=data, headers={**headers, "Content-Type": "application/json"}, timeout=60
        )
    return requests.post(url, json=body, headers=headers, timeout=60)


def refusal(response: requests.Response, status: int) -> dict:
    """The answer, checked to be `status` in the error schema (JSON, no traceback)."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    answer = response.json()
    assert set(answer) == {"status", "error", "fields"} and answer["status"] == status, answer
    assert "Traceback" not in response.text and '"tb"' not in response.text
    return answer


def models(service: Service) -> dict:
    response = requests.get(f"{service.base}{API}/list-models", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


# ---------------------------------------------------------------- strict requests


@pytest.mark.parametrize(
    "event, body, field",
    [
        ("run-pipeline", {"num_order": 1000}, "num_order"),  # a typo is not the default 1.2M orders
        ("run-pipeline", {"start_date": "not-a-date"}, "start_date"),
        ("run-pipeline", {"start_date": "2025-02-30"}, "start_date"),
        ("run-pipeline", {"num_orders": "1000"}, "num_orders"),
        ("run-pipeline", {"num_orders": 10**9}, "num_orders"),
        ("run-pipeline", {"fraud_rate": 0.9}, "fraud_rate"),
        ("run-pipeline", {"seed": -1}, "seed"),
        ("run-pipeline", {"train_only": "yes"}, "train_only"),
        ("run-pipeline", [1], "body"),
        ("run-from-raw", {"path": "user/x.csv", "is_fraud": True}, "is_fraud"),
        ("run-from-raw", {}, "path"),
        ("run-from-raw", {"path": "../outside.csv"}, "path"),
        ("promote-model", {"model_id": "../etc"}, "model_id"),
        ("promote-model", {"model": "xgb-x"}, "model"),
        ("rollback", {"to": "xgb-x"}, "to"),
        ("clean-runs", {"keep_runs": -1}, "keep_runs"),
        ("clean-runs", {"keep": 1}, "keep"),
    ],
)
def test_bad_requests_are_400s_naming_the_field(training, event, body, field):
    answer = refusal(post(training, event, body), 400)
    assert field in [f["field"] for f in answer["fields"]] and field in answer["error"], answer


@pytest.mark.parametrize("raw", [b'{"num_orders": ', b"", b"not json"])
def test_malformed_json_is_a_400_in_the_error_schema(training, raw):
    answer = refusal(post(training, "run-pipeline", data=raw), 400)
    assert answer["fields"][0]["field"] == "body", answer


def test_refused_requests_start_nothing(training):
    for body in ({"num_order": 1000}, {"start_date": "not-a-date"}):
        refusal(post(training, "run-pipeline", body), 400)
    assert requests.get(f"{training.base}{API}/list-runs", timeout=10).json() == {"runs": []}
    refusal(requests.get(f"{training.base}{API}/list-models?limit=3", timeout=10), 400)


def test_an_idle_training_service_logs_no_redeliver_pass(training):
    """The redeliver pass runs every `delivery.check_interval_seconds` (2 s); one that does nothing writes no line
    (it wrote two INFO lines, START and DONE, every pass: 20 lines in 20 s)."""
    time.sleep(0.5)
    start = len(training.log.read_text().splitlines())
    time.sleep(5)  # two passes at least
    lines = training.log.read_text().splitlines()[start:]
    assert [line for line in lines if "redeliver" in line] == [], lines


# ---------------------------------------------------------------- train only, promote, roll back


@pytest.fixture(scope="module")
def champion(training) -> dict:
    """The first run: promoted by the gate."""
    status = wait_for(training, start(training, "run-pipeline", RUN), finished)
    assert status["state"] == "done" and status["promoted"] is True, status
    return status


@pytest.fixture(scope="module")
def challenger(training, champion, redis_client, prefix) -> dict:
    """A train-only run on other orders: registered, never live."""
    before = live(redis_client, prefix)
    status = wait_for(
        training, start(training, "run-pipeline", {**RUN, "seed": 8, "train_only": True}), finished
    )
    status["live_after"], status["live_before"] = live(redis_client, prefix), before
    return status


def test_train_only_registers_the_model_and_leaves_live_untouched(training, champion, challenger, data_root):
    assert challenger["state"] == "done" and challenger["promoted"] is False, challenger
    assert challenger["promotion_reason"].startswith("train only: not promoted (the gate says: ")
    assert [s["state"] for s in challenger["steps"]] == ["done"] * 5 + ["skipped"]
    assert challenger["live_after"] == challenger["live_before"]
    assert challenger["live_after"]["model_id"] == champion["model_id"]
    assert (data_root / "models" / challenger["model_id"] / "model.ubj").is_file()
    listed = models(training)
    assert listed["live"]["model_id"] == champion["model_id"] and listed["previous"] is None
    summary = {m["model_id"]: m for m in listed["models"]}
    assert list(summary) == [challenger["model_id"], champion["model_id"]]  # newest first
    mine = summary[challenger["model_id"]]
    assert (mine["live"], mine["features_in_redis"], mine["features_on_disk"], mine["promotable"]) == (
        False,
        False,
        True,
        "yes",
    )
    assert summary[champion["model_id"]]["live"] and mine["average_precision"] > 0
    assert mine["holdout_rows"] >= 1000 and mine["holdout_fraud"] >= 20


def test_promote_and_roll_back_switch_model_and_store_together(
    training, champion, challenger, redis_client, prefix
):
    keys = Keys(prefix)
    promoted = post(training, "promote-model", {"model_id": challenger["model_id"]})
    assert promoted.status_code == 200, promoted.text
    change = promoted.json()
    assert (change["action"], change["loaded_features"]) == ("promoted", True)
    pointer = live(redis_client, prefix)
    assert (pointer["model_id"], pointer["fs_version"]) == (challenger["model_id"], challenger["run_id"])
    assert change["live"] == pointer and change["previous"]["model_id"] == champion["model_id"]
    assert change["previous"]["fs_version"] == champion["run_id"]
    for run in (champion, challenger):  # the live and the previous version are both in Redis
        assert redis_client.exists(keys.fs_meta(run["run_id"])) and redis_client.exists(
            keys.model(run["model_id"])
        )
    customer = redis_client.zrange(keys.fs_index(challenger["run_id"], "customer_id"), 0, 0)[0].decode()
    assert redis_client.exists(keys.fs_state(challenger["run_id"], "customer_id", customer))

    again = post(training, "promote-model", {"model_id": challenger["model_id"]})
    assert again.status_code == 200 and again.json()["action"] == "already live", again.text

    back = post(training, "rollback", None)
    assert back.status_code == 200, back.text
    assert back.json()["action"] == "rolled back"
    pointer = live(redis_client, prefix)
    assert (pointer["model_id"], pointer["fs_version"]) == (champion["model_id"], champion["run_id"])
    assert back.json()["previous"]["model_id"] == challenger["model_id"]
    listed = models(training)
    assert (listed["live"]["model_id"], listed["previous"]["model_id"]) == (
        champion["model_id"],
        challenger["model_id"],
    )
    assert all(m["features_in_redis"] for m in listed["models"])

    forward = post(training, "rollback", {})  # a second rollback undoes the first
    assert forward.status_code == 200 and forward.json()["live"]["model_id"] == challenger["model_id"]
    assert post(training, "rollback").status_code == 200  # and back to the champion for the next tests
    assert live(redis_client, prefix)["model_id"] == champion["model_id"]


def test_promote_model_refuses_a_log_trimmed_past_the_cut_off(
    training, champion, challenger, data_root, redis_client, prefix
):
    """30 orders scored after the challenger's data cut-off, the log trimmed to 10: promote-model refuses (409,
    with the count) and changes nothing; with accept_loss it promotes, carrying the 10 it still has."""
    keys = Keys(prefix)
    redis_client.delete(keys.events, added_key(keys), marks_key(keys))
    cut = data_cutoff(data_root, challenger["run_id"])
    logged_ms, ts = int((cut + timedelta(minutes=10)).timestamp() * 1000), int(cut.timestamp() * 1e6)
    for i in range(30):
        order = {"kind": "order", "order_id": f"late-{i}", "ts": ts + i, "customer_id": f"late-c{i}"}
        order |= {"email": f"late-{i}@example.com", "ip_addr": "198.51.100.7", "order_amount": "9.5"}
        redis_client.xadd(
            keys.events, {**order, "location_lat": "0.0", "location_long": "0.0"}, id=f"{logged_ms}-{i}"
        )
        redis_client.incr(added_key(keys))  # as the scripts count (Redis 6.2 has no entries-added)
    redis_client.xtrim(keys.events, maxlen=10, approximate=False)
    listed = models(training)
    log = listed["event_log"]
    assert (log["length"], log["trimmed"], log["oldest_event"]) == (10, 20, f"{logged_ms}-20"), log
    mine = next(m for m in listed["models"] if m["model_id"] == challenger["model_id"])
    assert (mine["data_cutoff"], mine["events_lost"]) == (cut.isoformat(), 20), mine
    assert mine["promotable"].startswith("yes, losing 20 logged event(s)"), mine
    before = live(redis_client, prefix)
    answer = refusal(post(training, "promote-model", {"model_id": challenger["model_id"]}), 409)
    assert "no longer holds up to 20 event(s)" in answer["error"] and "accept_loss" in answer["error"], answer
    assert live(redis_client, prefix) == before
    went = post(training, "promote-model", {"model_id": challenger["model_id"], "accept_loss": True})
    assert went.status_code == 200, went.text
    change = went.json()
    assert (change["action"], change["carried_orders"], change["events_lost"]["missing_events"]) == (
        "promoted",
        10,
        20,
    ), change
    assert live(redis_client, prefix)["model_id"] == challenger["model_id"]
    assert redis_client.exists(keys.fs_state(challenger["run_id"], "customer_id", "late-c29"))
    back = post(training, "rollback")  # a rollback goes on whatever the log lost, and says so
    assert back.status_code == 200 and back.json()["events_lost"]["missing_events"] == 20, back.text
    assert live(redis_client, prefix)["model_id"] == champion["model_id"]


def test_registry_refusals(training, champion, redis_client, prefix):
    before = live(redis_client, prefix)
    assert refusal(post(training, "promote-model", {"model_id": "xgb-nope"}), 404)["error"].startswith(
        "model xgb-nope is not in the registry"
    )
    assert (
        refusal(post(training, "promote-model", {"model_id": "a:b*"}), 400)["fields"][0]["field"]
        == "model_id"
    )
    refusal(post(training, "promote-model", {"model_id": champion["model_id"]}, headers={}), 401)
    refusal(post(training, "rollback", headers={"Authorization": "Bearer wrong-token-0123456789"}), 401)
    assert live(redis_client, prefix) == before


def test_gate_refuses_a_toy_holdout(training, champion, data_root, redis_client, prefix):
    """A small upload (the newcomer's 6,000-order CSV) is judged on too few orders: never promoted."""
    before = live(redis_client, prefix)
    toy = generate_orders(
        num_orders=1500, num_customers=80, months=3, start_date="2025-03-01", fraud_rate=0.03, seed=4
    )
    status = wait_for(
        training, start(training, "run-from-raw", {"path": write_orders(data_root, "toy.csv", toy)}), finished
    )
    assert status["state"] == "done" and status["promoted"] is False, status
    assert status["promotion_reason"].startswith("holdout too small to judge by: "), status
    assert live(redis_client, prefix) == before


# ---------------------------------------------------------------- retention


def test_clean_runs_keeps_live_and_previous(training, champion, challenger, data_root, redis_client, prefix):
    runs = sorted(p.name for p in (data_root / "runs").iterdir())
    assert len(runs) >= 3  # champion, challenger, the toy run
    pointer = live(redis_client, prefix)
    previous = json.loads(redis_client.get(Keys(prefix).live_previous))
    protected = {pointer["run_id"], previous["run_id"]}
    preview = post(training, "clean-runs", {"keep_runs": 0, "dry_run": True})
    assert preview.status_code == 200, preview.text
    planned = preview.json()
    assert set(planned["removed_runs"]) == set(runs) - protected and planned["removed_bytes"] > 0
    assert (
        set(planned["kept"]) == protected and sorted(p.name for p in (data_root / "runs").iterdir()) == runs
    )
    done = post(training, "clean-runs", {"keep_runs": 0}).json()
    assert done["removed_runs"] == planned["removed_runs"]
    assert sorted(p.name for p in (data_root / "runs").iterdir()) == sorted(protected)
    assert {m["model_id"] for m in models(training)["models"]} == {pointer["model_id"], previous["model_id"]}
    assert live(redis_client, prefix) == pointer
    assert (
        post(training, "rollback").status_code == 200
    )  # the previous run's model and features are all there
