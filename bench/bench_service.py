"""Load test of the prediction service over HTTP, with the floor its latency stands on.

By default it sets everything up itself: a generated order history, a model trained on its batch features with
the pipeline's XGBoost parameters (50 trees; `--rounds`), their serving state loaded as a
feature-store version under a key prefix of its own in the configured Redis ($FRAUD_REDIS_URL), and the
prediction service as the README runs it, on a free port (`--replicas N` for N services, `--workers N` for N
processes each instead of the README's two). `--url` points it at a running service instead (one with a live model; orders are built from `find-orders`).

It prints, in one run:
- the floor: Redis round trip (PING, and the scoring script), `serving_features` for one order, and the
  model's score and contributions for one row and for 100 (the live predictor's path, and XGBoost's C API);
- the scorer in-process (everything but HTTP and hopeit);
- over HTTP on 127.0.0.1, with a minimal keep-alive HTTP/1.1 client on uvloop (requests prepared before the
  clock starts): open-loop runs at fixed request rates (latency measured from each request's scheduled send
  time, so queueing counts) and a closed-loop run at saturation.

`--overload 2,5` runs only the overload check instead (issue 22): saturation in a closed loop, then open loops
at 2x and 5x of it for `--overload-seconds`, printing the answers by kind (200, 503 with Retry-After, anything
else), and the p99 of the 200s against their p99 at saturation; `--max-in-flight N` runs the own service with
`service.max_in_flight` = N.

`--floor none` (or `--floor redis`) runs the same load against what a request costs below the service instead:
`bench/floor_app`, a hopeit app with the service's name, payload types, server settings, workers and worker class
that parses each order and answers a fixed prediction (with `redis`, after one call to Redis on the service's
hot-path connection), without the service's API file, middleware, features, model or state.

Everything is bounded in count and time. The load generator shares the machine's cores with the service and
Redis; its own CPU use is printed too.

    . config/env.sh && .venv/bin/python bench/bench_service.py --workers 1
"""

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter, deque
from pathlib import Path
from uuid import uuid4

import aiohttp
import numpy as np
import pandas as pd
import redis
import uvloop
import xgboost as xgb

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report import recorded  # noqa: E402

from fraud_poc.core.schema import (  # noqa: E402
    ENTITIES,
    FEATURE_COLUMNS,
    LABEL,
    LABEL_DELAY_DAYS,
    WINDOW,
    FeatureSpec,
)
from fraud_poc.core.service_payloads import Order  # noqa: E402
from fraud_poc.core.settings import TrainModelSettings  # noqa: E402
from fraud_poc.features.definitions import compute_features, serving_features, serving_states  # noqa: E402
from fraud_poc.features.generator import generate_orders  # noqa: E402
from fraud_poc.features.serving_state import decode_state, encoded_states  # noqa: E402
from fraud_poc.launcher import SERVICES  # noqa: E402
from fraud_poc.model.health import drift_reference  # noqa: E402
from fraud_poc.model.row_predictor import RowPredictor  # noqa: E402
from fraud_poc.model.train import BASE_PARAMS, choose_threshold  # noqa: E402
from fraud_poc.pipeline.steps.train_model import booster_params  # noqa: E402
from fraud_poc.serving.scorer import Scorer, entity_view_of  # noqa: E402
from fraud_poc.serving.serving_model import APPROX_CONTRIBUTIONS, score_matrix  # noqa: E402
from fraud_poc.store.feature_store import switch_live, upload_model, write_entity_states  # noqa: E402
from fraud_poc.store.redis_pipe import RedisPipe  # noqa: E402
from fraud_poc.store.redis_store import Keys, async_redis, glob_escape, unlink_matching  # noqa: E402
from fraud_poc.store.registry import model_metadata  # noqa: E402
from fraud_poc.store.store_scripts import (  # noqa: E402
    APPEND_SCRIPT,
    APPEND_SCRIPT_SHA,
    order_record,
    script_args,
    script_keys,
)

API = "/api/fraud-service/0x2"
FLOOR_APP = REPO / "bench" / "floor_app" / "floor-app.json"  # `--floor`


def load_average() -> str:
    """The machine's 1-minute load average: other work on the same cores shows in every number here."""
    return f"load {os.getloadavg()[0]:.1f}"


class CpuMeter:
    """CPU seconds used by the service's processes (each server and its workers) and by Redis."""

    def __init__(self, service_pids: list[int], redis_url: str):
        self.service_pids, self.redis = set(service_pids), redis.Redis.from_url(redis_url)

    def _service(self) -> dict[int, float]:
        """CPU seconds of each service process so far."""
        ticks = os.sysconf("SC_CLK_TCK")
        used = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid, ppid = int(stat.parent.name), int(fields[1])
            if pid in self.service_pids or ppid in self.service_pids:
                used[pid] = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
        return used

    def _redis(self) -> float:
        info = self.redis.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def read(self) -> tuple[dict[int, float], float, float]:
        return self._service(), self._redis(), time.process_time()

    @staticmethod
    def per_request(before: tuple, after: tuple, requests: int) -> str:
        """CPU per request of the service, Redis and the generator; with several service processes, the share
        of the service's CPU each one used (how evenly the load was spread)."""
        by_process = [after[0][pid] - before[0].get(pid, 0.0) for pid in after[0]]
        busy = sorted((used for used in by_process if used > 0.01 * sum(by_process)), reverse=True)
        service = sum(by_process) / requests * 1e6 if by_process else float("nan")
        store, client = ((b - a) / requests * 1e6 for a, b in zip(before[1:], after[1:], strict=True))
        shares = f" ({' / '.join(f'{used / sum(busy):.0%}' for used in busy)})" if len(busy) > 1 else ""
        return (
            f"CPU per request: service {service:.0f} us{shares}, Redis {store:.0f} us,"
            f" load generator {client:.0f} us"
        )


def percentiles(latencies_s: list[float]) -> str:
    """p50/p95/p99/max in milliseconds."""
    a = np.array(latencies_s) * 1000
    if len(a) == 0:
        return "no samples"
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return f"p50 {p50:6.2f}  p95 {p95:6.2f}  p99 {p99:6.2f}  max {a.max():7.2f} ms"


def timed_us(fn, repeat: int) -> float:
    """Median wall time of `fn()` in microseconds."""
    fn()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return float(np.median(samples) * 1e6)


# ---------------------------------------------------------------- setup (own prefix, own service)


def train_bench_model(x: np.ndarray, y: np.ndarray, args: argparse.Namespace) -> tuple[dict, xgb.Booster]:
    """A model with the pipeline's XGBoost parameters and `--rounds` trees of `--depth` at most.

    The cost of a model call grows with the trees. The default, 50, is more than the pipeline keeps: its early
    stopping ended at 33 trees on 1.2M orders (`make run`); on this bench's small history it would stop at a
    handful, which would flatter the service.
    """
    params = {**BASE_PARAMS, **booster_params(TrainModelSettings()), "nthread": 2, "max_depth": args.depth}
    return params, xgb.train(params, xgb.DMatrix(x, y, feature_names=FEATURE_COLUMNS), args.rounds)


def prepare_store(redis_url: str, prefix: str, args: argparse.Namespace) -> tuple[pd.DataFrame, str]:
    """Generate a history, train a model on it, load its state and make both live; returns (orders, model id)."""
    orders = generate_orders(
        num_orders=args.orders, num_customers=args.customers, months=2, fraud_rate=0.02, seed=5
    )
    features = compute_features(orders).set_index("order_id").loc[orders["order_id"], FEATURE_COLUMNS]
    labels = orders[LABEL].to_numpy()
    params, booster = train_bench_model(features.to_numpy(), labels, args)
    threshold = choose_threshold(labels, booster.inplace_predict(features.to_numpy()))
    r, keys, version, model_id = redis.Redis.from_url(redis_url), Keys(prefix), "bench-v1", "bench-m1"
    spec = FeatureSpec(window=WINDOW, label_delay_days=LABEL_DELAY_DAYS)
    for by in ENTITIES:  # what feature-calc keeps and prepare-db loads: last W records and hourly tiles
        encoded = encoded_states(serving_states(orders, by, spec.window, spec.label_delay_days), by)
        write_entity_states(r, keys, version, by, encoded, chunk_size=500)
    print_state_memory(r, keys, version)
    meta = {
        "version": version,
        "window": spec.window,
        "label_delay_days": spec.label_delay_days,
        "feature_set_fingerprint": spec.fingerprint,
        "feature_spec": spec.to_json(),
    }
    r.set(keys.fs_meta(version), json.dumps(meta))
    scores = booster.inplace_predict(features.to_numpy())
    drift = drift_reference({c: features[c].to_numpy() for c in FEATURE_COLUMNS}, scores)  # as train-model's
    metadata = model_metadata(
        model_id, "bench", params, {"threshold": threshold}, {"train": len(orders)}, {}, spec, drift=drift
    )
    upload_model(r, keys, model_id, bytes(booster.save_raw("ubj")), metadata)
    switch_live(r, keys, model_id, version, run_id="bench")
    return orders, model_id


def print_state_memory(r: redis.Redis, keys: Keys, version: str, sample: int = 500) -> None:
    """Redis memory per entity value (MEMORY USAGE of a sample of records and tile keys), records and tiles per
    state."""
    for by in ENTITIES:
        values = [v.decode() for v in r.zrange(keys.fs_index(version, by), 0, -1)]
        picked = values[:: max(1, len(values) // sample)]
        sizes = [
            (r.memory_usage(keys.fs_state(version, by, v)) or 0)
            + (r.memory_usage(keys.fs_tiles(version, by, v)) or 0)
            for v in picked
        ]
        records = [len(decode_state(r.get(keys.fs_state(version, by, v)))) for v in picked]
        tiles = [r.zcard(keys.fs_tiles(version, by, v)) for v in picked]
        print(
            f"state of {by}: {len(values):,} values; bytes per value mean {np.mean(sizes):,.0f}, "
            f"max {max(sizes):,}; records per value mean {np.mean(records):.1f}, max {max(records)}; "
            f"tiles per value mean {np.mean(tiles):.1f}, max {max(tiles)}"
        )
    index = r.memory_usage(keys.fs_orders(version)) or 0
    print(f"order index: {r.hlen(keys.fs_orders(version)):,} orders, {index / 1e6:.1f} MB")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_config(log_level: str | None, workdir: Path) -> Path | None:
    """None (the service's own server config), or a copy of it at another log level (what request logs cost)."""
    if log_level is None:
        return None
    path = REPO / SERVICES["prediction"].config_files[0]
    config = json.loads(path.read_text())
    config["logging"]["log_level"] = log_level
    copy = workdir / f"server-{log_level.lower()}.json"
    copy.write_text(json.dumps(config))
    return copy


def app_config(max_in_flight: int | None, workdir: Path) -> Path | None:
    """None (the service's own app config), or a copy of it with another `service.max_in_flight`."""
    if max_in_flight is None:
        return None
    path = REPO / SERVICES["prediction"].config_files[2]
    config = json.loads(path.read_text())
    config["settings"]["service"]["max_in_flight"] = max_in_flight
    copy = workdir / f"fraud-service-max-in-flight-{max_in_flight}.json"
    copy.write_text(json.dumps(config))
    return copy


def service_command(
    port: int, workers: int | None, worker_class: str | None, server: Path | None, app: Path | None = None
) -> list[str]:
    """The prediction service's command as the README gives it, with the bench's changes."""
    args = SERVICES["prediction"].args(port, REPO)
    if server is not None:
        args[1] = args[1].replace(str(REPO / SERVICES["prediction"].config_files[0]), str(server))
    if app is not None:
        args[1] = args[1].replace(str(REPO / SERVICES["prediction"].config_files[2]), str(app))
    if worker_class is not None:
        args = [a for a in args if not a.startswith("--worker-class=")] + [f"--worker-class={worker_class}"]
    if workers is not None:
        args = [a for a in args if not a.startswith("--workers=")] + [f"--workers={workers}"]
    return [str(Path(sys.executable).parent / "hopeit_server"), *args]


def stop_services(procs: list[subprocess.Popen], redis_url: str, prefix: str) -> None:
    """Stop the services (SIGTERM, then wait) and remove every key the bench wrote under its prefix."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(timeout=60)
    unlink_matching(redis.Redis.from_url(redis_url), f"{glob_escape(prefix)}*")


def start_service(
    redis_url: str,
    prefix: str,
    workers: int | None,
    worker_class: str | None,
    log: Path,
    server: Path | None,
    app: Path | None = None,
    floor: str | None = None,
) -> tuple[subprocess.Popen, str]:
    """The prediction service on a free port (or, with `floor`, `floor_app` in its place: see `--floor`); returns
    the process and the API base URL."""
    port = free_port()
    env = {
        **os.environ,
        "FRAUD_REDIS_URL": redis_url,
        "FRAUD_KEY_PREFIX": prefix,
        "FRAUD_API_TOKEN": BENCH_TOKEN,
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    env.setdefault("FRAUD_DATA_ROOT", str(REPO / "data"))
    env.setdefault("DASK_SCHEDULER_ADDRESS", "")
    cmd = service_command(port, workers, worker_class, server, app)
    ready = "/api/docs/swagger.json"
    if floor is not None:  # no API file: hopeit refuses one that describes events the app does not have
        cmd = [arg for arg in cmd if not arg.startswith("--api-file=")]
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "bench"), env["PYTHONPATH"]])
        if floor == "redis":
            env["FLOOR_REDIS_URL"] = redis_url
        ready = f"{API}/find-orders"
    print("service:", " ".join(cmd[1:]).replace(f"{REPO}/", ""))
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}{API}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}: see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{ready}", timeout=1):
                return proc, base
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"service not ready: see {log}")


BENCH_TOKEN = ""  # the services' API token in this run (report-label needs it)


# ---------------------------------------------------------------- orders to send


class OrderSource:
    """Orders of known customer/email/ip combinations, with new ids and increasing dates."""

    def __init__(self, combinations: list[tuple[str, str, str]], start: pd.Timestamp, seed: int = 0):
        self.combinations, self.start, self.n = combinations, start, 0
        self.rng = np.random.default_rng(seed)
        self.run = uuid4().hex[:8]

    def next(self) -> dict:
        customer, email, ip = self.combinations[self.n % len(self.combinations)]
        self.n += 1
        return {
            "order_id": f"bench-{self.run}-{self.n}",
            "order_date": (self.start + pd.Timedelta(seconds=self.n)).isoformat(),
            "customer_id": customer,
            "email": email,
            "ip_addr": ip,
            "order_amount": float(np.round(self.rng.gamma(2.0, 40.0), 2)),
            "location_lat": 40.4,
            "location_long": -3.7,
        }


def combinations_from(orders: pd.DataFrame) -> list[tuple[str, str, str]]:
    """The latest customer/email/ip combination of each customer of the history."""
    latest = orders.sort_values("order_date").groupby("customer_id", observed=True).tail(1)
    return list(zip(latest["customer_id"], latest["email"], latest["ip_addr"], strict=True))


async def combinations_from_service(base: str) -> list[tuple[str, str, str]]:
    headers = {"Authorization": f"Bearer {BENCH_TOKEN}"} if BENCH_TOKEN else {}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.get(f"{base}/find-orders?num_items=100") as response:
            items = (await response.json())["items"]
    if not items:
        raise RuntimeError("find-orders returned nothing: is a model live?")
    return [(i["customer_id"], i["email"], i["ip_addr"]) for i in items]


# ---------------------------------------------------------------- floor


async def measure_floor(redis_url: str, prefix: str, source: OrderSource, repeat: int) -> None:
    """Redis round trip, features, model and the whole scorer in-process."""
    client = async_redis(redis_url)
    keys = Keys(prefix)
    pipe = RedisPipe(redis_url)  # the service's hot-path connection
    scorer = Scorer(client, pipe, keys, top_k=5, log_max_len=1_000_000)
    live = await scorer.current()
    await client.script_load(APPEND_SCRIPT)

    async def rtt(coro_fn) -> float:
        await coro_fn()
        samples = []
        for _ in range(repeat):
            started = time.perf_counter()
            await coro_fn()
            samples.append(time.perf_counter() - started)
        return float(np.median(samples) * 1e6)

    ping_us = await rtt(lambda: pipe.execute([("PING",)]))

    def call_of(record) -> tuple[list, list]:
        args = script_args(live.pointer, live.spec, record, (40.4, -3.7))
        return script_keys(keys, live.fs_version, record), args

    async def one_script() -> list:
        k, a = call_of(order_record(Order(**source.next())))
        return await pipe.execute([("EVALSHA", APPEND_SCRIPT_SHA, len(k), *k, *a)])

    script_us = await rtt(one_script)
    order = Order(**source.next())
    record = order_record(order)
    k, a = call_of(record)
    reply = await client.evalsha(APPEND_SCRIPT_SHA, len(k), *k, *a)
    # reply: [live, known entry or None, then per entity: records, oldest tile, tiles at the window edges]
    views = {
        e: entity_view_of(view, record, reply[1], i)
        for i, (e, view) in enumerate(zip(ENTITIES, reply[2:], strict=True))
    }

    def features() -> np.ndarray:
        return serving_features(views, record, live.spec.window, live.spec.label_delay_days)

    features_us = timed_us(features, repeat)
    x = np.asarray(features())[live.feature_index][None, :]
    booster = live.booster
    python_us = timed_us(lambda: booster.inplace_predict(x, validate_features=False), repeat)
    inplace_us = timed_us(lambda: live.predictor.scores(x), repeat)
    both_us = timed_us(lambda: score_matrix(live, x), repeat)
    c_api = RowPredictor(
        booster, approx_contributions=APPROX_CONTRIBUTIONS, compiled=False
    )  # the path before
    c_api_us = timed_us(lambda: (c_api.scores(x), c_api.contributions(x)), repeat)
    rows = np.repeat(x, 100, axis=0)
    rows_us = timed_us(lambda: live.predictor.scores_and_contributions(rows), repeat // 10)
    c_api_rows_us = timed_us(lambda: (c_api.scores(rows), c_api.contributions(rows)), repeat // 10)
    scorer_us = await rtt(lambda: scorer.predict([Order(**source.next())]))
    trees = booster.num_boosted_rounds()
    print(f"floor (median of {repeat}, {load_average()}):")
    print(f"  Redis PING round trip                 {ping_us:8.1f} us")
    print(f"  Redis scoring script (read + append)  {script_us:8.1f} us")
    print(f"  serving_features, one order           {features_us:8.1f} us  (views decoded before)")
    print(
        f"  model: in-place score, one row        {inplace_us:8.1f} us   ({trees} trees, depth <= {depth_of(live)};"
        f" Booster.inplace_predict {python_us:.1f} us)"
    )
    print(
        f"  model: score + contributions, one row {both_us:8.1f} us   ({live.predictor.path} path;"
        f" XGBoost C API, two calls {c_api_us:.1f} us)"
    )
    print(
        f"  model: score + contributions, 100 rows{rows_us:8.1f} us   (XGBoost C API {c_api_rows_us:.1f} us)"
    )
    print(f"  Scorer.predict in-process (all above) {scorer_us:8.1f} us")


def depth_of(live) -> int:
    return int(
        json.loads(live.booster.save_config())["learner"]["gradient_booster"]["tree_train_param"]["max_depth"]
    )


# ---------------------------------------------------------------- load over HTTP


def take_answer(buffer: bytearray) -> tuple[int, bool] | None:
    """The status of the first whole HTTP answer in `buffer` and whether it carries Retry-After, removed from
    it; None while the answer is incomplete."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).lower()
    at = head.find(b"content-length:")
    length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
    if len(buffer) < end + 4 + length:
        return None
    del buffer[: end + 4 + length]
    return int(head[9:12]), b"\r\nretry-after:" in head


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: sends a prepared request, reads the status and a Content-Length body.

    A minimal client so that the load generator's own CPU per request (shared cores) stays small.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.retry_after = False  # the last answer carried Retry-After

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        answer = take_answer(self.buffer)
        if answer is None:
            return
        status, self.retry_after = answer
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection closed: {exc}"))

    async def request(self, data: bytes) -> int:
        """Send one prepared request; the response's status code."""
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


class Target:
    """The predict endpoint of one or more replicas: prepared request bytes, and new connections spread over
    the replicas in turn (as a load balancer would)."""

    def __init__(self, bases: list[str]):
        urls = [urllib.parse.urlsplit(f"{base}/predict") for base in bases]
        self.addresses = [(url.hostname, url.port or 80) for url in urls]
        self.host, self.path, self.connections = urls[0].hostname, urls[0].path, 0
        if any(url.path != self.path for url in urls):
            raise ValueError(f"replicas must serve the same API path: {bases}")

    def request(self, order: dict) -> bytes:
        body = json.dumps(order).encode()
        token = (
            f"Authorization: Bearer {BENCH_TOKEN}\r\n" if BENCH_TOKEN else ""
        )  # predict needs it by default
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}\r\n{token}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    def requests(self, source: OrderSource, count: int) -> list[bytes]:
        return [self.request(source.next()) for _ in range(count)]

    async def connect(self) -> HttpConnection:
        host, port = self.addresses[self.connections % len(self.addresses)]
        self.connections += 1
        _, connection = await asyncio.get_running_loop().create_connection(HttpConnection, host, port)
        return connection


class LabelTarget(Target):
    """The report-label endpoint (behind the API token) of the same replicas."""

    def __init__(self, bases: list[str]):
        super().__init__(bases)
        self.path = self.path.rsplit("/", 1)[0] + "/report-label"

    def request(self, label: dict) -> bytes:
        body = json.dumps(label).encode()
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {BENCH_TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body


class LabelSource:
    """Labels of the orders the bench scored: fraud and legitimate in turn, so every other one changes states."""

    def __init__(self, orders: OrderSource):
        self.orders, self.n = orders, 0

    def next(self) -> dict:
        self.n += 1
        order_id = f"bench-{self.orders.run}-{1 + self.n % self.orders.n}"
        return {"order_id": order_id, "is_fraud": self.n % 2 == 0}


class Errors(Counter):
    """Failed requests by kind: an HTTP status other than 200, or the exception's name."""

    def __str__(self) -> str:
        return f"errors {sum(self.values())}" + (f" {dict(self)}" if self else "")


async def send(connection: HttpConnection, data: bytes, errors: Errors, timeout: float = 10.0) -> bool:
    """Send one request; whether it was answered 200 (anything else is counted in `errors`)."""
    try:
        status = await asyncio.wait_for(connection.request(data), timeout)
    except (
        TimeoutError,
        ConnectionError,
        RuntimeError,
    ) as e:  # RuntimeError: uvloop, transport already closed
        status = type(e).__name__
    if status != 200:
        errors[status] += 1
    return status == 200


async def open_loop(
    target: Target, source: OrderSource, meter: CpuMeter, rate: float, duration: float, max_count: int
) -> None:
    """Requests sent at a fixed rate regardless of answers, each on an idle connection (a new one if none is).

    Latency is measured from each request's send; as nothing waits for an answer before sending, a queue in
    the service shows in it. The generator's own lateness (its timers have millisecond resolution, and it
    shares the cores) is printed apart, with the latency from each scheduled send time that includes it.
    """
    count = min(int(rate * duration), max_count)
    prepared = target.requests(source, count)  # built before the clock starts
    # the idle connection used longest ago goes first: every connection takes its turn, as a client's many
    # connections (or a load balancer's) would; the last one used, first, sent nearly every request of a
    # rate the service keeps up with on the one connection, to the one worker that had accepted it
    idle: deque[HttpConnection] = deque([await target.connect() for _ in range(8)])
    latencies, from_schedule, late, errors = [], [], [], Errors()
    loop = asyncio.get_running_loop()

    async def one(data: bytes, scheduled: float) -> None:
        while idle and idle[0].transport.is_closing():  # closed by the server while idle
            idle.popleft()
        connection = idle.popleft() if idle else await target.connect()
        sent = time.perf_counter()
        ok = await send(connection, data, errors)
        answered = time.perf_counter()
        latencies.append(answered - sent)
        from_schedule.append(answered - scheduled)
        late.append(sent - scheduled)
        if ok:
            idle.append(connection)
        else:
            connection.transport.close()

    before, start = meter.read(), time.perf_counter() + 0.05
    tasks = []
    for i, data in enumerate(prepared):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(data, scheduled)))
    await asyncio.gather(*tasks)
    elapsed, after = time.perf_counter() - start, meter.read()
    for connection in idle:
        connection.transport.close()
    print(
        f"  {rate:6.0f} req/s x {count:5d}: {percentiles(latencies)}  throughput {count / elapsed:7.0f} req/s"
        f"  {errors}  ({load_average()})\n    from scheduled send: {percentiles(from_schedule)}"
        f"  (generator late: p50 {np.median(late) * 1e3:.2f}, p99 {np.percentile(late, 99) * 1e3:.2f} ms)"
        f"\n    {CpuMeter.per_request(before, after, count)}"
    )


async def closed_loop(
    target: Target, source: OrderSource, meter: CpuMeter, concurrency: int, count: int, max_seconds: float
) -> tuple[float, float]:
    """`concurrency` connections each sending the next request as soon as its answer arrives; the throughput
    and p99 latency (seconds) of the 200s."""
    prepared = iter(target.requests(source, count))
    connections = [await target.connect() for _ in range(concurrency)]
    latencies, ok_latencies, errors = [], [], Errors()
    deadline = time.perf_counter() + max_seconds

    async def worker(connection: HttpConnection) -> None:
        for data in prepared:
            started = time.perf_counter()
            ok = await send(connection, data, errors)
            latencies.append(time.perf_counter() - started)
            if ok:
                ok_latencies.append(latencies[-1])
            if not ok:
                connection = await target.connect()
            if started > deadline:
                return

    before, started = meter.read(), time.perf_counter()
    await asyncio.gather(*[worker(connection) for connection in connections])
    elapsed, after = time.perf_counter() - started, meter.read()
    for connection in connections:
        connection.transport.close()
    print(
        f"  saturation, {concurrency} connections x {len(latencies)}: {percentiles(latencies)}"
        f"  throughput {len(latencies) / elapsed:7.0f} req/s  {errors}  ({load_average()})"
        f"\n    {CpuMeter.per_request(before, after, len(latencies))}"
    )
    return len(ok_latencies) / elapsed, float(np.percentile(ok_latencies, 99))


@contextlib.contextmanager
def collector_paused():
    """The load generator's own cyclic garbage collector off while it measures: a full collection of its heap
    (pandas, XGBoost, the prepared requests) stalls its event loop for up to ~100 ms, which would show up as
    service latency in every request due meanwhile."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


class OverloadConnection(asyncio.Protocol):
    """One keep-alive connection of the overload client, driven by callbacks (no task or future per request, so
    that the generator's own CPU per request stays small at 5x saturation): `send` writes a prepared request,
    `data_received` records its answer (the status, whether a 503 carried Retry-After, and for a 200 the latency
    from the request's scheduled send) and gives the connection back to the idle pool."""

    def __init__(self, run: "OverloadRecord") -> None:
        self.run, self.transport, self.buffer = run, None, bytearray()
        self.scheduled: float | None = None  # the request in progress: its scheduled send time
        self.queued: tuple[bytes, float] | None = None  # a request waiting for this connection to open

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.queued is not None:
            data, scheduled = self.queued
            self.queued = None
            self.send(data, scheduled)

    def send(self, data: bytes, scheduled: float) -> None:
        self.scheduled = scheduled
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (answer := take_answer(self.buffer)) is not None:
            scheduled, self.scheduled = self.scheduled, None
            self.run.answered(self, *answer, scheduled)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.scheduled is not None or self.queued is not None:
            self.scheduled = self.queued = None
            self.run.failed(type(exc).__name__ if exc else "ConnectionError")


class OverloadRecord:
    """What an overload run saw: the idle connections, the answers by kind, the 200s' latencies."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.idle, self.answers, self.ok_latencies = loop, [], Counter(), []
        self.outstanding, self.opened, self.done, self.connections = 0, 0, loop.create_future(), []
        self.all_sent = False

    def answered(
        self, connection: OverloadConnection, status: int, retry_after: bool, scheduled: float
    ) -> None:
        if status == 200:
            self.ok_latencies.append(time.perf_counter() - scheduled)
        self.answers[f"{status}+retry-after" if status == 503 and retry_after else status] += 1
        self.idle.append(connection)
        self.settle()

    def failed(self, kind: str) -> None:
        self.answers[kind] += 1
        self.settle()

    def settle(self) -> None:
        self.outstanding -= 1
        if self.all_sent and self.outstanding == 0 and not self.done.done():
            self.done.set_result(None)


async def overload_run(
    target: Target, source: OrderSource, meter: CpuMeter, rate: float, seconds: float
) -> tuple[list[float], Counter]:
    """Open loop at `rate` for `seconds`: each request on an idle connection (a new one if none is); a
    connection stays in use after any HTTP answer (the service keeps it alive after a 503). Returns the
    latencies of the 200s (from each request's scheduled send) and the answers by kind: the HTTP status
    (`503+retry-after` for a 503 that carried Retry-After) or the exception's name."""
    prepared = target.requests(source, int(rate * seconds))
    loop = asyncio.get_running_loop()
    record = OverloadRecord(loop)

    def connection_to(data: bytes | None = None, scheduled: float = 0.0) -> asyncio.Task:
        """A new connection (to the replicas in turn), sending `data` once open; a failed connect counts."""
        connection = OverloadConnection(record)
        record.connections.append(connection)
        connection.queued = None if data is None else (data, scheduled)
        host, port = target.addresses[target.connections % len(target.addresses)]
        target.connections += 1
        record.opened += 1
        connecting = loop.create_task(loop.create_connection(lambda: connection, host, port))
        connecting.add_done_callback(lambda task: connect_failed(connection, task))
        return connecting

    def connect_failed(connection: OverloadConnection, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None and connection.queued is not None:
            connection.queued = None
            record.failed(type(task.exception()).__name__)

    record.idle = [
        connection for _, connection in await asyncio.gather(*[connection_to() for _ in range(32)])
    ]
    before, start = meter.read(), time.perf_counter() + 0.05
    sent = 0
    while sent < len(prepared):
        due = min(len(prepared), int((time.perf_counter() - start) * rate) + 1)
        while sent < due:  # every request whose time has come, each on an idle connection or a new one
            scheduled = start + sent / rate
            record.outstanding += 1
            while record.idle and record.idle[-1].transport is None:  # closed by the server while idle
                record.idle.pop()
            if record.idle:
                record.idle.pop().send(prepared[sent], scheduled)
            else:
                connection_to(prepared[sent], scheduled)
            sent += 1
        delay = start + sent / rate - time.perf_counter()
        await asyncio.sleep(max(delay, 0))
    sent_in = time.perf_counter() - start
    record.all_sent = True
    if record.outstanding == 0:
        record.done.set_result(None)
    try:  # what is unanswered 10 s after the last send is a timeout
        await asyncio.wait_for(asyncio.shield(record.done), timeout=10.0)
    except TimeoutError:
        record.answers["TimeoutError"] += record.outstanding
    elapsed, after = time.perf_counter() - start, meter.read()
    for connection in record.connections:  # the idle ones, and any still waiting for an answer
        if connection.transport is not None:
            connection.transport.close()
    print(
        f"  {rate:6.0f} req/s x {len(prepared)}: 200s {percentiles(record.ok_latencies)}; answers {dict(record.answers)};"
        f" sent in {sent_in:.1f} s, answered in {elapsed:.1f} s, {record.opened} connections opened"
        f" ({load_average()})\n    {CpuMeter.per_request(before, after, len(prepared))}"
    )
    return record.ok_latencies, record.answers


async def measure_overload(
    target: Target, source: OrderSource, meter: CpuMeter, args: argparse.Namespace
) -> None:
    """Saturation first (closed loop with `--concurrency` connections, its 200s: the machine's other load changes
    it, so it is measured in the same run), then open loops at multiples of it. What must hold (issue 22): every answer 200 or 503 (with Retry-After), no connection
    error, and the p99 of the 200s within 3x of the p99 at saturation."""
    print("HTTP predict, overload:")
    throughput, p99 = await closed_loop(
        target, source, meter, args.concurrency, args.saturation_requests, args.duration * 2
    )
    for multiple in args.overload:
        latencies, answers = await overload_run(
            target, source, meter, multiple * throughput, args.overload_seconds
        )
        others = {k: n for k, n in answers.items() if k not in (200, "503+retry-after")}
        ok_p99 = float(np.percentile(latencies, 99)) if latencies else float("nan")
        print(
            f"    {multiple:g}x saturation ({multiple * throughput:.0f} req/s): p99 of the 200s {ok_p99 * 1e3:.1f} ms"
            f" = {ok_p99 / p99:.2f}x the p99 at saturation ({p99 * 1e3:.1f} ms); 200: {answers[200]},"
            f" 503 with Retry-After: {answers['503+retry-after']}, anything else: {others or 'none'}"
        )


async def run_load(bases: list[str], source: OrderSource, meter: CpuMeter, args: argparse.Namespace) -> None:
    target = Target(bases)
    with collector_paused():
        if args.overload:
            await warm_up(target, source)
            await measure_overload(target, source, meter, args)
            return
        await measure_load(target, source, meter, args)
        if BENCH_TOKEN:
            await measure_labels(LabelTarget(bases), LabelSource(source), meter, args)


async def measure_labels(
    target: Target, labels: LabelSource, meter: CpuMeter, args: argparse.Namespace
) -> None:
    """report-label: sequential on one connection, then open loop at 500 req/s."""
    connection, one, errors = await target.connect(), [], Errors()
    for data in target.requests(labels, args.single):
        started = time.perf_counter()
        await send(connection, data, errors)
        one.append(time.perf_counter() - started)
    connection.transport.close()
    print(f"HTTP report-label, one connection, sequential x {args.single}: {percentiles(one)}  {errors}")
    print("HTTP report-label, open loop:")
    await open_loop(target, labels, meter, 500, args.duration, args.max_count)


async def warm_up(target: Target, source: OrderSource) -> Errors:
    """Requests on 16 connections, one at a time each: every worker's model cache and connections."""
    warm = [await target.connect() for _ in range(16)]
    warm_errors, requests = Errors(), target.requests(source, 13 * len(warm))

    async def one_by_one(connection: HttpConnection, mine: list[bytes]) -> None:
        for data in mine:
            await send(connection, data, warm_errors)

    await asyncio.gather(*[one_by_one(c, requests[i :: len(warm)]) for i, c in enumerate(warm)])
    for connection in warm:
        connection.transport.close()
    return warm_errors


async def measure_load(
    target: Target, source: OrderSource, meter: CpuMeter, args: argparse.Namespace
) -> None:
    warm_errors = await warm_up(target, source)
    connection, one = await target.connect(), []
    prepared = target.requests(source, args.single)
    before = meter.read()
    for data in prepared:
        started = time.perf_counter()
        await send(connection, data, warm_errors)
        one.append(time.perf_counter() - started)
    after = meter.read()
    connection.transport.close()
    print(
        f"HTTP predict, one connection, sequential x {args.single}: {percentiles(one)}  "
        f"warm-up and sequential {warm_errors}  ({load_average()})"
    )
    print(f"    {CpuMeter.per_request(before, after, args.single)}")
    print("HTTP predict, open loop at fixed rates:")
    for rate in args.rates:
        await open_loop(target, source, meter, rate, args.duration, args.max_count)
    print("HTTP predict, closed loop:")
    await closed_loop(target, source, meter, args.concurrency, args.saturation_requests, args.duration * 2)


def measure_floor_app(redis_url: str, start: pd.Timestamp, args: argparse.Namespace) -> None:
    """`--floor`: the load against `floor_app` (no report-label: it has none)."""
    log = REPO / "data" / "logs" / "bench-service-floor.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    work = "one Redis call" if args.floor == "redis" else "no work"
    print(f"floor: bench/floor_app ({work} per request) in the service's place, no API file, no middleware")
    proc, base = start_service(
        redis_url, "", args.workers, args.worker_class, log, None, FLOOR_APP, args.floor
    )
    try:
        source = OrderSource(asyncio.run(combinations_from_service(base)), start)
        uvloop.run(run_load([base], source, CpuMeter([proc.pid], redis_url), args))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--url",
        action="append",
        help="base URL of a running service, e.g. http://127.0.0.1:8021" + API + " (repeat for replicas)",
    )
    parser.add_argument(
        "--replicas", type=int, default=1, help="services started, each on its own port (own service only)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="hopeit_server --workers (own service only; default: the README's)",
    )
    parser.add_argument("--worker-class", help="hopeit_server --worker-class instead of the README's")
    parser.add_argument(
        "--log-level", help="run the own service with a copy of its server config at this level"
    )
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[100, 500, 1000])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per fixed-rate run")
    parser.add_argument("--max-count", type=int, default=10_000, help="requests per fixed-rate run at most")
    parser.add_argument("--single", type=int, default=1000, help="sequential requests on one connection")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--saturation-requests", type=int, default=20_000)
    parser.add_argument(
        "--overload",
        type=lambda s: [float(x) for x in s.split(",")],
        help="only the overload runs: saturation, then open loops at these multiples of it, e.g. 2,5",
    )
    parser.add_argument(
        "--max-in-flight", type=int, help="run the own service with a copy of its app config at this bound"
    )
    parser.add_argument("--overload-seconds", type=float, default=10.0, help="seconds per overload run")
    parser.add_argument(
        "--floor",
        choices=["none", "redis"],
        help="load bench/floor_app instead of the service: no work, or one Redis call, per request",
    )
    parser.add_argument("--orders", type=int, default=30_000, help="orders in the generated history")
    parser.add_argument("--customers", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=50, help="trees of the bench model")
    parser.add_argument(
        "--depth", type=int, default=TrainModelSettings().max_depth, help="max_depth of the bench model"
    )
    args = parser.parse_args()
    redis_url = os.environ.get("FRAUD_REDIS_URL", "redis://127.0.0.1:6379/0")
    start = pd.Timestamp.now(tz="UTC").floor("s")  # the service takes orders dated near its clock only
    global BENCH_TOKEN
    if args.url:
        BENCH_TOKEN = os.environ.get("FRAUD_API_TOKEN", "")  # the running service's token
        source = OrderSource(asyncio.run(combinations_from_service(args.url[0])), start)
        uvloop.run(run_load(args.url, source, CpuMeter([], redis_url), args))
        return
    if args.floor:
        measure_floor_app(redis_url, start, args)
        return
    BENCH_TOKEN = secrets.token_urlsafe(24)
    prefix = f"fraudbench:{uuid4().hex}:"
    log = REPO / "data" / "logs" / "bench-service.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        prepared = time.perf_counter()
        orders, model_id = prepare_store(redis_url, prefix, args)
        print(
            f"setup: {len(orders):,} orders, model {model_id} live under "
            f"{prefix} in {time.perf_counter() - prepared:.1f} s; cores: {os.cpu_count()}"
        )
        source = OrderSource(combinations_from(orders), orders["order_date"].max() + pd.Timedelta(minutes=1))
        asyncio.run(measure_floor(redis_url, prefix, source, repeat=2000))
        server = server_config(args.log_level, log.parent)
        app = app_config(args.max_in_flight, log.parent)
        bases = []
        for replica in range(args.replicas):
            replica_log = log.with_name(f"{log.stem}-{replica}{log.suffix}") if args.replicas > 1 else log
            proc, base = start_service(
                redis_url, prefix, args.workers, args.worker_class, replica_log, server, app
            )
            procs.append(proc)
            bases.append(base)
        if args.replicas > 1:
            print(f"{args.replicas} replicas, connections spread over them in turn")
        uvloop.run(run_load(bases, source, CpuMeter([p.pid for p in procs], redis_url), args))
    finally:
        stop_services(procs, redis_url, prefix)
        print(
            f"max RSS of the load generator: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
        )


if __name__ == "__main__":
    floor = any(arg.startswith("--floor") for arg in sys.argv[1:])  # a section of its own: not the service's
    with recorded("bench_service_floor" if floor else "bench_service"):
        main()
