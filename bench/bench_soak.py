"""Soak: `predict` at a fixed rate for a minute while a pipeline runs on the training service.

It starts both services as the README runs them (on their own ports, under a key prefix and a data root of their
own, against $FRAUD_REDIS_URL or `--redis-url`), runs a first small pipeline so that a model is live, then starts a
second pipeline (`--soak-orders`) and, at the same moment, sends `predict` requests in an open loop at `--rate`
for `--duration` seconds (bench_service.py's HTTP client; latency from each request's send; every answer other than
200 counts as an error). It prints the errors (the soak should have none), the latency percentiles, the
pipeline's progress while the load ran, and both services' memory (RSS of the server process, and of the
training service's Dask workers) at the start and the end.

Not part of CI: it takes two to three minutes and both cores.

    . config/env.sh && FRAUD_REDIS_URL=redis://127.0.0.1:6379/10 .venv/bin/python bench/bench_soak.py --rate 100
"""

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from uuid import uuid4

import aiohttp
import pandas as pd
import psutil
import redis
import uvloop
from bench_service import (
    Errors,
    HttpConnection,
    OrderSource,
    Target,
    combinations_from,
    free_port,
    percentiles,
    send,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report import recorded  # noqa: E402

from fraud_poc.launcher import SERVICE_API, SERVICES, TRAINING_API  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="predict requests per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument(
        "--first-orders", type=int, default=30_000, help="orders of the run that makes a model live"
    )
    parser.add_argument("--soak-orders", type=int, default=300_000, help="orders of the run during the load")
    parser.add_argument("--redis-url", default=os.environ.get("FRAUD_REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--training-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--prediction-port", type=int, default=0, help="default: a free port")
    return parser.parse_args()


class Services:
    """Both services, as the README starts them, under a key prefix and a data root of this run."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.token, self.prefix = secrets.token_urlsafe(24), f"soak:{uuid4().hex[:8]}:"
        self.data_root = workdir / "data"
        self.logs = REPO / "data" / "logs" / f"bench-soak-{time.strftime('%Y%m%d-%H%M%S')}"
        self.logs.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FRAUD_", "DASK_"))}
        env.update(
            FRAUD_REDIS_URL=args.redis_url,
            FRAUD_KEY_PREFIX=self.prefix,
            FRAUD_DATA_ROOT=str(self.data_root),
            FRAUD_API_TOKEN=self.token,
            FRAUD_FIND_ORDERS_ENABLED="false",
            FRAUD_PREDICT_REQUIRES_TOKEN="false",
            DASK_SCHEDULER_ADDRESS="",
        )
        self.procs: dict[str, subprocess.Popen] = {}
        self.bases: dict[str, str] = {}
        for name, port in (("training", args.training_port), ("prediction", args.prediction_port)):
            port = port or free_port()
            cmd = [str(Path(sys.executable).parent / "hopeit_server"), *SERVICES[name].args(port, REPO)]
            log = (self.logs / f"{name}.log").open("wb")
            self.procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            api = TRAINING_API if name == "training" else SERVICE_API
            self.bases[name] = f"http://127.0.0.1:{port}{api}"
        for name, proc in self.procs.items():
            self._wait_ready(name, proc, self.logs / f"{name}.log")

    def _wait_ready(self, name: str, proc: subprocess.Popen, log: Path) -> None:
        docs = self.bases[name].split("/api/")[0] + "/api/docs/swagger.json"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} service exited: see {log}")
            try:
                with urllib.request.urlopen(docs, timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"{name} service not ready: see {log}")

    def rss_mb(self) -> dict[str, float]:
        """RSS of each server process, and of its child processes (training: the Dask cluster; prediction: the
        gunicorn worker)."""
        rss = {}
        for name, proc in self.procs.items():
            process = psutil.Process(proc.pid)
            rss[name] = process.memory_info().rss / 2**20
            children = process.children(recursive=True)
            if children:
                rss[f"{name} children ({len(children)})"] = sum(_rss(child) for child in children) / 2**20
        return rss

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.NoSuchProcess:
        return 0


async def start_run(session: aiohttp.ClientSession, services: Services, num_orders: int) -> str:
    body = {"num_orders": num_orders, "num_customers": max(600, num_orders // 50), "months": 3, "seed": 7}
    headers = {"Authorization": f"Bearer {services.token}"}
    async with session.post(f"{services.bases['training']}/run-pipeline", json=body, headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"run-pipeline answered {r.status}: {await r.text()}")
        return (await r.json())["run_id"]


async def run_status(session: aiohttp.ClientSession, services: Services, run_id: str) -> dict:
    async with session.get(f"{services.bases['training']}/pipeline-status", params={"run_id": run_id}) as r:
        if r.status != 200:
            raise RuntimeError(f"pipeline-status answered {r.status}: {await r.text()}")
        return await r.json()


async def follow(session: aiohttp.ClientSession, services: Services, run_id: str, until: float) -> dict:
    """Poll the run until it ends or the clock passes `until`; prints each step as it finishes."""
    printed: set[str] = set()
    started = time.monotonic()
    while True:
        status = await run_status(session, services, run_id)
        for step in status["steps"]:
            if step["state"] in ("done", "failed", "skipped") and step["step"] not in printed:
                printed.add(step["step"])
                print(f"    {run_id}  {time.monotonic() - started:5.1f} s  {step['step']}: {step['state']}")
        if status["state"] in ("done", "failed") or time.monotonic() > until:
            return status
        await asyncio.sleep(1.0)


async def keep_running(session: aiohttp.ClientSession, services: Services, orders: int, until: float) -> list:
    """Pipeline runs one after the other until the clock passes `until`; the status of each."""
    runs = []
    while time.monotonic() < until:
        runs.append(await follow(session, services, await start_run(session, services, orders), until))
    return runs


class FreshConnections:
    """Keep-alive connections to the service, each reused only while it has been idle less than `max_idle`
    seconds: the service closes idle ones after 2 s (gunicorn's keepalive), and a request written while that close
    is under way fails on the client's side without the service ever seeing it."""

    def __init__(self, target: Target, max_idle: float = 1.0):
        self.target, self.max_idle, self.idle = target, max_idle, []

    async def get(self) -> HttpConnection:
        now = time.monotonic()
        while self.idle:
            connection, since = self.idle.pop()
            if now - since < self.max_idle and not connection.transport.is_closing():
                return connection
            connection.transport.close()
        return await self.target.connect()

    def put(self, connection: HttpConnection) -> None:
        self.idle.append((connection, time.monotonic()))

    def close(self) -> None:
        for connection, _ in self.idle:
            connection.transport.close()


async def predict_at_rate(target: Target, source: OrderSource, rate: float, duration: float) -> None:
    """Open loop: one request every 1/rate s whatever the answers; prints errors and latency from each send."""
    connections, errors, latencies = FreshConnections(target), Errors(), []
    prepared = target.requests(source, int(rate * duration))  # built before the clock starts

    async def one(data: bytes) -> None:
        connection = await connections.get()
        sent = time.perf_counter()
        if await send(connection, data, errors):
            connections.put(connection)
        else:
            connection.transport.close()
        latencies.append(time.perf_counter() - sent)

    start, tasks = time.perf_counter(), []
    for i, data in enumerate(prepared):
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(one(data)))
    await asyncio.gather(*tasks)
    connections.close()
    print(f"  predict: {len(prepared)} requests in {time.perf_counter() - start:.1f} s, {errors}")
    print(f"  latency: {percentiles(latencies)}  (load {os.getloadavg()[0]:.1f})")


def print_rss(when: str, rss: dict[str, float]) -> None:
    print(f"  RSS {when}: " + ", ".join(f"{name} {mb:.0f} MB" for name, mb in rss.items()))


async def soak(args: argparse.Namespace, services: Services) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        print(f"first run ({args.first_orders:,} orders), to make a model live:")
        first_id = await start_run(session, services, args.first_orders)
        first = await follow(session, services, first_id, until=time.monotonic() + 600)
        if not (first["state"] == "done" and first["promoted"]):
            raise RuntimeError(f"the first run did not make a model live: {json.dumps(first)[:2000]}")
        raw = sorted((services.data_root / "runs" / first_id / "raw").glob("*.parquet"))
        orders = pd.concat([pd.read_parquet(f) for f in raw], ignore_index=True)
        source = OrderSource(combinations_from(orders), orders["order_date"].max() + pd.Timedelta(minutes=1))
        target = Target([services.bases["prediction"]])

        rss_start = services.rss_mb()
        print(
            f"soak: predict at {args.rate:.0f} req/s for {args.duration:.0f} s while runs of "
            f"{args.soak_orders:,} orders go through the six steps, one after the other"
        )
        until = time.monotonic() + args.duration
        pipelines = asyncio.create_task(keep_running(session, services, args.soak_orders, until))
        await predict_at_rate(target, source, args.rate, args.duration)
        runs = await pipelines
        rss_end = services.rss_mb()
        if runs[-1]["state"] not in ("done", "failed"):  # still running when the load ended
            runs[-1] = await follow(session, services, runs[-1]["run_id"], until=time.monotonic() + 900)
        states = ", ".join(f"{r['state']} (promoted {r['promoted']})" for r in runs)
        print(f"  pipeline runs started during the load: {len(runs)}: {states}")
        print_rss("at start", rss_start)
        print_rss("at end  ", rss_end)
        print(f"  service logs: {services.logs}")


def main() -> None:
    args = parse_args()
    print(f"Redis {args.redis_url}; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as workdir:
        services = Services(args, Path(workdir))
        try:
            uvloop.run(soak(args, services))
        finally:
            services.stop()
            r = redis.Redis.from_url(args.redis_url)
            for key in r.scan_iter(match=f"{services.prefix}*", count=1000):
                r.unlink(key)


if __name__ == "__main__":
    with recorded("bench_soak"):
        main()
