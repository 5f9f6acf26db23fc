"""Redis CPU per append-script call (issue 18): this checkout's `APPEND_SCRIPT` against another revision's, A/B.

Loads a generated history's serving state (as `bench_service.py`'s `prepare_store`: `--orders` orders of
`--customers` customers over two months, its records and hourly tiles as prepare-db writes them, no model) twice
into the Redis at $FRAUD_REDIS_URL (or `--redis-url`), under two key prefixes of its own (removed after). Then sends
the same new orders (existing customer/email/ip combinations, as `bench_service.py` sends, one second apart after
the history, plus a `--new-share` of orders through a new IP) to both copies: script A (`--baseline`, a git revision
of `fraud_poc/store/store_scripts.py`) on one and script B (this checkout's) on the other, `--block` calls per
pipeline, taking turns block by block. Each block's server time is `INFO commandstats` usec of `evalsha` over the
block (Redis-wide: run it on a Redis of its own). Every reply of B must equal A's (records decoded), and at the end both copies' keys
must hold the same (records as `decode_state` reads them: B copies the records it keeps as they are, where A packed
them again; tiles, order index, index of values, event log fields).

    unshare -n bash -c 'ip link set lo up; redis-server --port 6390 --save "" --appendonly no --daemonize yes;
      FRAUD_REDIS_URL=redis://127.0.0.1:6390/0 .venv/bin/python bench/bench_script_cpu.py --baseline main'
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from uuid import uuid4

import numpy as np
import pandas as pd
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import recorded  # noqa: E402

from fraud_poc.core.schema import ENTITIES, LABEL_DELAY_DAYS, WINDOW, FeatureSpec  # noqa: E402
from fraud_poc.features.definitions import serving_states  # noqa: E402
from fraud_poc.features.generator import generate_orders  # noqa: E402
from fraud_poc.features.serving_state import decode_state, encoded_states  # noqa: E402
from fraud_poc.store import store_scripts  # noqa: E402
from fraud_poc.store.feature_store import write_entity_states  # noqa: E402
from fraud_poc.store.redis_store import Keys  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VERSION = "cpu-v1"
POINTER = b'{"model_id": "bench-cpu", "fs_version": "cpu-v1"}'


def scripts_at(revision: str) -> ModuleType:
    """`fraud_poc.store.store_scripts` as it is at a git revision (run with this checkout's other modules)."""
    source = subprocess.run(
        ["git", "show", f"{revision}:fraud_poc/store/store_scripts.py"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = ModuleType("fraud_poc.store._scripts_at_" + revision.replace("-", "_"))
    module.__package__ = "fraud_poc.store"
    exec(compile(source, f"{revision}:store_scripts.py", "exec"), module.__dict__)
    return module


class Copy:
    """One copy of the state and the script that appends to it."""

    def __init__(self, r: redis.Redis, name: str, scripts: ModuleType, spec: FeatureSpec):
        self.r, self.name, self.scripts, self.spec = r, name, scripts, spec
        self.keys = Keys(prefix=f"bench-cpu:{uuid4().hex[:8]}:{name}:")
        self.sha = r.script_load(scripts.APPEND_SCRIPT)
        self.pid = r.info("server")["process_id"]
        self.server_us: list[float] = []  # usec per call, per block
        self.cpu_us: list[float] = []  # Redis's main thread's CPU µs per call, per block

    def load(self, encoded: dict) -> None:
        for by in ENTITIES:
            write_entity_states(self.r, self.keys, VERSION, by, encoded[by], chunk_size=500)
        self.r.set(self.keys.live, POINTER)

    def block(self, records: list[tuple]) -> list:
        pipe = self.r.pipeline(transaction=False)
        for record in records:
            keys = self.scripts.script_keys(self.keys, VERSION, record)
            args = self.scripts.script_args(POINTER, self.spec, record, (40.4, -3.7), 1_000_000)
            pipe.evalsha(self.sha, len(keys), *keys, *args)
        before, cpu = evalsha_stats(self.r), on_cpu_ns(self.pid)
        replies = pipe.execute()
        cpu, after = on_cpu_ns(self.pid) - cpu, evalsha_stats(self.r)
        self.server_us.append((after[1] - before[1]) / max(after[0] - before[0], 1))
        self.cpu_us.append(cpu / 1e3 / len(records))
        return replies

    def contents(self) -> dict:
        """What every key of the copy holds (stream entries without their ids), by key name without the prefix."""
        out = {}
        for key in self.r.scan_iter(match=f"{self.keys.prefix}*", count=1000):
            kind = self.r.type(key)
            # records: the same records, however packed
            if kind == b"string" and f"fs:{VERSION}:".encode() in key:
                value = decode_state(self.r.get(key))
            elif kind == b"string":
                value = self.r.get(key)
            elif kind == b"zset":
                value = self.r.zrange(key, 0, -1, withscores=True)
            elif kind == b"hash":
                value = self.r.hgetall(key)
            elif kind == b"stream":
                value = [fields for _, fields in self.r.xrange(key)]
            else:
                raise TypeError(f"{key!r}: {kind!r}")
            out[key[len(self.keys.prefix) :]] = value
        return out

    def cleanup(self) -> None:
        for key in self.r.scan_iter(match=f"{self.keys.prefix}*", count=1000):
            self.r.unlink(key)


def on_cpu_ns(pid: int) -> int:
    """Nanoseconds Redis's main thread has run (`/proc/<pid>/task/<pid>/schedstat`; the server must be local, in
    this PID namespace): unlike usec_per_call, not inflated while the machine's other processes hold the cores."""
    return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0])


def evalsha_stats(r: redis.Redis) -> tuple[int, int]:
    stats = r.info("commandstats").get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    return stats["calls"], stats["usec"]


def comparable(reply: list) -> list:
    """A script reply with each view's records decoded (their bytes may differ, see above)."""
    views = [[None if v[0] is None else decode_state(v[0]), *v[1:]] for v in reply[2:]]
    return [*reply[:2], *views]


def new_orders(history: pd.DataFrame, n: int, new_share: float, seed: int = 0) -> list[tuple]:
    """`n` orders after the history, one a second, through each customer's latest email and IP in turn; a share of
    them through a new IP."""
    latest = history.sort_values("order_date").groupby("customer_id", observed=True).tail(1)
    combos = list(zip(latest["customer_id"], latest["email"], latest["ip_addr"], strict=True))
    rng = np.random.default_rng(seed)
    start_us = int(history["order_date"].max().value // 1000) + 60_000_000
    run = uuid4().hex[:6]
    records = []
    for k in range(n):
        customer, email, ip = combos[k % len(combos)]
        if rng.random() < new_share:
            ip = f"10.{k // 65536 % 256}.{k // 256 % 256}.{k % 256}"
        amount = float(np.round(rng.gamma(2.0, 40.0), 2))
        records.append((f"cpu-{run}-{k}", start_us + k * 1_000_000, customer, email, ip, amount))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="main", help="git revision of script A")
    parser.add_argument("--calls", type=int, default=6_000, help="new orders sent to each copy")
    parser.add_argument("--block", type=int, default=200, help="calls per pipeline and per measurement")
    parser.add_argument("--new-share", type=float, default=0.05, help="share of orders through a new IP")
    parser.add_argument("--orders", type=int, default=30_000, help="orders in the generated history")
    parser.add_argument("--customers", type=int, default=1_000)
    parser.add_argument("--redis-url", default=os.environ.get("FRAUD_REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()
    r = redis.Redis.from_url(args.redis_url)
    spec = FeatureSpec(window=WINDOW, label_delay_days=LABEL_DELAY_DAYS)
    history = generate_orders(
        num_orders=args.orders, num_customers=args.customers, months=2, fraud_rate=0.02, seed=5
    )
    encoded = {
        by: encoded_states(serving_states(history, by, spec.window, spec.label_delay_days), by)
        for by in ENTITIES
    }
    revision = subprocess.run(
        ["git", "rev-parse", "--short", args.baseline], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()
    copies = [Copy(r, "a", scripts_at(args.baseline), spec), Copy(r, "b", store_scripts, spec)]
    try:
        for copy in copies:
            copy.load(encoded)
        tiles = [
            r.zcard(copies[0].keys.fs_tiles(VERSION, by, v.decode()))
            for by in ENTITIES
            for v in r.zrange(copies[0].keys.fs_index(VERSION, by), 0, -1)
        ]
        info = r.info("server")
        print(
            f"Redis {info['redis_version']} at {args.redis_url}; {os.cpu_count()} cores, load "
            f"{os.getloadavg()[0]:.1f}; history {len(history):,} orders, {args.customers:,} customers; tiles per "
            f"value mean {np.mean(tiles):.1f}, p99 {np.percentile(tiles, 99):.0f}, max {max(tiles)}"
        )
        records = new_orders(history, args.calls, args.new_share)
        started = time.perf_counter()
        mismatches = 0
        for k, start in enumerate(range(0, len(records), args.block)):
            block = records[start : start + args.block]
            order = copies if k % 2 == 0 else copies[::-1]
            replies = {copy.name: copy.block(block) for copy in order}
            mismatches += sum(
                comparable(a) != comparable(b) for a, b in zip(replies["a"], replies["b"], strict=True)
            )
        same = copies[0].contents() == copies[1].contents()
        a, b = (statistics.median(c.server_us) for c in copies)
        cpu_a, cpu_b = (statistics.median(c.cpu_us) for c in copies)
        print(
            f"{len(records):,} calls per script ({args.new_share:.0%} through a new IP), {args.block} per pipeline, "
            f"alternating; {time.perf_counter() - started:.1f} s"
        )
        print(f"  A {args.baseline} ({revision}): evalsha usec_per_call median over blocks {a:.1f}")
        print(f"  B this checkout:  evalsha usec_per_call median over blocks {b:.1f}  (B/A {b / a:.2f})")
        print(
            f"  Redis main thread CPU per call (its whole block: the pipeline's reading and replies too), median: "
            f"A {cpu_a:.1f} µs, B {cpu_b:.1f} µs (B/A {cpu_b / cpu_a:.2f})"
        )
        print(f"  replies that differ: {mismatches}; the copies' keys hold the same: {same}")
        if mismatches or not same:
            raise SystemExit("B does not do what A does")
    finally:
        for copy in copies:
            copy.cleanup()


if __name__ == "__main__":
    with recorded("bench_script_cpu"):
        main()
