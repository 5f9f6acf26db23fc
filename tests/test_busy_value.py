"""A busy value (issue 18): 20,000 orders through one IP over 36 days, against the append script in real Redis.

No timings here (see `bench/bench_busy_value.py`), only work and size, which are deterministic:

- the Redis commands the script runs for an order through the busy IP are the same, command by command, at 2,000
  and 20,000 orders (sets beyond `SMALL_TILE_SET` tiles: one lookup per window edge), fewer at 200 (a small set, read
  whole), and differ there from an order through a fresh IP only by that IP's tiles read, its index entry and its
  hour's existing tile (counted with `INFO commandstats` around the call inside MULTI/EXEC, so no other client's
  command can slip in); a late order, the longest path, runs as many through 20,000 orders as through 2,000 over
  the same hours and rewrites at most half of a set's tiles (the shorter side of its hour), 30 days back and at the
  middle of the IP's hours;
- the IP's records key has the same `MEMORY USAGE` at 200, 2,000 and 20,000 orders (its last W orders), and its tile
  set holds one tile per hour with orders within the state horizon: as many as an IP with 2,000 orders over the same
  hours, whatever the traffic;
- the features served for an order through the busy IP (from the script's reply, as `scorer.entity_view_of` reads
  it) equal `compute_features` on the same history.

Counting commands does not see a command whose own cost grows (a `ZRANGE key 0 -1`); the sizes and the bench do.

The orders go in in time order, 500 EVALSHA per redis-py pipeline, with the live-pointer check on. δ = 3 makes
the 36 days longer than the state horizon (33 days), so tiles also leave it; δ = 7 is the default.
"""

from dataclasses import dataclass, field

import msgpack
import numpy as np
import pandas as pd
import pytest

from fraud_poc.core.schema import ENTITIES, TILE_FIELDS, WINDOW, FeatureSpec, time_feature_columns
from fraud_poc.features.definitions import (
    compute_features,
    hours_of,
    serving_features,
    state_horizon_hours,
    window_edges,
)
from fraud_poc.serving.scorer import entity_view_of
from fraud_poc.store.redis_store import Keys
from fraud_poc.store.store_scripts import (
    APPEND_SCRIPT,
    APPEND_SCRIPT_SHA,
    SMALL_TILE_SET,
    script_args,
    script_keys,
)

VERSION = "busy"
POINTER = b'{"model_id": "busy-value-test", "fs_version": "busy"}'
START_US = int(pd.Timestamp("2026-01-05", tz="UTC").value // 1000)
DAYS = 36
SPAN_US = DAYS * 86_400_000_000
BUSY_IP, MEDIUM_IP = "203.0.113.7", "203.0.113.8"
N_BUSY, N_MEDIUM = 20_000, 2_000
CHECKPOINTS = (200, 2_000, 20_000)  # busy orders loaded when an order is probed
CHUNK = 500  # EVALSHA per pipeline
IP_TIME_COLUMNS = time_feature_columns("ip_addr")


def busy_orders() -> list[tuple]:
    """20,000 orders through `BUSY_IP` and 2,000 through `MEDIUM_IP`, each evenly over the same 36 days, in time order.

    Many customers and emails; fixed-width ids and amounts with cents that are not exact in float32, so every stored
    record packs to the same number of bytes (the records key's size can only change with the number of records)."""
    step, every = SPAN_US // N_BUSY, N_BUSY // N_MEDIUM
    orders = []
    for ip, prefix, n in ((BUSY_IP, "b", N_BUSY), (MEDIUM_IP, "m", N_MEDIUM)):
        for i in range(n):
            # the medium IP's orders fall between the busy IP's, in the same first and last hours
            at = i * step if ip == BUSY_IP else (every * i + every - 1) * step + step // 2
            k = i if ip == BUSY_IP else every * i
            amount = float(f"{(k * 7_919) % 50_000 + 1}.37")
            customer, email = f"c{(k * 7_919) % 6_000:06d}", f"e{(k * 104_729) % 9_000:06d}@example.com"
            orders.append((f"{prefix}{i:08d}", START_US + at, customer, email, ip, amount))
    return sorted(orders, key=lambda r: (r[1], r[0]))


def probe(name: str, ts_us: int, ip: str) -> tuple:
    """An order through `ip` with a customer and an email never seen before (same shape at every checkpoint)."""
    return (f"p{name}", ts_us, f"q{name}", f"q{name}@probe.test", ip, 123.37)


def command_counts(before: dict, after: dict) -> dict[str, int]:
    """Calls per command between two `INFO commandstats`, without the INFO and EVALSHA that measured them."""
    counts = {}
    for name, stats in after.items():
        delta = stats["calls"] - before.get(name, {"calls": 0})["calls"]
        command = name.removeprefix("cmdstat_")
        if delta and command not in ("info", "evalsha"):
            counts[command] = delta
    return counts


@dataclass
class Checkpoint:
    busy: int  # busy orders loaded before the probes
    busy_commands: dict[str, int]
    fresh_commands: dict[str, int]
    busy_probe: tuple
    busy_reply: list
    records_bytes: int
    tiles_bytes: int
    tiles: int


@dataclass
class Late:
    """A late order through an IP: the IP's tiles at or before its hour and after it then, the commands the script
    ran and the tiles it rewrote."""

    sides: tuple[int, int]
    commands: dict[str, int]
    rewritten: int


@dataclass
class Loaded:
    label_delay_days: int
    keys: Keys
    history: list[tuple] = field(default_factory=list)  # every order sent, probes included, in send order
    checkpoints: dict[int, Checkpoint] = field(default_factory=dict)
    medium_tiles: int = 0
    medium_tiles_bytes: int = 0
    late: dict[tuple[str, str], "Late"] = field(default_factory=dict)  # by (kind, IP)

    def ip_keys(self, ip: str) -> tuple[str, str]:
        return self.keys.fs_state(VERSION, "ip_addr", ip), self.keys.fs_tiles(VERSION, "ip_addr", ip)


def call_of(loaded: Loaded, record: tuple) -> list:
    keys = script_keys(loaded.keys, VERSION, record)
    spec = FeatureSpec(window=WINDOW, label_delay_days=loaded.label_delay_days)
    return [len(keys), *keys, *script_args(POINTER, spec, record)]


def load(redis_client, loaded: Loaded, records: list[tuple]) -> None:
    """Send `records` in time order, `CHUNK` script calls per pipeline; every call must have written."""
    for start in range(0, len(records), CHUNK):
        pipe = redis_client.pipeline(transaction=False)
        for record in records[start : start + CHUNK]:
            pipe.evalsha(APPEND_SCRIPT_SHA, *call_of(loaded, record))
        replies = pipe.execute()
        assert all(len(reply) == 2 + len(ENTITIES) and reply[0] == POINTER for reply in replies)
        loaded.history += records[start : start + CHUNK]


def counted_call(redis_client, loaded: Loaded, record: tuple) -> tuple[list, dict[str, int]]:
    """The script's reply for `record` and the commands it ran (MULTI: nothing else runs in between)."""
    pipe = redis_client.pipeline(transaction=True)
    pipe.info("commandstats")
    pipe.evalsha(APPEND_SCRIPT_SHA, *call_of(loaded, record))
    pipe.info("commandstats")
    before, reply, after = pipe.execute()
    assert len(reply) == 2 + len(ENTITIES) and reply[0] == POINTER and reply[1] is None
    loaded.history.append(record)
    return reply, command_counts(before, after)


@pytest.fixture(scope="module", params=[3, 7], ids=lambda d: f"delta{d}")
def loaded(request, redis_client, key_prefix) -> Loaded:
    """The whole history sent, with an order through the busy IP and one through a fresh IP probed at each checkpoint."""
    keys = Keys(prefix=f"{key_prefix}busy{request.param}:")
    loaded = Loaded(request.param, keys)
    redis_client.script_load(APPEND_SCRIPT)
    redis_client.set(keys.live, POINTER)
    orders = busy_orders()
    busy_at = np.cumsum([r[4] == BUSY_IP for r in orders])  # busy orders up to and including each order
    sent = 0
    for checkpoint in CHECKPOINTS:
        upto = int(np.searchsorted(busy_at, checkpoint)) + 1  # the order that makes `checkpoint` busy orders
        load(redis_client, loaded, orders[sent:upto])
        sent = upto
        last_us = orders[upto - 1][1]
        assert sent == len(orders) or orders[sent][1] > last_us + 2  # the probes come before the next order
        busy_probe = probe(f"busy{checkpoint:06d}", last_us + 1, BUSY_IP)
        busy_reply, busy_commands = counted_call(redis_client, loaded, busy_probe)
        fresh_ip = f"198.51.100.{CHECKPOINTS.index(checkpoint) + 1}"
        _, fresh_commands = counted_call(
            redis_client, loaded, probe(f"fresh{checkpoint:06d}", last_us + 2, fresh_ip)
        )
        records_key, tiles_key = loaded.ip_keys(BUSY_IP)
        loaded.checkpoints[checkpoint] = Checkpoint(
            checkpoint,
            busy_commands,
            fresh_commands,
            busy_probe,
            busy_reply,
            redis_client.memory_usage(records_key, samples=0),
            redis_client.memory_usage(tiles_key, samples=0),
            redis_client.zcard(tiles_key),
        )
    load(redis_client, loaded, orders[sent:])
    _, medium_tiles = loaded.ip_keys(MEDIUM_IP)
    loaded.medium_tiles = redis_client.zcard(medium_tiles)
    loaded.medium_tiles_bytes = redis_client.memory_usage(medium_tiles, samples=0)
    # last, the script's longest path: late orders, which move the running sums on one side of their hour, 30 days
    # back (few tiles before it, many after) and then at the middle of the busy IP's hours (half on each side)
    newest_us = max(r[1] for r in loaded.history)
    hours = sorted(hours_kept(loaded, BUSY_IP))
    middle_us = hours[len(hours) // 2] * 3_600_000_000 + 1_800_000_001
    for kind, late_us in (("30d", newest_us - 30 * 86_400_000_000 + 3), ("middle", middle_us)):
        for ip in (BUSY_IP, MEDIUM_IP):
            tiles_key = loaded.ip_keys(ip)[1]
            hour = hours_of(late_us)
            sides = (
                redis_client.zcount(tiles_key, "-inf", hour),
                redis_client.zcount(tiles_key, f"({hour}", "+inf"),
            )
            members = set(redis_client.zrange(tiles_key, 0, -1))
            late = probe(f"late{kind}{ip.rsplit('.', 1)[1]:0>6}", late_us, ip)
            commands = counted_call(redis_client, loaded, late)[1]
            rewritten = len(set(redis_client.zrange(tiles_key, 0, -1)) - members)
            loaded.late[kind, ip] = Late(sides, commands, rewritten)
    yield loaded
    for key in redis_client.scan_iter(match=f"{keys.prefix}*", count=1000):
        redis_client.unlink(key)


def hours_kept(loaded: Loaded, ip: str, upto: int | None = None) -> set[int]:
    """Hours with orders through `ip` among the first `upto` orders sent, within the horizon of its newest."""
    hours = [hours_of(r[1]) for r in loaded.history[:upto] if r[4] == ip]
    newest = max(hours)
    return {h for h in hours if h >= newest - state_horizon_hours(loaded.label_delay_days)}


def test_history_as_planned(loaded):
    busy = [r for r in loaded.history if r[4] == BUSY_IP]
    assert len(busy) == N_BUSY + len(CHECKPOINTS) + 2  # the probes and the two late orders included
    assert (max(r[1] for r in busy) - min(r[1] for r in busy)) / 86_400_000_000 > DAYS - 0.01
    assert len({r[2] for r in loaded.history}) > 5_000 and len({r[3] for r in loaded.history}) > 8_000


def test_commands_per_order_do_not_grow_with_traffic(loaded):
    """A tile set of at most `SMALL_TILE_SET` tiles is read whole (one ZRANGE), a larger one with its oldest and
    newest tile and one ZREVRANGEBYSCORE per window edge before the newest: the commands at 2,000 and 20,000 busy
    orders are the same, and at 200 (9 tiles) fewer."""
    counts = {n: c.busy_commands for n, c in loaded.checkpoints.items()}
    tiles = {n: c.tiles for n, c in loaded.checkpoints.items()}
    for n, cp in loaded.checkpoints.items():
        print(
            f"\nδ={loaded.label_delay_days} at {n:>6} busy orders ({cp.tiles} tiles): busy IP "
            f"{sum(cp.busy_commands.values())} commands {cp.busy_commands}; fresh IP "
            f"{sum(cp.fresh_commands.values())} {cp.fresh_commands}"
        )
    assert tiles[200] <= SMALL_TILE_SET < tiles[2_000] < tiles[20_000]
    assert counts[2_000] == counts[20_000], counts
    hour = hours_of(loaded.checkpoints[2_000].busy_probe[1])
    # one lookup per distinct edge (δ = 7: two edges are one hour) but the order's own hour (the newest tile is at or
    # before it)
    lookups = len(set(window_edges(hour, loaded.label_delay_days))) - 1
    read_whole = {
        c: counts[2_000].get(c, 0) - counts[200].get(c, 0) for c in counts[2_000].keys() | counts[200]
    }
    assert {c: d for c, d in read_whole.items() if d} == {"zrevrangebyscore": lookups, "zrange": 1}
    # the only differences a fresh IP makes to an order through the busy IP at 200 (its probe's customer and email
    # are new too): its value goes into the entity's index (one ZADD) and it has no tiles to read (ZCARD only) and
    # its hour no tile to take out (one ZREM less): the busy IP's traffic adds nothing
    for cp in loaded.checkpoints.values():
        assert cp.fresh_commands == loaded.checkpoints[200].fresh_commands
    busy, fresh = loaded.checkpoints[200].busy_commands, loaded.checkpoints[200].fresh_commands
    difference = {c: busy.get(c, 0) - fresh.get(c, 0) for c in busy.keys() | fresh.keys()}
    assert {c: d for c, d in difference.items() if d} == {"zadd": -1, "zrem": 1, "zrange": 1}


def test_late_order_work_is_bounded_by_half_the_horizon(loaded):
    """A late order moves the running sums on the shorter side of its hour (the later tiles', or the earlier ones'
    and its own): at most half of a set's tiles are rewritten, as many through 20,000 orders as through 2,000 over
    the same hours, with the same commands. 30 days back, the few earlier tiles move; at the middle of the IP's
    hours, half of them: the worst case."""
    horizon = state_horizon_hours(loaded.label_delay_days)
    on_time = sum(loaded.checkpoints[20_000].busy_commands.values())
    for kind in ("30d", "middle"):
        busy, medium = loaded.late[kind, BUSY_IP], loaded.late[kind, MEDIUM_IP]
        print(
            f"\nδ={loaded.label_delay_days} late order ({kind}): tiles at or before its hour / after it "
            f"{busy.sides}, rewritten {busy.rewritten}, {sum(busy.commands.values())} commands {busy.commands}"
        )
        assert busy.commands == medium.commands
        for late in (busy, medium):  # its own tile (new, or with one more order), and one side's tiles
            assert late.rewritten <= min(late.sides) + 2 and late.rewritten <= (horizon + 1) // 2 + 2
        assert sum(busy.commands.values()) - on_time <= 6  # two ZCOUNTs and one range rewrite more
    assert loaded.late["30d", BUSY_IP].sides[1] > 24 * 29  # most tiles after it: the earlier side moved
    assert min(loaded.late["middle", BUSY_IP].sides) > horizon // 2 - 48  # about half on each side


def test_state_size_is_bounded(loaded, redis_client):
    horizon = state_horizon_hours(loaded.label_delay_days)
    cps = loaded.checkpoints
    for n, cp in cps.items():
        print(
            f"\nδ={loaded.label_delay_days} busy IP at {n:>6} orders: records {cp.records_bytes} B, "
            f"{cp.tiles} tiles {cp.tiles_bytes} B"
        )
    print(
        f"δ={loaded.label_delay_days} IP with {N_MEDIUM} orders over the same hours: {loaded.medium_tiles} tiles "
        f"{loaded.medium_tiles_bytes} B"
    )
    assert cps[200].records_bytes == cps[2_000].records_bytes == cps[20_000].records_bytes
    records_key, tiles_key = loaded.ip_keys(BUSY_IP)
    records = msgpack.unpackb(redis_client.get(records_key))
    assert len(records) == WINDOW
    # one tile per hour with orders within the horizon, at each checkpoint and at the end
    sent_at = {n: loaded.history.index(cp.busy_probe) + 2 for n, cp in cps.items()}  # the fresh probe too
    for n, cp in cps.items():
        assert cp.tiles == len(hours_kept(loaded, BUSY_IP, sent_at[n])) <= horizon + 1
    tiles = [msgpack.unpackb(t) for t in redis_client.zrange(tiles_key, 0, -1)]
    kept = hours_kept(loaded, BUSY_IP)
    assert [t[0] for t in tiles] == sorted(kept)
    assert len(tiles) <= horizon + 1
    in_horizon = [r for r in loaded.history if r[4] == BUSY_IP and hours_of(r[1]) in kept]
    n_orders = TILE_FIELDS.index("n_orders")
    assert sum(t[n_orders] for t in tiles) == len(in_horizon)  # every order within the horizon, once
    # traffic does not grow the tile set: 20,000 orders make as many tiles as 2,000 over the same hours
    assert hours_kept(loaded, MEDIUM_IP) == kept
    assert len(tiles) == loaded.medium_tiles
    assert cps[20_000].tiles_bytes <= 1.5 * loaded.medium_tiles_bytes
    if loaded.label_delay_days == 3:  # 36 days > 33-day horizon: the first tiles have left the state
        assert len(tiles) == horizon + 1


def test_served_features_equal_compute_features(loaded):
    columns = ["order_id", "order_date", "customer_id", "email", "ip_addr", "order_amount"]
    # the late orders came after every probe: the probes' features were served without them
    frame = pd.DataFrame([r for r in loaded.history if not r[0].startswith("plate")], columns=columns)
    frame["order_date"] = pd.to_datetime(frame["order_date"], unit="us", utc=True)
    expected = compute_features(frame, WINDOW, loaded.label_delay_days).set_index("order_id")
    for cp in loaded.checkpoints.values():
        views = {
            by: entity_view_of(view, cp.busy_probe, cp.busy_reply[1], i)
            for i, (by, view) in enumerate(zip(ENTITIES, cp.busy_reply[2:], strict=True))
        }
        served = serving_features(views, cp.busy_probe, WINDOW, loaded.label_delay_days)
        served = pd.Series(served, index=expected.columns)[IP_TIME_COLUMNS]
        want = expected.loc[cp.busy_probe[0], IP_TIME_COLUMNS]
        assert served.to_dict() == want.to_dict(), cp.busy
        assert served["n_orders_30d_by_ip_addr"] > min(cp.busy, 100)  # the windows hold the busy IP's orders
