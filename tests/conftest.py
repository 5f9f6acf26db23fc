"""Shared fixtures: real Redis on this machine under a per-session key prefix (in a database of the pytest-xdist
worker's own, `isolation.REDIS_URL`), and hopeit services in subprocesses (on ports of the worker's own range,
`isolation.free_port`)."""

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import uuid4

import dask
import pytest
import redis
import requests
from distributed import Client, LocalCluster
from isolation import REDIS_URL, free_port
from step_runs import FEATURE_SPEC, ROWS_PER_PARTITION, SAMPLE, SPLIT, StepsRun, make_runs

from fraud_poc.features.generator import generate_orders
from fraud_poc.launcher import SERVICES, own_control_socket
from fraud_poc.pipeline.dask_client import LOCAL_CLUSTER_CONFIG
from fraud_poc.pipeline.steps.feature_calc import calc_features
from fraud_poc.pipeline.steps.preprocess import preprocess_orders
from fraud_poc.pipeline.steps.sample_data import write_sample_data
from fraud_poc.pipeline.steps.training_data import make_training_data

ROOT = Path(__file__).resolve().parents[1]
API_TOKEN = secrets.token_urlsafe(32)  # the services under test take this session's token
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


@pytest.fixture(scope="session")
def key_prefix() -> str:
    return f"fraudtest:{uuid4().hex[:12]}:"


@pytest.fixture(scope="session")
def redis_client(key_prefix):
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    for key in client.scan_iter(match=f"{key_prefix}*", count=1000):
        client.unlink(key)


@pytest.fixture(scope="session")
def client():
    """A real local Dask cluster (2 worker processes, 1 thread each), shared by the tests that need one."""
    with (
        dask.config.set(LOCAL_CLUSTER_CONFIG),  # as the services' own cluster: no work stealing
        LocalCluster(
            n_workers=2, threads_per_worker=1, dashboard_address=":0", memory_limit="1GiB"
        ) as cluster,
    ):
        with Client(cluster, set_as_default=False) as dask_client:
            yield dask_client


@pytest.fixture(scope="module")
def runs(client, tmp_path_factory):
    """Runs 1 and 3 (same orders) and run 2 (other orders) through steps 1-4 under a data root of the module's own."""
    return make_runs(client, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def sample_run(client, tmp_path_factory) -> StepsRun:
    """Step 1 on `SAMPLE` (run "r1", a data root of the session's own): the run the step tests share."""
    run = StepsRun(tmp_path_factory.mktemp("steps"), "r1", generate_orders(**SAMPLE))
    run.results["sample-data"] = write_sample_data(client, run.data_root, run.run_id, **SAMPLE)
    return run


@pytest.fixture(scope="session")
def preprocessed_run(client, sample_run) -> StepsRun:
    """`sample_run` after step 2."""
    sample_run.results["preprocess"] = preprocess_orders(
        client, sample_run.data_root, sample_run.run_id, None, rows_per_partition=ROWS_PER_PARTITION
    )
    return sample_run


@pytest.fixture(scope="session")
def features_run(client, preprocessed_run) -> StepsRun:
    """`sample_run` after step 3 (window and label delay of `FEATURE_SPEC`)."""
    run = preprocessed_run
    run.results["feature-calc"] = calc_features(client, run.data_root, run.run_id, spec=FEATURE_SPEC)
    return run


@pytest.fixture(scope="session")
def training_run(client, features_run) -> StepsRun:
    """`sample_run` after step 4 (split `SPLIT`)."""
    run = features_run
    run.results["training-data"] = make_training_data(client, run.data_root, run.run_id, SPLIT)
    return run


def service_env(key_prefix: str, data_root: Path, redis_url: str = REDIS_URL) -> dict:
    """Forced environment for a service under test: a developer shell's values must not leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FRAUD_", "DASK_"))}
    env.update(
        FRAUD_REDIS_URL=redis_url,
        FRAUD_KEY_PREFIX=key_prefix,
        FRAUD_DATA_ROOT=str(data_root),
        DASK_SCHEDULER_ADDRESS="",
        FRAUD_API_TOKEN=API_TOKEN,
        FRAUD_FIND_ORDERS_ENABLED="true",
        FRAUD_PREDICT_REQUIRES_TOKEN="false",
    )
    return env


class Service:
    """A `hopeit_server run --start-streams` subprocess on a free port."""

    def __init__(self, name: str, env: dict, log: Path, port: int | None = None):
        """`name`: "training" or "prediction", run as the README says (`fraud_poc.launcher.SERVICES`);
        on `port`, or a free one."""
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [str(Path(sys.executable).parent / "hopeit_server"), *SERVICES[name].args(self.port)]
        self.log = log
        env = own_control_socket(env, name, self.port)  # not gunicorn's one socket per user (~/.gunicorn)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Until the API spec answers: a start can take a minute or more when parallel tests share 2 cores."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited: {self.log.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.base}/api/docs/swagger.json", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"service not ready: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
