"""Both services as `hopeit_server run` subprocesses on the test Redis, with a small model live in the prediction
service: what the input-bounds and schemathesis tests send their requests to."""

import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import redis
from conftest import REDIS_URL, ROOT, Service, free_port, service_env
from test_service_http import go_live, load_version, metadata_for, train_booster

from fraud_poc.core.schema import LABEL
from fraud_poc.features.definitions import compute_features
from fraud_poc.features.generator import generate_orders
from fraud_poc.launcher import SERVICES, own_control_socket
from fraud_poc.store.redis_store import Keys

TRAINING_API = "/api/training-pipeline/0x2"
SERVICE_API = "/api/fraud-service/0x2"
FS_VERSION = "v-bounds"


class ServiceOnPort(Service):
    """`conftest.Service` on a given port (one `conftest.free_port` gave)."""

    def __init__(self, name: str, port: int, env: dict, log: Path):
        self.port, self.base, self.log = port, f"http://127.0.0.1:{port}", log
        cmd = [str(Path(sys.executable).parent / "hopeit_server"), *SERVICES[name].args(port)]
        env = own_control_socket(env, name, port)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def stop(self) -> None:
        """SIGTERM, and SIGKILL if it has not ended 30 s later; returns once the process is gone."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


@dataclass
class LiveServices:
    training: Service
    prediction: Service
    keys: Keys
    redis: redis.Redis
    orders: pd.DataFrame  # the history loaded into the live feature store
    data_root: Path


def make_model_live(r: redis.Redis, keys: Keys, orders: int = 2_000) -> pd.DataFrame:
    """A small booster trained on a generated history, live with that history's serving state."""
    history = generate_orders(num_orders=orders, num_customers=60, months=2, fraud_rate=0.05, seed=21)
    history = history.sort_values(["order_date", "order_id"], ignore_index=True)
    features = compute_features(history).set_index("order_id").loc[history["order_id"]]
    booster, threshold, ap = train_booster(features, history[LABEL].to_numpy(), rounds=10, seed=1)
    load_version(r, keys, FS_VERSION, history)
    go_live(r, keys, "m-bounds", booster, metadata_for("m-bounds", threshold, ap, len(history)), FS_VERSION)
    return history


def live_services(key_prefix: str, workdir: Path) -> Iterator[LiveServices]:
    """Both services (ready) on free ports, the model live; every key under `key_prefix` removed after."""
    data_root = workdir / "data"
    (data_root / "user").mkdir(parents=True)
    r = redis.Redis.from_url(REDIS_URL)
    keys = Keys(key_prefix)
    orders = make_model_live(r, keys)
    env = service_env(key_prefix, data_root)
    names = ("training", "prediction")
    started = [
        ServiceOnPort(name, port, env, workdir / f"{name}.log")
        for name, port in zip(names, (free_port(), free_port()), strict=True)
    ]
    try:
        for service in started:
            service.wait_ready()
        yield LiveServices(*started, keys, r, orders, data_root)
    finally:
        for service in started:
            try:
                service.stop()
            except Exception:  # the other service and the keys are still cleaned up
                service.proc.kill()
        for key in r.scan_iter(match=f"{key_prefix}*", count=1000):
            r.unlink(key)
