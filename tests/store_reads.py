"""Reference reads of the feature store for tests: what a version's index holds, filtered in Python.

The prediction service searches the index with `ZRANGE ... BYLEX` (`fraud_poc.scorer.Scorer.find_orders`); this
reads the whole index and filters it here, an independent check of what the load wrote.
"""

import redis

from fraud_poc.redis_store import Keys


def find_values(r: redis.Redis, keys: Keys, version: str, by: str, prefix: str, limit: int) -> list[str]:
    """Up to `limit` values of entity `by` in the version's index that start with `prefix`, in byte order."""
    values = sorted(
        value for value in r.zrange(keys.fs_index(version, by), 0, -1) if value.startswith(prefix.encode())
    )
    return [value.decode() for value in values[:limit]]
