"""Reference reads of the feature store for tests, written from the rules of docs/redis-layout.md.

The prediction service reads states inside its append script (`fraud_poc.store.store_scripts`) and searches the index
with `ZRANGE ... BYLEX` (`fraud_poc.serving.scorer.Scorer.find_orders`); these read the same keys another way, an
independent check of what a load wrote and of the pointer's atomic switch.

A state (SPEC 2.3) is a value's records (its last W orders, `schema.STATE_FIELDS`) and its hourly tiles (a sorted
set scored by hour, members `schema.TILE_FIELDS`).
"""

import json
from typing import Any

import redis

from fraud_poc.features.serving_state import decode_state, decode_tile
from fraud_poc.store.feature_store import live_pointer
from fraud_poc.store.redis_store import Keys


def read_live_states(
    r: redis.Redis, keys: Keys, lookups: dict[str, str], attempts: int = 5, with_tiles: bool = False
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The live pointer and the states of `{entity: value}` from that same version ([] for unknown values): each
    the value's records, or with `with_tiles` its (records, tiles) as `features.state_of` gives them.

    The readers' rule: read the pointer and the state keys of the version believed live in one MULTI/EXEC; if the
    pointer read in that transaction names another version, read again with that one."""
    pointer = live_pointer(r, keys)
    for _ in range(attempts):
        if pointer is None:
            return None, {}
        version = pointer["fs_version"]
        pipe = r.pipeline(transaction=True)
        pipe.get(keys.live)
        for by, value in lookups.items():
            pipe.get(keys.fs_state(version, by, value))
            pipe.zrange(keys.fs_tiles(version, by, value), 0, -1)
        live_raw, *raw = pipe.execute()
        current = None if live_raw is None else json.loads(live_raw)
        if current == pointer:
            states = {}
            for by, records, tiles in zip(lookups, raw[::2], raw[1::2], strict=True):
                decoded = decode_state(records) if records else []
                states[by] = (decoded, [decode_tile(t) for t in tiles]) if with_tiles else decoded
            return pointer, states
        pointer = current
    raise RuntimeError(f"the live pointer changed {attempts} times while reading states")


def find_values(r: redis.Redis, keys: Keys, version: str, by: str, prefix: str, limit: int) -> list[str]:
    """Up to `limit` values of entity `by` in the version's index that start with `prefix`, in byte order."""
    values = sorted(
        value for value in r.zrange(keys.fs_index(version, by), 0, -1) if value.startswith(prefix.encode())
    )
    return [value.decode() for value in values[:limit]]
