"""The loop as a user meets it (issue 19), over HTTP against both services started as the README starts them:
run-pipeline on a sample that ends today, then predict and report-label on the model it made live (confirmed
fraud raises the score: monotone constraints), export-orders, run-from-raw on the live run's history together with
the export, list-models, promote-model; every label reported over HTTP is in the promoted version's training
data. A run whose periods cannot be filled is refused at request time."""

import json
from pathlib import Path
from uuid import uuid4

import pandas as pd
import pytest
import redis
import requests
from conftest import AUTH, REDIS_URL, Service
from test_end_to_end import finished, live, running, start, wait_for

from fraud_poc.core.schema import FEATURE_COLUMNS, LABEL, LABEL_DATE
from fraud_poc.model.train import monotone_constraints

pytestmark = pytest.mark.system  # services in subprocesses (the system tier)

API = "/api/training-pipeline/0x2"
SERVICE_API = "/api/fraud-service/0x2"
# no start_date: the orders end as today begins; 4 months fill warm-up, training, tuning and holdout
# 100,000 orders at 3% fraud: on 60,000 at 2% the model learnt nothing from an IP's confirmed fraud on some days
# (the sample moves with today; tried in one process over shifts of 0, 3 and 10 days: this one rose on all three)
SAMPLE = {"num_orders": 100_000, "num_customers": 1_500, "months": 4, "fraud_rate": 0.03, "seed": 3}
NOW = pd.Timestamp.now(tz="UTC").floor("s")
PAST = NOW - pd.Timedelta(days=9)  # old enough for a label to count (label_delay_days: 7)


@pytest.fixture(scope="module")
def key_prefix() -> str:
    """A prefix of this module's own: the event log (`P events`) must hold only this module's orders and labels."""
    return f"fraudtest:{uuid4().hex[:12]}:"


@pytest.fixture(scope="module")
def redis_client(key_prefix):
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    for key in client.scan_iter(match=f"{key_prefix}*", count=1000):
        client.unlink(key)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def training(key_prefix, data_root, tmp_path_factory):
    yield from running("training", key_prefix, data_root, tmp_path_factory)


@pytest.fixture(scope="module")
def prediction(key_prefix, data_root, tmp_path_factory):
    yield from running("prediction", key_prefix, data_root, tmp_path_factory)


@pytest.fixture(scope="module")
def first_run(training) -> dict:
    status = wait_for(training, start(training, "run-pipeline", SAMPLE), finished, timeout=600)
    assert status["state"] == "done" and status["promoted"] is True, status
    return status


@pytest.fixture(scope="module")
def reported() -> dict[str, tuple[bool, str]]:
    """Every label reported over HTTP in this module: order id -> (is_fraud, label_date as answered)."""
    return {}


def predict(
    prediction: Service, order_id: str, when: pd.Timestamp, customer: str, ip: str, email=None
) -> dict:
    order = {
        "order_id": order_id,
        "order_date": when.isoformat(),
        "customer_id": customer,
        "email": email or f"{customer}@example.com",
        "ip_addr": ip,
        "order_amount": 80.0,
        "location_lat": 40.4,
        "location_long": -3.7,
    }
    response = requests.post(f"{prediction.base}{SERVICE_API}/predict?features=true", json=order, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def report(
    prediction: Service, reported: dict, order_id: str, is_fraud: bool, when=None, changes: bool = True
) -> dict:
    """Report a label; it must change the order's tiles unless `changes` is False (a label the state did not know:
    a correction of a fraud whose label date is after the history's newest order)."""
    body = {"order_id": order_id, "is_fraud": is_fraud}
    if when is not None:
        body["label_date"] = when.isoformat()
    response = requests.post(
        f"{prediction.base}{SERVICE_API}/report-label", json=body, headers=AUTH, timeout=10
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["states_changed"] >= 1 or not changes, answer
    reported[order_id] = (is_fraud, answer["label_date"])
    return answer


ODD_IDS = [  # (order_id, customer_id, ip_addr, email): valid under the one rule for ids, unusual elsewhere
    (" loop-odd-1 ", "ñandú\u00a0customer", "2001:db8::42", "zero\u200bwidth@example.com"),
    ("loop-odd-" + "9" * 247, "c" * 256, "198.51.100.250", "e" * 200 + "@example.com"),
    ("loop-odd-🙂", 'quote"comma,customer', "::ffff:198.51.100.251", "line\u2028sep@example.com"),
]
ODD_ORDER = {
    "order_id": "loop-odd-x",
    "customer_id": "c",
    "email": "e@example.com",
    "ip_addr": "198.51.100.252",
}
ODD_ORDER |= {"order_amount": 80.0, "location_lat": 40.4, "location_long": -3.7}


def confirmed_contributions(scored: dict) -> list[float]:
    """Contributions of the confirmed-fraud rates at their highest value (`risk_*` = 1.0: every order that could
    have a label was reported as fraud). Under the monotone constraints a value at or above every split of its
    feature only ever goes to the higher side, so these are never negative; a count below one of its splits (1
    confirmed fraud where the trees split at 2) can show a negative contribution although more fraud never lowers
    the score."""
    return [
        c["contribution"]
        for c in scored["top_contributions"]
        if c["feature"].startswith("risk_") and c["value"] == 1.0
    ]


def test_sample_ends_today_and_short_runs_are_refused(training, first_run, data_root):
    raw = sorted((data_root / "runs" / first_run["run_id"] / "raw").glob("*.parquet"))
    latest = max(pd.read_parquet(f, columns=["order_date"])["order_date"].max() for f in raw)
    assert NOW.floor("D") - pd.Timedelta(days=1) <= latest < NOW.floor("D")
    runs = requests.get(f"{training.base}{API}/list-runs", params={"limit": "100"}, timeout=10).json()
    response = requests.post(
        f"{training.base}{API}/run-pipeline", json={"months": 2}, headers=AUTH, timeout=10
    )
    assert response.status_code == 400, response.text
    assert response.json()["fields"][0]["field"] == "months" and "take 75 days" in response.json()["error"]
    assert requests.get(f"{training.base}{API}/list-runs", params={"limit": "100"}, timeout=10).json() == runs


def test_model_is_monotone_in_confirmed_fraud(prediction, first_run):
    info = requests.get(f"{prediction.base}{SERVICE_API}/model-info", timeout=10).json()
    assert json.dumps(info["metadata"]["params"]["monotone_constraints"], sort_keys=True) == json.dumps(
        monotone_constraints(FEATURE_COLUMNS), sort_keys=True
    )


def test_reported_fraud_through_an_ip_raises_a_new_customers_score(prediction, first_run, reported):
    for k in range(5):  # five new customers' orders through each IP, nine days ago; only A's reported
        for ip, tag in (("198.51.100.10", "a"), ("198.51.100.20", "b")):
            predict(prediction, f"ip-{tag}-{k}", PAST + pd.Timedelta(minutes=k), f"ip-{tag}-cust-{k}", ip)
        report(prediction, reported, f"ip-a-{k}", True, PAST + pd.Timedelta(days=1))
    through_a = predict(prediction, "ip-a-new", NOW, "ip-new-a", "198.51.100.10")
    through_b = predict(prediction, "ip-b-new", NOW, "ip-new-b", "198.51.100.20")
    assert through_a["features"]["risk_30d_by_ip_addr"] == 1.0
    assert through_b["features"]["risk_30d_by_ip_addr"] == 0.0
    assert through_a["fraud_score"] > through_b["fraud_score"], (through_a, through_b)
    assert all(c >= 0 for c in confirmed_contributions(through_a)), through_a["top_contributions"]


def sweep(prediction: Service, reported: dict, net: str) -> list[float]:
    """Scores of a new customer's order now through six IPs (`net`.100-105), each with five new customers' orders
    of nine days ago of which 0, 1, ..., 5 were reported as fraud."""
    scores = []
    for reports in range(6):
        ip = f"{net}.{100 + reports}"
        for k in range(5):
            order_id = f"sweep-{net}-{reports}-{k}"
            predict(prediction, order_id, PAST + pd.Timedelta(minutes=k), f"{order_id}-cust", ip)
            if k < reports:
                report(prediction, reported, order_id, True, PAST + pd.Timedelta(days=1))
        scored = predict(prediction, f"sweep-{net}-{reports}-new", NOW, f"sweep-{net}-{reports}-newcomer", ip)
        assert scored["features"]["n_fraud_30d_by_ip_addr"] == reports
        assert all(c >= 0 for c in confirmed_contributions(scored)), scored
        scores.append(scored["fraud_score"])
    return scores


def test_more_reported_fraud_never_lowers_the_score(prediction, first_run, reported):
    scores = sweep(prediction, reported, "198.51.100")
    assert scores == sorted(scores) and scores[-1] > scores[0], scores


def test_reported_fraud_raises_the_customers_next_order(prediction, first_run, reported):
    for tag, ip in (("c1", "198.51.100.31"), ("c2", "198.51.100.32")):
        predict(prediction, f"{tag}-first", PAST, f"cust-{tag}", ip)
    report(prediction, reported, "c1-first", True, PAST + pd.Timedelta(days=1))
    reported_next = predict(prediction, "c1-next", NOW, "cust-c1", "198.51.100.31")
    clean_next = predict(prediction, "c2-next", NOW, "cust-c2", "198.51.100.32")
    assert reported_next["features"]["risk_30d_by_customer_id"] == 1.0
    assert reported_next["fraud_score"] > clean_next["fraud_score"], (reported_next, clean_next)
    assert all(c >= 0 for c in confirmed_contributions(reported_next)), reported_next["top_contributions"]


def history_orders(data_root: Path, run_id: str) -> pd.DataFrame:
    return pd.read_parquet(data_root / "runs" / run_id / "orders_by_customer_id").set_index("order_id")


def test_the_loop_reaches_the_promoted_version(
    training, prediction, first_run, reported, data_root, redis_client, key_prefix
):
    history = history_orders(data_root, first_run["run_id"])
    recent = history.sort_values("order_date")  # the serving state knows a value's recent orders
    # ids at the edges of the one rule (`schema.id_problem`): what predict accepts, run-from-raw trains on
    for n, (order_id, customer, ip, email) in enumerate(ODD_IDS):
        predict(prediction, order_id, NOW - pd.Timedelta(minutes=30 + n), customer, ip, email)
    url = f"{prediction.base}{SERVICE_API}/predict"
    blank = {**ODD_ORDER, "order_date": NOW.isoformat(), "customer_id": " \u3000 "}
    assert requests.post(url, json=blank, timeout=10).status_code == 400  # refused here, never exported
    reused = {
        **ODD_ORDER,
        "order_date": NOW.isoformat(),
        "order_id": ODD_IDS[0][0],
        "customer_id": "someone-else",
    }
    assert requests.post(url, json=reused, timeout=10).status_code == 409
    legit = recent[~recent[LABEL]].index[-1]  # orders of the training history, never scored by the service
    fraud = recent[recent[LABEL]].index[-1]
    report(prediction, reported, legit, True)  # a late chargeback
    report(
        prediction, reported, fraud, False, changes=False
    )  # a correction (its label may be later than the state)
    response = requests.post(f"{training.base}{API}/export-orders", headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    export = response.json()
    assert export["history_run_id"] == first_run["run_id"] and export["history_relabelled"] == 2, export
    assert export["labels_unmatched"] == 0, export
    # the export alone spans minutes: refused at once, with the numbers, before any step runs
    alone = requests.post(
        f"{training.base}{API}/run-from-raw", json={"path": export["path"]}, headers=AUTH, timeout=30
    )
    assert alone.status_code == 400 and "take 75 days" in alone.json()["error"], alone.text
    missing = {"path": export["path"], "history_run_id": "no-such-run"}
    refused = requests.post(f"{training.base}{API}/run-from-raw", json=missing, headers=AUTH, timeout=30)
    assert refused.status_code == 400 and refused.json()["fields"][0]["field"] == "history_run_id", (
        refused.text
    )
    # the run the export proposes: the history and the export together
    body = {**export["run_from_raw"], "train_only": True}
    status = wait_for(training, start(training, "run-from-raw", body), finished, timeout=600)
    assert status["state"] == "done", status
    steps = {s["step"]: s for s in status["steps"]}
    assert steps["preprocess"]["attempts"] == 1 and steps["training-data"]["attempts"] == 1
    # the progress rows add up: train-model reads what training-data wrote
    assert steps["train-model"]["rows_in"] == steps["training-data"]["rows_out"], steps
    models = requests.get(f"{training.base}{API}/list-models", timeout=10).json()
    assert status["model_id"] in [m["model_id"] for m in models["models"]], models
    promoted = requests.post(
        f"{training.base}{API}/promote-model",
        json={"model_id": status["model_id"]},
        headers=AUTH,
        timeout=120,
    )
    assert promoted.status_code == 200, promoted.text
    pointer = live(redis_client, key_prefix)
    assert (pointer["model_id"], pointer["run_id"]) == (status["model_id"], status["run_id"])
    # every label reported over HTTP, as reported, in the data the promoted model was trained from
    trained_on = history_orders(data_root, pointer["run_id"])
    assert len(trained_on) == len(history) + export["orders"] and export["orders"] == 16 + 36 + len(ODD_IDS)
    assert all(order_id in trained_on.index for order_id, *_ in ODD_IDS)
    for order_id, (is_fraud, label_date) in reported.items():
        row = trained_on.loc[order_id]
        assert bool(row[LABEL]) is is_fraud, order_id
        if is_fraud:
            assert row[LABEL_DATE] == pd.Timestamp(label_date), order_id
        else:
            assert pd.isna(row[LABEL_DATE]), order_id
    features = pd.read_parquet(
        data_root / "runs" / pointer["run_id"] / "features", columns=["order_id", LABEL]
    )
    labels = features.set_index("order_id")[LABEL]
    assert all(bool(labels[o]) is f for o, (f, _) in reported.items())


def test_a_model_whose_data_says_otherwise_still_never_lowers_it(training, prediction, first_run, reported):
    """On seed 1's sample, a model trained without the constraints scored a new customer's order through an IP
    with five reported frauds lower than through a clean one (0.092 against 0.117): there the constraints keep the
    score from falling (it stays flat: the data gives confirmed fraud no weight upwards)."""
    run = wait_for(
        training, start(training, "run-pipeline", {**SAMPLE, "seed": 1, "train_only": True}), finished
    )
    assert run["state"] == "done", run
    promoted = requests.post(
        f"{training.base}{API}/promote-model", json={"model_id": run["model_id"]}, headers=AUTH, timeout=120
    )
    assert promoted.status_code == 200, promoted.text
    scores = sweep(prediction, reported, "203.0.113")
    assert scores == sorted(scores), scores
