"""`/metrics` on both services (issue 23): Prometheus' own parser reads it, and its counters move by what the
services answered: predictions, a bad order, a refused token, an unknown path, and a pipeline step's attempts."""

import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
import redis
import requests
from conftest import AUTH, REDIS_URL, ROOT, free_port, service_env
from live_services import (
    SERVICE_API,
    TRAINING_API,
    LiveServices,
    ServiceOnPort,
    live_services,
    make_model_live,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from fraud_poc.core.payloads import PIPELINE_STEPS
from fraud_poc.features.generator import generate_orders
from fraud_poc.launcher import SERVICES, own_control_socket
from fraud_poc.store.redis_store import Keys

RUN = {
    "num_orders": 6_000,
    "num_customers": 200,
    "months": 3,
    "fraud_rate": 0.03,
    "seed": 5,
    "train_only": True,
}
Samples = dict[tuple[str, tuple], float]


@pytest.fixture(scope="module")
def live(key_prefix, tmp_path_factory):
    yield from live_services(f"{key_prefix}metrics:", tmp_path_factory.mktemp("metrics"))


def scrape(base: str) -> tuple[Samples, str]:
    """Every sample of `base`'s `/metrics`, parsed by Prometheus' parser, and the page's text."""
    page = requests.get(f"{base}/metrics", timeout=10)
    assert page.status_code == 200, page.text
    assert page.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(page.text)
        for s in family.samples
    }
    return samples, page.text


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def order(tag: str, n: int) -> dict:
    return {
        "order_id": f"{tag}-o{n}",
        "order_date": datetime.now(UTC).isoformat(),
        "customer_id": f"{tag}-c",
        "email": f"{tag}@example.com",
        "ip_addr": f"10.9.8.{n}",
        "order_amount": 25.0 + n,
        "location_lat": 40.4,
        "location_long": -3.7,
    }


@pytest.mark.system
def test_prediction_metrics_move_with_traffic(live: LiveServices):
    base, api = live.prediction.base, f"{live.prediction.base}{SERVICE_API}"
    before, _ = scrape(base)
    scored = [requests.post(f"{api}/predict", json=order("metrics-a", n), timeout=30) for n in range(3)]
    assert [r.status_code for r in scored] == [200] * 3, [r.text for r in scored]
    batch = requests.post(
        f"{api}/predict-batch", json={"orders": [order("metrics-b", n) for n in range(2)]}, timeout=30
    )
    assert batch.status_code == 200, batch.text
    bad = {k: v for k, v in order("metrics-c", 1).items() if k != "order_amount"}
    assert requests.post(f"{api}/predict", json=bad, timeout=30).status_code == 400
    label = {"order_id": "metrics-a-o0", "is_fraud": True}
    assert requests.post(f"{api}/report-label", json=label, timeout=30).status_code == 401  # no token
    assert requests.get(f"{base}/no/such/metrics-x@example.com", timeout=30).status_code == 404
    after, text = scrape(base)

    assert moved(before, after, "fraud_http_requests_total", event="predict", status="200") == 3
    assert moved(before, after, "fraud_http_requests_total", event="predict", status="400") == 1
    assert moved(before, after, "fraud_http_requests_total", event="predict-batch", status="200") == 1
    assert moved(before, after, "fraud_http_requests_total", event="report-label", status="401") == 1
    assert moved(before, after, "fraud_http_requests_total", event="unmatched", status="404") == 1
    assert moved(before, after, "fraud_http_requests_total", event="metrics", status="200") == 1
    assert moved(before, after, "fraud_http_request_errors_total", event="predict", status_class="4xx") == 1
    assert (
        moved(before, after, "fraud_http_request_errors_total", event="report-label", status_class="4xx") == 1
    )
    assert moved(before, after, "fraud_http_request_errors_total", event="predict", status_class="5xx") == 0
    assert moved(before, after, "fraud_http_request_duration_seconds_count", event="predict") == 4
    assert moved(before, after, "fraud_http_request_duration_seconds_bucket", event="predict", le="+Inf") == 4
    # the scores: one per scored order, the flagged ones as the answers said
    scores = [r.json()["fraud_score"] for r in scored]
    batch_scores = [p["fraud_score"] for p in batch.json()["predictions"]]
    flagged = sum(r.json()["is_fraud"] for r in scored)
    assert moved(before, after, "fraud_prediction_score_count", event="predict") == 3
    assert moved(before, after, "fraud_prediction_score_sum", event="predict") == pytest.approx(sum(scores))
    assert moved(before, after, "fraud_prediction_score_count", event="predict-batch") == 2
    assert moved(before, after, "fraud_prediction_score_sum", event="predict-batch") == pytest.approx(
        sum(batch_scores)
    )
    assert moved(before, after, "fraud_predictions_flagged_total", event="predict") == flagged
    assert ("fraud_overload_refusals_total", ()) in after
    # two workers (fraud_poc.launcher): their metrics summed from their files, without one worker's process_*
    assert "--workers=2" in SERVICES["prediction"].args(live.prediction.port)
    assert ("process_cpu_seconds_total", ()) not in after
    # nothing of a customer, and no raw path, in any label
    assert "example.com" not in text and "metrics-a" not in text and "no/such" not in text


def write_negative_amount(data_root: Path) -> str:
    orders = generate_orders(
        num_orders=400, num_customers=40, months=3, start_date="2025-03-01", fraud_rate=0.02, seed=5
    )
    orders.loc[3, "order_amount"] = -5.0
    path = data_root / "user" / "negative.csv"
    orders.to_csv(path, index=False)
    return "user/negative.csv"


def wait_finished(base: str, run_id: str, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = requests.get(f"{base}{TRAINING_API}/pipeline-status", params={"run_id": run_id}, timeout=10)
        if status.status_code == 200 and status.json()["state"] in ("done", "failed"):
            return status.json()
        time.sleep(0.5)
    raise TimeoutError(f"run {run_id} not finished: {status.text}")


@pytest.mark.system
def test_training_step_durations_and_outcomes(live: LiveServices):
    base = live.training.base
    before, _ = scrape(base)
    bad = requests.post(
        f"{base}{TRAINING_API}/run-from-raw",
        json={"path": write_negative_amount(live.data_root)},
        headers=AUTH,
    )
    assert bad.status_code == 200, bad.text
    assert wait_finished(base, bad.json()["run_id"])["state"] == "failed"
    good = requests.post(f"{base}{TRAINING_API}/run-pipeline", json=RUN, headers=AUTH, timeout=30)
    assert good.status_code == 200, good.text
    status = wait_finished(base, good.json()["run_id"])
    assert status["state"] == "done", status
    after, text = scrape(base)

    step_count = "fraud_pipeline_step_duration_seconds_count"
    assert moved(before, after, step_count, step="preprocess", outcome="failed") == 1
    ran = [s["step"] for s in status["steps"] if s["state"] == "done"]
    assert ran == list(PIPELINE_STEPS[:-1])  # train_only: no prepare-db
    for step in ran:
        assert moved(before, after, step_count, step=step, outcome="done") == 1, step
        spent = moved(before, after, "fraud_pipeline_step_duration_seconds_sum", step=step, outcome="done")
        took = pd.Timestamp(next(s for s in status["steps"] if s["step"] == step)["ended"]) - pd.Timestamp(
            next(s for s in status["steps"] if s["step"] == step)["started"]
        )
        assert 0 < spent <= took.total_seconds() + 1.0, (step, spent, took)
    assert moved(before, after, step_count, step="prepare-db", outcome="done") == 0
    assert moved(before, after, "fraud_http_requests_total", event="run-pipeline", status="200") == 1
    assert moved(before, after, "fraud_http_requests_total", event="run-from-raw", status="200") == 1
    assert after[("process_cpu_seconds_total", ())] > 0  # one worker: the process's own metrics too
    assert "negative.csv" not in text and good.json()["run_id"] not in text


MULTIPROCESS_WORKER = """
import sys
from fraud_poc.store.metrics import observe_step, exposition
observe_step("preprocess", "done", float(sys.argv[1]))
"""


def test_multiprocess_mode_sums_the_workers(tmp_path):
    """With PROMETHEUS_MULTIPROC_DIR set, /metrics' page sums what every worker process counted."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for seconds in ("2", "3"):  # two worker processes, one attempt each
        subprocess.run([sys.executable, "-c", MULTIPROCESS_WORKER, seconds], env=env, cwd=ROOT, check=True)
    page = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from fraud_poc.store.metrics import exposition; sys.stdout.buffer.write(exposition())",
        ],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
    }
    labels = (("outcome", "done"), ("step", "preprocess"))
    assert samples[("fraud_pipeline_step_duration_seconds_count", labels)] == 2
    assert samples[("fraud_pipeline_step_duration_seconds_sum", labels)] == 5.0


class TwoWorkers(ServiceOnPort):
    """The prediction service as the README runs it, with `--workers=2` and `PROMETHEUS_MULTIPROC_DIR`."""

    def __init__(self, port: int, env: dict, log: Path):
        self.port, self.base, self.log = port, f"http://127.0.0.1:{port}", log
        cmd = [
            str(Path(sys.executable).parent / "hopeit_server"),
            *SERVICES["prediction"].args(port),
            "--workers=2",
        ]
        env = own_control_socket(env, "prediction", port)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


@pytest.mark.system
def test_two_workers_in_multiprocess_mode_count_together(key_prefix, tmp_path):
    """With `--workers 2` and `PROMETHEUS_MULTIPROC_DIR` given, each worker writes its own file there and every
    scrape shows both workers' requests, so the counters do not jump between workers' values."""
    prefix = f"{key_prefix}workers:"
    r = redis.Redis.from_url(REDIS_URL)
    make_model_live(r, Keys(prefix))
    folder = tmp_path / "prometheus"
    folder.mkdir()
    env = {**service_env(prefix, tmp_path / "data"), "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    service = TwoWorkers(free_port(), env, tmp_path / "prediction.log")
    try:
        service.wait_ready()
        sent = 40
        for n in range(sent):  # a new connection each: gunicorn hands them to either worker
            answer = requests.post(
                f"{service.base}{SERVICE_API}/predict", json=order("workers", n), timeout=30
            )
            assert answer.status_code == 200, answer.text
        scrapes = [scrape(service.base)[0] for _ in range(6)]
    finally:
        service.stop()
        for key in r.scan_iter(match=f"{prefix}*", count=1000):
            r.unlink(key)
    predicted = ("fraud_http_requests_total", (("event", "predict"), ("status", "200")))
    assert [s[predicted] for s in scrapes] == [sent] * len(scrapes)
    assert all(s[("fraud_prediction_score_count", (("event", "predict"),))] == sent for s in scrapes)
    by_worker = {  # what each worker process counted, from its own file
        path.name: next(
            (
                s.value
                for m in MultiProcessCollector.merge([str(path)], accumulate=False)
                for s in m.samples
                if (s.name, tuple(sorted(s.labels.items()))) == predicted
            ),
            0.0,
        )
        for path in folder.glob("counter_*.db")
    }
    assert len(by_worker) >= 2 and sum(by_worker.values()) == sent, by_worker
