"""What the embedded Redis's append-only file costs (issue 22): `appendfsync everysec` (the default) against `always`.

For each mode it starts the embedded Redis as `fraud_poc.store.redis_server` does (a fresh data folder, the append-only
file on), on a port of its own, and sends the append script (`fraud_poc.store.store_scripts.APPEND_SCRIPT`, one call per
new order of a new customer, email and IP, as `predict` does), then prints:

- one call at a time (a request alone): each EVALSHA's round trip, p50 / p99 / longest;
- `--fixed-rate` calls a second from one connection for `--seconds` (a steady load): p50 / p99 of the round trips;
- pipelines of 100 calls (what the service's ScriptBatcher sends under load): calls per second;
- Redis's CPU time per call (`INFO cpu`, user + sys), and the AOF's size.

`always` fsyncs before answering each write (one fsync per pipeline: Redis groups the writes of one event-loop
turn), so its cost is the disk's fsync latency; run it on the disk the data root is on.

    .venv/bin/python bench/bench_aof.py [--calls 2000] [--fixed-rate 200] [--seconds 10] [--port 18490]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import redis
from report import recorded

from fraud_poc.core.schema import FeatureSpec
from fraud_poc.store.redis_server import start_embedded_redis, stop_embedded_redis
from fraud_poc.store.redis_store import Keys
from fraud_poc.store.store_scripts import APPEND_SCRIPT, APPEND_SCRIPT_SHA, script_args, script_keys

KEYS = Keys("bench-aof:")


def call(n: int) -> list:
    """EVALSHA arguments of a new order n of its own customer, email and IP, dated now."""
    record = (f"o{n}", int(time.time() * 1e6), f"c{n}", f"e{n}@x.io", f"ip{n}", 25.5)
    keys = script_keys(KEYS, "v1", record)
    return ["EVALSHA", APPEND_SCRIPT_SHA, len(keys), *keys, *script_args(b"p1", FeatureSpec(), record)]


def quantiles(seconds: list[float]) -> str:
    ms = sorted(s * 1e3 for s in seconds)
    return (
        f"p50 {statistics.median(ms):.3f} ms, p99 {ms[int(0.99 * (len(ms) - 1))]:.3f} ms, max {ms[-1]:.3f} ms"
    )


def cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def measure(mode: str, port: int, calls: int, rate: float, seconds: float, folder: Path) -> None:
    url = f"redis://127.0.0.1:{port}/0"
    proc = start_embedded_redis(url, folder, appendfsync=mode)
    try:
        client = redis.Redis.from_url(url)
        client.set(KEYS.live, b"p1")
        client.script_load(APPEND_SCRIPT)
        n, cpu_before = 0, cpu(client)
        alone = []
        for _ in range(calls):
            started = time.perf_counter()
            client.execute_command(*call(n))
            alone.append(time.perf_counter() - started)
            n += 1
        steady, start = [], time.perf_counter()
        for k in range(int(rate * seconds)):
            time.sleep(max(0.0, start + k / rate - time.perf_counter()))
            started = time.perf_counter()
            client.execute_command(*call(n))
            steady.append(time.perf_counter() - started)
            n += 1
        pipelined, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            pipe = client.pipeline(transaction=False)
            for _ in range(100):
                pipe.execute_command(*call(n))
                n += 1
            pipe.execute()
            pipelined += 100
        throughput = pipelined / (time.perf_counter() - started)
        per_call = (cpu(client) - cpu_before) / n * 1e6
        aof = (folder / "fraud-poc.aof").stat().st_size
        print(f"appendfsync {mode}:")
        print(f"  one call at a time ({calls}): {quantiles(alone)}")
        print(f"  {rate:g} calls/s for {seconds:g} s: {quantiles(steady)}")
        print(f"  pipelines of 100: {throughput:,.0f} calls/s")
        print(f"  Redis CPU {per_call:.0f} us per call; AOF {aof / 2**20:.1f} MB after {n:,} calls")
    finally:
        stop_embedded_redis(proc)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--fixed-rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--port", type=int, default=18490)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the data folders go (default: a temp dir)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        print(f"data folders under {tmp}")
        for mode in ("everysec", "always", "everysec"):  # everysec twice: the first run warms the machine up
            measure(
                mode,
                args.port,
                args.calls,
                args.fixed_rate,
                args.seconds,
                Path(tmp) / f"{mode}-{time.time()}",
            )


if __name__ == "__main__":
    with recorded("bench_aof"):
        main()
