"""fraud_poc.store.feature_store on a real Redis and a real LocalCluster: load, promote, read back, clean up, failures."""

import threading
from uuid import uuid4

import dask.dataframe as dd
import msgpack
import numpy as np
import pandas as pd
import pytest
import redis
from isolation import REDIS_URL
from store_reads import find_values, read_live_states

from fraud_poc.core.schema import ENTITIES, FeatureSpec
from fraud_poc.features.definitions import EntityStates, serving_states, state_of
from fraud_poc.features.serving_state import (
    ENCODED_COLUMNS,
    decode_state,
    decode_tile,
    encode_state,
    encode_tile,
    encoded_states,
)
from fraud_poc.store.feature_store import (
    NotPromotable,
    live_pointer,
    loaded_versions,
    promote,
    switch_live,
    upload_model,
    version_meta,
    write_feature_version,
)
from fraud_poc.store.redis_store import Keys

SPEC = FeatureSpec(window=4)  # W = 4, the default δ


@pytest.fixture
def store():
    r = redis.Redis.from_url(REDIS_URL)
    keys = Keys(f"fraudtest:{uuid4().hex}:")
    yield r, keys
    for key in r.scan_iter(match=f"{keys.prefix}*", count=1000):
        r.unlink(key)


def orders(n: int, seed: int, amount_base: float) -> pd.DataFrame:
    """Raw orders with repeated entity values, all within 100 s of one UTC hour (one tile per value; W decides
    which records are kept); ~10% fraud labelled at the order's own instant; amounts tell versions apart."""
    rng = np.random.default_rng(seed)
    ts_us = rng.integers(1_700_000_000_000_000, 1_700_000_100_000_000, n) // 1_000_000 * 1_000_000
    order_date = pd.DatetimeIndex(pd.to_datetime(ts_us, unit="us", utc=True)).as_unit("us")
    fraud = rng.random(n) < 0.1
    return pd.DataFrame(
        {
            "order_id": [f"o{seed}-{i:05d}" for i in range(n)],
            "order_date": order_date,
            "customer_id": [f"c{i}" for i in rng.integers(0, n // 6, n)],
            "email": [f"u{i}@mail.io" for i in rng.integers(0, n // 8, n)],
            "ip_addr": [f"10.1.{i // 256}.{i % 256}" for i in rng.integers(0, n // 10, n)],
            "location_lat": 0.0,
            "location_long": 0.0,
            "order_amount": amount_base + rng.integers(0, 100, n).astype("float64"),
            "is_fraud": fraud,
            "label_date": order_date.where(fraud),
        }
    )


def states_of(frame: pd.DataFrame, by: str) -> EntityStates:
    """Every `by` value's serving state after `frame` (labels known by its newest order)."""
    return serving_states(frame, by, SPEC.window, SPEC.label_delay_days)


def latest_encoded(frame: pd.DataFrame, by: str) -> pd.DataFrame:
    """The encoded states (`value`, `state`, `tiles`, `orders`) of `frame`'s orders by `by`."""
    return encoded_states(states_of(frame, by), by)


def partitioned_by(frame: pd.DataFrame, by: str, n: int = 4) -> dd.DataFrame:
    """The encoded states of `frame`'s orders by `by`, in `n` partitions by value (as feature-calc writes them)."""
    part = pd.util.hash_array(frame[by].to_numpy(dtype=object)) % n
    pieces = [frame[part == p] for p in range(n)]
    return dd.from_map(latest_encoded, pieces, args=[by], meta=latest_encoded(frame.iloc[:0], by))


def expected_state(frame: pd.DataFrame, by: str, value: str) -> list[tuple]:
    """The value's records: its last W orders, `STATE_FIELDS` 6-tuples, oldest first."""
    return state_of(states_of(frame, by), by, value)[0]


def stored_tiles(r: redis.Redis, keys: Keys, version: str, by: str, value: str) -> list[tuple[int, ...]]:
    return [decode_tile(member) for member in r.zrange(keys.fs_tiles(version, by, value), 0, -1)]


def load(client, keys, frame: pd.DataFrame, version: str) -> dict:
    frames = {by: partitioned_by(frame, by) for by in ENTITIES}
    return write_feature_version(
        client, frames, REDIS_URL, keys, version, f"run-{version}", SPEC, chunk_size=50
    ).meta


def upload(r, keys, model_id: str, spec: FeatureSpec = SPEC) -> None:
    upload_model(
        r,
        keys,
        model_id,
        b"ubj:" + model_id.encode(),
        {"feature_set_fingerprint": spec.fingerprint, "feature_spec": spec.to_json()},
    )


def test_state_codec_coerces_lua_numbers():
    record = ("o1", 1_700_000_000_123_456, "c1", "a@b.io", "::1", 42.0)
    assert decode_state(encode_state([record])) == [record]
    from_lua = msgpack.packb([["o1", 1_700_000_000_123_456, "c1", "a@b.io", "::1", 42]])
    decoded = decode_state(from_lua)
    assert decoded == [record] and type(decoded[0][5]) is float
    tile = (472_222, 3, 12_345, 1, 10, 99_999, 2)
    assert decode_tile(encode_tile(tile)) == tile and decode_tile(None) is None
    assert decode_tile(msgpack.packb([472_222, 3, 12_345, 1, 10, 99_999, 2])) == tile  # as Lua packs it


def test_write_promote_read_back_and_remove_old(client, store):
    r, keys = store
    v1, v2 = orders(600, seed=1, amount_base=1000.0), orders(500, seed=2, amount_base=5000.0)
    assert latest_encoded(v1, "email").columns.tolist() == ENCODED_COLUMNS  # what feature-calc writes
    meta = load(client, keys, v1, "v1")
    expected_counts = {by: v1[by].nunique() for by in ENTITIES}
    assert meta["counts"] == expected_counts and meta["total_states"] == sum(expected_counts.values())
    assert version_meta(r, keys, "v1") == meta and meta["window"] == SPEC.window
    assert meta["feature_spec"] == SPEC.to_json() and meta["feature_set_fingerprint"] == SPEC.fingerprint
    assert (meta["label_delay_days"], meta["feature_set_version"]) == (
        SPEC.label_delay_days,
        SPEC.feature_set_version,
    )
    upload(r, keys, "xgb-v1")
    switch_live(r, keys, "xgb-v1", "v1", "run-v1")
    assert live_pointer(r, keys)["fs_version"] == "v1"

    entries = {}
    for by in ENTITIES:  # every state of every entity value, records and tiles, exactly
        values = sorted(v1[by].unique())
        states = states_of(v1, by)
        raw = r.mget([keys.fs_state("v1", by, v) for v in values])
        assert [decode_state(x) for x in raw] == [state_of(states, by, v)[0] for v in values]
        assert [stored_tiles(r, keys, "v1", by, v) for v in values] == [
            state_of(states, by, v)[1] for v in values
        ]
        assert sorted(x.decode() for x in r.zrange(keys.fs_index("v1", by), 0, -1)) == values
        for row in states.orders.itertuples(index=False, name=None):
            entries[row[0]] = [int(row[1]), *row[2:5], int(row[5]), int(row[6])]
    assert sum(entry[5] for entry in entries.values()) > 0  # labels counted in the tiles and the entries
    stored_entries = r.hgetall(keys.fs_orders("v1"))
    assert {k.decode(): msgpack.unpackb(v, raw=False) for k, v in stored_entries.items()} == entries
    some = v1.iloc[7]
    pointer, states = read_live_states(r, keys, {by: some[by] for by in ENTITIES})
    assert pointer["model_id"] == "xgb-v1"
    assert states == {by: expected_state(v1, by, some[by]) for by in ENTITIES}
    _, with_tiles = read_live_states(r, keys, {"email": some["email"]}, with_tiles=True)
    assert with_tiles == {"email": state_of(states_of(v1, "email"), "email", some["email"])}
    assert (
        find_values(r, keys, "v1", "ip_addr", "10.1.0.1", 3)
        == sorted(v for v in v1["ip_addr"].unique() if v.startswith("10.1.0.1"))[:3]
    )

    load(client, keys, v2, "v2")
    upload(r, keys, "xgb-v2")
    summary = switch_live(r, keys, "xgb-v2", "v2", "run-v2")
    assert summary["previous"]["fs_version"] == "v1"
    assert summary["removed_keys"] == 0 and version_meta(r, keys, "v1") == meta  # kept for rollback
    load(client, keys, orders(100, seed=3, amount_base=0.0), "v3")
    upload(r, keys, "xgb-v3")
    v1_keys = list(r.scan_iter(match=keys.fs_prefix("v1") + "*"))
    # per value its records and its tiles; per entity its index; the order index; the meta
    assert len(v1_keys) == 2 * meta["total_states"] + len(ENTITIES) + 2
    third = switch_live(r, keys, "xgb-v3", "v3", "run-v3")  # v1, two switches old, goes now
    assert third["removed_keys"] == len(v1_keys) and third["removed_models"] == 1
    assert list(r.scan_iter(match=keys.fs_prefix("v1") + "*")) == [] and loaded_versions(r, keys) == [
        "v2",
        "v3",
    ]
    switch_live(r, keys, "xgb-v2", "v2", "run-v2")  # a rollback: both stay
    assert loaded_versions(r, keys) == ["v2", "v3"]
    assert read_live_states(r, keys, {"customer_id": some["customer_id"]})[1][
        "customer_id"
    ] == expected_state(v2, "customer_id", some["customer_id"])


def test_version_without_meta_cannot_be_promoted(client, store):
    r, keys = store
    load(client, keys, orders(200, seed=3, amount_base=0.0), "v1")
    upload(r, keys, "xgb-1")
    r.delete(keys.fs_meta("v1"))
    with pytest.raises(NotPromotable, match="version v1 has no meta"):
        promote(r, keys, "xgb-1", "v1", "run-1")
    assert live_pointer(r, keys) is None


def test_model_must_exist_and_match_the_feature_set(client, store):
    r, keys = store
    load(client, keys, orders(200, seed=4, amount_base=0.0), "v1")
    with pytest.raises(NotPromotable, match="model xgb-1 is not in Redis"):
        promote(r, keys, "xgb-1", "v1", "run-1")
    for other in (FeatureSpec(window=SPEC.window + 1), FeatureSpec(window=SPEC.window, label_delay_days=3)):
        upload(r, keys, "xgb-1", other)  # another W, then another δ: another fingerprint
        with pytest.raises(NotPromotable, match="does not match feature-store version v1"):
            promote(r, keys, "xgb-1", "v1", "run-1")
    assert live_pointer(r, keys) is None


def test_load_failing_midway_leaves_previous_version_live(client, store):
    r, keys = store
    good = orders(300, seed=5, amount_base=10.0)
    load(client, keys, good, "v1")
    upload(r, keys, "xgb-1")
    switch_live(r, keys, "xgb-1", "v1", "run-1")
    before = sorted(r.scan_iter(match=keys.fs_prefix("v1") + "*"))

    def read_part(i: int) -> pd.DataFrame:
        if i == 3:
            raise OSError("orders_by_email/part.3.parquet: truncated file")
        return latest_encoded(orders(100, seed=10 + i, amount_base=0.0), "email")

    frames = {
        by: partitioned_by(orders(400, seed=6, amount_base=0.0), by) for by in ("customer_id", "ip_addr")
    }
    frames["email"] = dd.from_map(read_part, range(5), meta=latest_encoded(good.iloc[:0], "email"))
    with pytest.raises(OSError, match="truncated file"):
        write_feature_version(client, frames, REDIS_URL, keys, "v2", "run-2", SPEC, chunk_size=50)
    assert live_pointer(r, keys)["fs_version"] == "v1"
    assert list(r.scan_iter(match=keys.fs_prefix("v2") + "*")) == []
    assert sorted(r.scan_iter(match=keys.fs_prefix("v1") + "*")) == before
    value = good["email"].iloc[0]
    assert read_live_states(r, keys, {"email": value})[1]["email"] == expected_state(good, "email", value)
    assert (
        stored_tiles(r, keys, "v1", "email", value) == state_of(states_of(good, "email"), "email", value)[1]
    )


def test_live_version_is_never_overwritten(client, store):
    r, keys = store
    load(client, keys, orders(100, seed=7, amount_base=0.0), "v1")
    upload(r, keys, "xgb-1")
    switch_live(r, keys, "xgb-1", "v1", "run-1")
    with pytest.raises(ValueError, match="version v1 is live"):
        load(client, keys, orders(100, seed=8, amount_base=0.0), "v1")
    assert version_meta(r, keys, "v1") is not None


def test_readers_never_see_a_mix_of_versions(client, store):
    """While versions switch back and forth, every read returns states of the version its pointer names."""
    r, keys = store
    frames = {"a": orders(300, seed=9, amount_base=1000.0), "b": orders(300, seed=9, amount_base=5000.0)}
    for version, frame in frames.items():
        load(client, keys, frame, version)
        upload(r, keys, f"xgb-{version}")
    customer = sorted(frames["a"]["customer_id"].unique())[0]
    promote(r, keys, "xgb-a", "a", "run-a")
    stop, seen, errors = threading.Event(), set(), []

    def reader() -> None:
        reader_redis = redis.Redis.from_url(REDIS_URL)
        while not stop.is_set():
            pointer, states = read_live_states(reader_redis, keys, {"customer_id": customer})
            amounts = {rec[5] for rec in states["customer_id"]}
            base = 1000.0 if pointer["fs_version"] == "a" else 5000.0
            if not all(base <= a < base + 100 for a in amounts):
                errors.append((pointer["fs_version"], amounts))
            seen.add(pointer["fs_version"])

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(5000):
        version = "b" if i % 2 == 0 else "a"
        promote(r, keys, f"xgb-{version}", version, f"run-{version}")
        if seen == {"a", "b"} and i > 200:
            break
    stop.set()
    thread.join()
    assert errors == [] and seen == {"a", "b"}
