"""What keeps tests in parallel (`pytest -n N`, pytest-xdist) apart: each worker process has a Redis database of
its own (`REDIS_URL`: the base URL's database plus the worker's index), so the hopeit streams of the services it
starts (named by the config, not prefixed) are its own, and takes its ports from a range of its own (`free_port`).
Keys are apart by the session's key prefix besides (`conftest.key_prefix`)."""

import itertools
import os
import socket

# "gw0", "gw1", ... in a pytest-xdist worker; 0 in a run without -n
WORKER_INDEX = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)


def worker_redis_url(base: str, index: int) -> str:
    """`base` with its database number raised by `index`: "redis://h:6379/5", 2 -> "redis://h:6379/7"."""
    url, _, db = base.rpartition("/")
    return f"{url}/{int(db) + index}"


REDIS_URL = worker_redis_url(os.environ.get("FRAUD_TEST_REDIS_URL", "redis://127.0.0.1:6379/5"), WORKER_INDEX)


PORTS_PER_WORKER = (
    300  # worker i: 20000 + 300 i ... (below the ephemeral range, where outgoing connections take theirs)
)
_next_ports = itertools.count(20_000 + PORTS_PER_WORKER * WORKER_INDEX)


def free_port() -> int:
    """A port of this worker's own range that nothing listens on, never handed out twice in this process: no other
    worker can take it between this check and the service's bind."""
    for port in _next_ports:
        if port >= 20_000 + PORTS_PER_WORKER * (WORKER_INDEX + 1):
            break
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port left in worker {WORKER_INDEX}'s range")
