"""A busy value (issue 18): is an order through an IP with 20,000 orders as cheap to score as one through a new IP?

Against the Redis at $FRAUD_REDIS_URL (or `--redis-url`), under a key prefix of its own (removed after), it sends
`--orders` orders through one IP, evenly over `--days` days (many customers and emails), with the append script
(`fraud_poc.store.store_scripts.APPEND_SCRIPT`, live-pointer check on), 500 EVALSHA per pipeline. After 200, 2,000 and
`--orders` of them it times `--samples` script calls through the busy IP and as many through new IPs (one new IP
per call), taking turns in blocks of 20 (the timed orders go into the state too: "after 200" ends at 300):

- client side: each EVALSHA's round trip (redis-py, one call at a time; a PING's round trip is printed for scale),
  p50, p99 and the longest;
- server side: `INFO commandstats` usec per `evalsha` call over each block (Redis-wide: another client's EVALSHA
  in the same instant would count too);
- control: a PING's round trip after each timed call (its tail is the machine's, e.g. Redis descheduled);
- the IP's state: `MEMORY USAGE ... SAMPLES 0` of its records key and of its tile set, and its number of tiles.

Then, through the busy IP: a batch of 100 orders and one of 500 in one pipeline each (what `predict-batch` sends),
and one late order dated 30 days before the newest (it moves the running sums on the shorter side of its hour,
here its few earlier tiles': the script's longest path, bounded by half the state horizon rather than by the
traffic). The worst case of that path: one customer, email and IP together with an order in every hour of `--days`
days, then late orders of theirs 30 days back and at the middle of their hours (half of the tiles of all three
move), and a fraud label for the middle one (the same half). Others while a busy value loads: single calls through new IPs from a
second connection, while another process sends `--load-rate` orders a second through the busy IP (batches of 10),
against the same calls while it sends as many through new IPs (the same load, no busy value) and with no load.
And what `predict-batch` does with 100 orders through the busy IP, in process (the service's `Scorer` with a
model of 50 trees made live on this version; HTTP's parsing and encoding of the batch are not in it). Last, the
`SLOWLOG` entries of this run (above the server's own `slowlog-log-slower-than`, which is read, not
changed) and the version's order index.

    . config/env.sh && .venv/bin/python bench/bench_busy_value.py
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from pathlib import Path
from uuid import uuid4

import numpy as np
import redis
import redis.asyncio as aioredis
import xgboost as xgb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import recorded

from fraud_poc.core.schema import FEATURE_COLUMNS, LABEL_DELAY_DAYS, WINDOW, FeatureSpec  # noqa: E402
from fraud_poc.core.service_payloads import Order  # noqa: E402
from fraud_poc.features.definitions import hours_of, timestamp_us  # noqa: E402
from fraud_poc.model.tree_walk import load_kernels  # noqa: E402
from fraud_poc.serving.scorer import Scorer  # noqa: E402
from fraud_poc.store.redis_pipe import RedisPipe  # noqa: E402
from fraud_poc.store.redis_store import Keys  # noqa: E402
from fraud_poc.store.store_scripts import (  # noqa: E402
    APPEND_SCRIPT,
    APPEND_SCRIPT_SHA,
    LABEL_SCRIPT,
    label_args,
    label_keys,
    script_args,
    script_keys,
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
VERSION = "busy"
BUSY_IP = "203.0.113.7"
START_US = timestamp_us("2026-01-05")
DAY_US = 86_400_000_000
CHUNK = 500
BLOCK = 20


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.redis = redis.Redis.from_url(args.redis_url)
        self.keys = Keys(prefix=f"bench-busy:{uuid4().hex[:12]}:")
        self.pointer = b'{"model_id": "bench-busy-value", "fs_version": "busy"}'
        self.spec = FeatureSpec(window=args.window, label_delay_days=args.delta)
        self.step_us = args.days * DAY_US // args.orders
        self.sent = 0  # orders sent (ids)
        self.new_ips = 0
        self.pings: list[float] = []  # control: PING round trips between the timed calls

    def record(self, ts_us: int, ip: str) -> tuple:
        k = self.sent
        self.sent += 1
        amount = float(f"{(k * 7_919) % 50_000 + 1}.37")
        return (
            f"o{k:08d}",
            ts_us,
            f"c{(k * 7_919) % 6_000:06d}",
            f"e{(k * 104_729) % 9_000:06d}@ex.com",
            ip,
            amount,
        )

    def new_ip(self, used: bool = True, n: int | None = None) -> str:
        """A new IP (`used`), or the `n`-th one handed out."""
        if n is None:
            self.new_ips += used
            n = self.new_ips
        return f"198.51.{n // 256}.{n % 256}"

    def command(self, record: tuple) -> list:
        keys = script_keys(self.keys, VERSION, record)
        args = script_args(self.pointer, self.spec, record)
        return [APPEND_SCRIPT_SHA, len(keys), *keys, *args]

    def pipelined(self, records: list[tuple]) -> float:
        """Send `records` in one pipeline; seconds it took."""
        pipe = self.redis.pipeline(transaction=False)
        for record in records:
            pipe.evalsha(*self.command(record))
        started = time.perf_counter()
        replies = pipe.execute()
        elapsed = time.perf_counter() - started
        if not all(len(reply) == 5 and reply[0] == self.pointer for reply in replies):
            raise RuntimeError("a script call did not write (pointer check failed?)")
        return elapsed

    def evalsha_stats(self) -> tuple[int, int]:
        stats = self.redis.info("commandstats").get("cmdstat_evalsha", {"calls": 0, "usec": 0})
        return stats["calls"], stats["usec"]

    def timed_block(self, records: list[tuple]) -> tuple[list[float], float]:
        """Client-side µs of each call (one at a time) and the server's usec per evalsha over the block."""
        calls0, usec0 = self.evalsha_stats()
        times = []
        for record in records:
            command = self.command(record)
            started = time.perf_counter_ns()
            reply = self.redis.evalsha(*command)
            times.append((time.perf_counter_ns() - started) / 1e3)
            if len(reply) != 5:
                raise RuntimeError("a script call did not write")
            started = time.perf_counter_ns()
            self.redis.ping()
            self.pings.append((time.perf_counter_ns() - started) / 1e3)
        calls1, usec1 = self.evalsha_stats()
        return times, (usec1 - usec0) / max(calls1 - calls0, 1)

    def state(self, ip: str) -> tuple[int, int, int]:
        records = self.keys.fs_state(VERSION, "ip_addr", ip)
        tiles = self.keys.fs_tiles(VERSION, "ip_addr", ip)
        return (
            self.redis.memory_usage(records, samples=0) or 0,
            self.redis.memory_usage(tiles, samples=0) or 0,
            self.redis.zcard(tiles),
        )

    def cleanup(self) -> int:
        removed = 0
        for key in self.redis.scan_iter(match=f"{self.keys.prefix}*", count=1000):
            removed += self.redis.unlink(key)
        return removed


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def run(bench: Bench, args: argparse.Namespace) -> None:
    r = bench.redis
    r.script_load(APPEND_SCRIPT)
    r.set(bench.keys.live, bench.pointer)
    threshold = int(r.config_get("slowlog-log-slower-than")["slowlog-log-slower-than"])
    slowlog_from = max((entry["id"] for entry in r.slowlog_get(1)), default=-1)
    pings = []
    for _ in range(200):
        started = time.perf_counter_ns()
        r.ping()
        pings.append((time.perf_counter_ns() - started) / 1e3)
    print(
        f"busy value: {args.orders} orders through one IP over {args.days} days (one every "
        f"{bench.step_us / 1e6:.1f} s), W = {bench.spec.window}, δ = {bench.spec.label_delay_days} (state horizon {bench.spec.horizon_hours} h); "
        f"{args.samples} timed calls per kind and size"
    )
    print(
        f"Redis {args.redis_url} (prefix {bench.keys.prefix}); {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.1f}; PING round trip p50 {statistics.median(pings):.0f} µs"
    )
    header = (
        f"{'busy orders':>11} | {'busy IP µs p50':>14} {'p99':>6} {'max':>6} {'srv':>5} | "
        f"{'new IP µs p50':>13} {'p99':>6} {'max':>6} {'srv':>5} | {'busy/new p50':>12} {'srv':>5} | "
        f"{'records B':>9} {'tiles':>5} {'tiles B':>8}"
    )
    print(header)
    print("-" * len(header))
    checkpoints = sorted({n for n in (200, 2_000, args.orders) if n <= args.orders})
    loaded, ts = 0, START_US
    longest = 0.0
    for checkpoint in checkpoints:
        stream = []
        for _ in range(checkpoint - loaded):
            stream.append(bench.record(ts, BUSY_IP))
            ts += bench.step_us
        for start in range(0, len(stream), CHUNK):
            bench.pipelined(stream[start : start + CHUNK])
        loaded = checkpoint
        # timed calls between this order and the next one of the stream (1 ms apart)
        probe_ts = ts - bench.step_us + 1_000
        busy, new, busy_srv, new_srv = [], [], [], []
        for _ in range(max(args.samples // BLOCK, 1)):
            records = []
            for _ in range(BLOCK):
                records.append(bench.record(probe_ts, BUSY_IP))
                probe_ts += 1_000
            times, srv = bench.timed_block(records)
            busy += times
            busy_srv.append(srv)
            records = []
            for _ in range(BLOCK):
                records.append(bench.record(probe_ts, bench.new_ip()))
                probe_ts += 1_000
            times, srv = bench.timed_block(records)
            new += times
            new_srv.append(srv)
        longest = max(longest, *busy, *new)
        records_bytes, tiles_bytes, tiles = bench.state(BUSY_IP)
        b50, n50 = statistics.median(busy), statistics.median(new)
        bs, ns = statistics.median(busy_srv), statistics.median(new_srv)
        print(
            f"{checkpoint:>11} | {b50:>14.0f} {percentile(busy, 99):>6.0f} {max(busy):>6.0f} {bs:>5.0f} | "
            f"{n50:>13.0f} {percentile(new, 99):>6.0f} {max(new):>6.0f} {ns:>5.0f} | {b50 / n50:>12.2f} "
            f"{bs / ns:>5.2f} | {records_bytes:>9} {tiles:>5} {tiles_bytes:>8}"
        )
    new_records, new_tiles, _ = bench.state(bench.new_ip(used=False, n=1))
    print(
        f"(a new IP after one order: records {new_records} B, tiles {new_tiles} B; srv: server usec per call)"
    )

    probe_ts = ts
    for size in (100, 500):
        calls0, usec0 = bench.evalsha_stats()
        records = []
        for _ in range(size):
            records.append(bench.record(probe_ts, BUSY_IP))
            probe_ts += 1_000
        elapsed = bench.pipelined(records)
        calls1, usec1 = bench.evalsha_stats()
        print(
            f"batch of {size} orders through the busy IP in one pipeline: {elapsed * 1e3:.1f} ms "
            f"(server {(usec1 - usec0) / 1e3:.1f} ms, {(usec1 - usec0) / max(calls1 - calls0, 1):.0f} usec per call)"
        )
    late_ts = probe_ts - 30 * DAY_US
    times, srv = bench.timed_block([bench.record(late_ts, BUSY_IP)])
    longest = max(longest, *times)
    print(
        f"late order through the busy IP, dated 30 days before its newest (~{30 * 24} later tiles: the earlier move): "
        f"{times[0]:.0f} µs (server {srv:.0f} usec)"
    )
    records_bytes, tiles_bytes, tiles = bench.state(BUSY_IP)
    print(f"busy IP state at the end: records {records_bytes} B, {tiles} tiles {tiles_bytes} B")
    longest = max(longest, worst_late_order(bench, args))
    asyncio.run(scored_batch(bench, args))
    others_while_loading(bench, args)
    print(f"longest single script call seen by the client: {longest / 1e3:.2f} ms")
    pings = bench.pings
    print(
        f"control, a PING after each timed call: p50 {statistics.median(pings):.0f} µs, p99 "
        f"{percentile(pings, 99):.0f} µs, max {max(pings):.0f} µs (a tail here is the machine, not the script)"
    )
    mine = [
        entry
        for entry in r.slowlog_get(128)
        if entry["id"] > slowlog_from
        and any(bench.keys.prefix.encode() in bytes(a) for a in entry["command"].split())
    ]
    print(
        f"SLOWLOG entries of this run above {threshold} µs: {len(mine)}"
        + "".join(f"; {e['command'].split()[0].decode()} {e['duration']} µs" for e in mine[:6])
        + (" (commands run by a script are logged on their own too)" if mine else "")
    )
    orders_key = bench.keys.fs_orders(VERSION)
    print(
        f"order index {orders_key}: {r.hlen(orders_key)} entries, "
        f"{(r.memory_usage(orders_key, samples=0) or 0) / 1e6:.1f} MB (one entry per scored order, every value)"
    )


def worst_late_order(bench: Bench, args: argparse.Namespace) -> float:
    """One customer, email and IP with an order every hour of `--days` days, then late orders of theirs: 30 days
    back (the few earlier tiles' running sums move), and at the middle of their hours, the worst case (half of each
    set's tiles move, whichever side); then a fraud label for that middle order (the same half). Prints them and
    returns the longest client-side µs."""
    triple = ("c-worst", "worst@ex.com", "192.0.2.99")
    ts, stream = START_US, []
    for _ in range(args.days * 24):
        k = bench.sent
        bench.sent += 1
        stream.append((f"o{k:08d}", ts, *triple, 10.37))
        ts += 3_600_000_000
    for start in range(0, len(stream), CHUNK):
        bench.pipelined(stream[start : start + CHUNK])
    tiles_key = bench.keys.fs_tiles(VERSION, "ip_addr", triple[2])
    newest = hours_of(ts - 3_600_000_000)
    tiles = bench.redis.zcard(tiles_key)
    middle = newest - tiles // 2
    longest = 0.0
    for what, late_ts in (
        ("30 days back", ts - 30 * DAY_US),
        ("at the middle of its hours", middle * 3_600_000_000),
    ):
        late = (f"o{bench.sent:08d}", late_ts + 1_800_000_000, *triple, 10.37)
        bench.sent += 1
        hour = hours_of(late[1])
        sides = bench.redis.zcount(tiles_key, "-inf", hour), bench.redis.zcount(tiles_key, f"({hour}", "+inf")
        times, srv = bench.timed_block([late])
        longest = max(longest, times[0])
        print(
            f"worst case: a late order ({what}; tiles at or before its hour / after it {sides[0]} / {sides[1]}) of "
            f"a customer, email and IP with {tiles} tiles each: {times[0]:.0f} µs (server {srv:.0f} usec)"
        )
    keys = label_keys(bench.keys, VERSION)
    label = bench.redis.script_load(LABEL_SCRIPT)
    calls0, usec0 = bench.evalsha_stats()
    started = time.perf_counter_ns()
    reply = bench.redis.evalsha(
        label,
        len(keys),
        *keys,
        *label_args(bench.pointer, bench.keys, VERSION, late[0], True, late[1] + 60_000_000),
    )
    label_us = (time.perf_counter_ns() - started) / 1e3
    calls1, usec1 = bench.evalsha_stats()
    if reply[1] != b"ok" or reply[3] != 3:
        raise RuntimeError(f"the label did not change the three states: {reply}")
    print(
        f"worst case: a fraud label for that middle order (its three states): {label_us:.0f} µs "
        f"(server {(usec1 - usec0) / max(calls1 - calls0, 1):.0f} usec)"
    )
    return max(longest, label_us)


async def scored_batch(bench: Bench, args: argparse.Namespace) -> None:
    """`Scorer.predict` of 100 orders through the busy IP at once (what `predict-batch` runs), with a model of 50
    trees made live on this version."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2_000, len(FEATURE_COLUMNS)))
    booster = xgb.train(
        {"max_depth": 6, "objective": "binary:logistic", "nthread": 1}, xgb.DMatrix(x, x[:, 0] > 1), 50
    )
    spec = bench.spec
    metadata = {"feature_columns": FEATURE_COLUMNS, "feature_spec": spec.to_json(), "threshold": 0.5}
    model = json.loads(bench.pointer)["model_id"]
    bench.redis.hset(
        bench.keys.model(model),
        mapping={"booster": bytes(booster.save_raw("ubj")), "metadata": json.dumps(metadata)},
    )
    scorer = Scorer(aioredis.Redis.from_url(args.redis_url), RedisPipe(args.redis_url), bench.keys, top_k=5)
    load_kernels()  # as a service worker does before it listens (`service.common.load_compiled_walk_in_workers`)
    await scorer.current()  # the model loaded, as after a worker's first request
    ts = START_US + (args.days + 2) * DAY_US
    times = []
    for _ in range(5):
        orders = []
        for _ in range(100):
            record = bench.record(ts, BUSY_IP)
            ts += 1_000
            orders.append(
                Order(
                    order_id=record[0],
                    order_date=EPOCH + timedelta(microseconds=record[1]),
                    customer_id=record[2],
                    email=record[3],
                    ip_addr=record[4],
                    order_amount=record[5],
                    location_lat=0.0,
                    location_long=0.0,
                )
            )
        started = time.perf_counter()
        predictions = await scorer.predict(orders)
        times.append((time.perf_counter() - started) * 1e3)
        assert len(predictions) == 100
    print(
        f"Scorer.predict of 100 orders through the busy IP (what predict-batch runs, in process): "
        f"median {statistics.median(times):.1f} ms, max {max(times):.1f} ms over {len(times)} batches"
    )


def _load(
    args: argparse.Namespace, bench: Bench, busy: bool, ts: int, stop: Event, sent: Synchronized
) -> None:
    """Child process: `args.load_rate` orders a second, in batches of 10, through the busy IP (`busy`) or each
    through a new IP, until `stop`; counts them in `sent`."""
    loader = Bench(args)  # a connection of its own
    loader.keys, loader.pointer, loader.sent = bench.keys, bench.pointer, 2 * 10**7 + busy * 10**7
    loader.new_ips = 10**6  # apart from the probe's
    period, due = 10 / args.load_rate, time.perf_counter()
    while not stop.is_set():
        loader.pipelined(
            [loader.record(ts + i * 1_000, BUSY_IP if busy else loader.new_ip()) for i in range(10)]
        )
        ts += 10_000
        with sent.get_lock():
            sent.value += 10
        due += period
        time.sleep(max(due - time.perf_counter(), 0))


def others_while_loading(bench: Bench, args: argparse.Namespace) -> None:
    """Single calls through new IPs from a second connection: with no load, while another process sends
    `--load-rate` orders a second through the busy IP, and while it sends as many through new IPs (the same load
    without a busy value: what any traffic at that rate costs the others on this machine)."""
    probe = Bench(args)
    probe.keys, probe.pointer, probe.sent = bench.keys, bench.pointer, 10**7  # same version, other ids
    ts = START_US + args.days * DAY_US

    def calls(n: int) -> list[float]:
        nonlocal ts
        records = []
        for _ in range(n):
            records.append(probe.record(ts, probe.new_ip()))
            ts += 1_000
        return probe.timed_block(records)[0]

    def under_load(busy: bool) -> tuple[list[float], int]:
        context = multiprocessing.get_context("fork")
        stop, sent = context.Event(), context.Value("q", 0)
        loader = context.Process(target=_load, args=(args, bench, busy, ts + DAY_US, stop, sent))
        loader.start()
        try:
            time.sleep(0.2)  # the loader connected and at its rate
            return calls(10_000), sent.value
        finally:
            stop.set()
            loader.join()

    quiet = calls(10_000)
    busy, sent_busy = under_load(busy=True)
    ordinary, sent_ordinary = under_load(busy=False)

    def summary(latencies: list[float]) -> str:
        return f"p50 {statistics.median(latencies):.0f} µs, p99 {percentile(latencies, 99):.0f} µs"

    print(
        f"others (new-IP calls from another connection) while another process sends {args.load_rate} orders/s: "
        f"through the busy IP ({sent_busy} sent) {summary(busy)}; through new IPs ({sent_ordinary} sent) "
        f"{summary(ordinary)}; with no load {summary(quiet)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=20_000, help="orders through the busy IP")
    parser.add_argument("--days", type=int, default=36, help="days they span")
    parser.add_argument("--samples", type=int, default=100, help="timed calls per kind at each size")
    parser.add_argument("--load-rate", type=int, default=1_000, help="orders/s through the busy IP meanwhile")
    parser.add_argument("--window", type=int, default=WINDOW, help="W")
    parser.add_argument("--delta", type=int, default=LABEL_DELAY_DAYS, help="δ (label_delay_days)")
    parser.add_argument("--redis-url", default=os.environ.get("FRAUD_REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()
    bench = Bench(args)
    started = time.perf_counter()
    try:
        run(bench, args)
    finally:
        removed = bench.cleanup()
        print(
            f"removed {removed} keys under {bench.keys.prefix}; {time.perf_counter() - started:.1f} s in all"
        )


if __name__ == "__main__":
    with recorded("bench_busy_value"):
        main()
