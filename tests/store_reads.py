"""Reference reads of the feature store for tests, written from the rules of docs/redis-layout.md.

The prediction service reads states inside its append script (`fraud_poc.store_scripts`) and searches the index
with `ZRANGE ... BYLEX` (`fraud_poc.scorer.Scorer.find_orders`); these read the same keys another way, an
independent check of what a load wrote and of the pointer's atomic switch.
"""

import json
from typing import Any

import redis

from fraud_poc.feature_store import live_pointer
from fraud_poc.redis_store import Keys
from fraud_poc.serving_state import decode_state


def read_live_states(
    r: redis.Redis, keys: Keys, lookups: dict[str, str], attempts: int = 5
) -> tuple[dict[str, Any] | None, dict[str, list[tuple]]]:
    """The live pointer and the states of `{entity: value}` from that same version ([] for unknown values).

    The readers' rule: read the pointer and the state keys of the version believed live in one MULTI/EXEC; if the
    pointer read in that transaction names another version, read again with that one."""
    pointer = live_pointer(r, keys)
    for _ in range(attempts):
        if pointer is None:
            return None, {}
        pipe = r.pipeline(transaction=True)
        pipe.get(keys.live)
        for by, value in lookups.items():
            pipe.get(keys.fs_state(pointer["fs_version"], by, value))
        live_raw, *raw_states = pipe.execute()
        current = None if live_raw is None else json.loads(live_raw)
        if current == pointer:
            return pointer, {
                by: decode_state(raw) if raw else [] for by, raw in zip(lookups, raw_states, strict=True)
            }
        pointer = current
    raise RuntimeError(f"the live pointer changed {attempts} times while reading states")


def find_values(r: redis.Redis, keys: Keys, version: str, by: str, prefix: str, limit: int) -> list[str]:
    """Up to `limit` values of entity `by` in the version's index that start with `prefix`, in byte order."""
    values = sorted(
        value for value in r.zrange(keys.fs_index(version, by), 0, -1) if value.startswith(prefix.encode())
    )
    return [value.decode() for value in values[:limit]]
