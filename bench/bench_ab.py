"""`predict` of this checkout against another one's, side by side: both prediction services on one Redis with the
same live model and feature store, sequential requests sent to them in turn (A, B, B, A, ...) on one keep-alive
connection each, so that a noisy, shared machine slows both alike.

Sets up what `bench_service.py` does (a generated history, a model, its serving state, under a key prefix of its
own in $FRAUD_REDIS_URL), starts the service of this checkout (A) and of `--base` (B, e.g. an export of main:
`git archive main | tar -x -C /tmp/base`) with this venv, and prints per round each one's client-side p50/p99 and
the CPU its process used per request (from /proc), then the medians over the rounds and their ratios A/B.

    . config/env.sh && .venv/bin/python bench/bench_ab.py --base /tmp/base --rounds 5 --requests 1000
"""

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from uuid import uuid4

import aiohttp
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_service as bs  # noqa: E402
from report import recorded

from fraud_poc.launcher import SERVICES, own_control_socket  # noqa: E402


def start(repo: Path, redis_url: str, prefix: str, token: str, log: Path) -> tuple[subprocess.Popen, str]:
    """The prediction service of the checkout at `repo` (its code and configs) on a free port."""
    port = bs.free_port()
    env = {
        **os.environ,
        "FRAUD_REDIS_URL": redis_url,
        "FRAUD_KEY_PREFIX": prefix,
        "FRAUD_API_TOKEN": token,
        "FRAUD_DATA_ROOT": str(bs.REPO / "data"),
        "DASK_SCHEDULER_ADDRESS": "",
        "PYTHONPATH": str(repo),
    }
    cmd = [str(Path(sys.executable).parent / "hopeit_server"), *SERVICES["prediction"].args(port)]
    proc = subprocess.Popen(
        cmd,
        env=own_control_socket(env, "prediction", port),
        cwd=repo,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}: see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/docs/swagger.json", timeout=1):
                return proc, f"http://127.0.0.1:{port}{bs.API}/predict"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"service not ready: see {log}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its children (gunicorn's worker)."""
    return sum(bs.CpuMeter([pid], "redis://127.0.0.1:1")._service().values())


async def rounds(urls: list[str], pids: list[int], source: bs.OrderSource, args: argparse.Namespace) -> None:
    headers = {"Authorization": f"Bearer {bs.BENCH_TOKEN}"}
    sessions = [aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=1)) for _ in urls]
    summary: list[list[tuple[float, float, float]]] = [[] for _ in urls]
    try:
        for _ in range(args.warmup):  # the first requests (connections, caches) are not counted
            for session, url in zip(sessions, urls, strict=True):
                async with session.post(url, json=source.next()) as response:
                    await response.read()
        for r in range(args.rounds):
            took: list[list[float]] = [[] for _ in urls]
            cpu = [cpu_seconds(pid) for pid in pids]
            for i in range(args.requests):
                order = [0, 1] if i % 2 == 0 else [1, 0]
                for k in order:
                    started = time.perf_counter()
                    async with sessions[k].post(urls[k], json=source.next()) as response:
                        await response.read()
                        assert response.status == 200, await response.text()
                    took[k].append(time.perf_counter() - started)
            cpu = [cpu_seconds(pid) - c for pid, c in zip(pids, cpu, strict=True)]
            line = []
            for k, name in enumerate("AB"):
                p50, p99 = np.percentile(took[k], [50, 99]) * 1e3
                per_request = cpu[k] / args.requests * 1e6
                summary[k].append((p50, p99, per_request))
                line.append(f"{name}: p50 {p50:.3f} ms, p99 {p99:.3f} ms, CPU {per_request:.0f} us/request")
            print(f"round {r + 1} ({bs.load_average()}): " + "; ".join(line), flush=True)
    finally:
        for session in sessions:
            await session.close()
    medians = [np.median(np.array(s), axis=0) for s in summary]
    for k, name in enumerate("AB"):
        p50, p99, per_request = medians[k]
        print(
            f"median over rounds, {name}: p50 {p50:.3f} ms, p99 {p99:.3f} ms, CPU {per_request:.0f} us/request"
        )
    ratios = medians[0] / medians[1]
    print(f"A/B: p50 {ratios[0]:.3f}, p99 {ratios[1]:.3f}, CPU {ratios[2]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the other checkout (B)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--requests", type=int, default=1000, help="sequential requests per service and round"
    )
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--orders", type=int, default=30_000)
    parser.add_argument("--customers", type=int, default=1_000)
    parser.add_argument("--trees", type=int, default=50)
    args = parser.parse_args()
    redis_url = os.environ.get("FRAUD_REDIS_URL", "redis://127.0.0.1:6379/0")
    bs.BENCH_TOKEN = secrets.token_urlsafe(24)
    prefix = f"fraudbench:{uuid4().hex}:"
    logs = bs.REPO / "data" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        setup = argparse.Namespace(
            orders=args.orders, customers=args.customers, rounds=args.trees, depth=None
        )
        setup.depth = bs.TrainModelSettings().max_depth
        orders, _ = bs.prepare_store(redis_url, prefix, setup)
        source = bs.OrderSource(
            bs.combinations_from(orders), orders["order_date"].max() + pd.Timedelta(minutes=1)
        )
        urls = []
        for repo, name in ((bs.REPO, "a"), (args.base.resolve(), "b")):
            proc, url = start(repo, redis_url, prefix, bs.BENCH_TOKEN, logs / f"bench-ab-{name}.log")
            procs.append(proc)
            urls.append(url)
        print(f"A: {bs.REPO}\nB: {args.base.resolve()}")
        asyncio.run(rounds(urls, [p.pid for p in procs], source, args))
    finally:
        bs.stop_services(procs, redis_url, prefix)


if __name__ == "__main__":
    with recorded("bench_ab"):
        main()
