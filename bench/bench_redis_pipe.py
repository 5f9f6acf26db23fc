"""RedisPipe against redis-py, side by side in one run: is the prediction service's own Redis connection worth keeping?

Each request is what `predict` sends per order: one batch of three EVALSHA calls (one per entity), each reading and
rewriting a ~2 KB state, against the Redis at $FRAUD_REDIS_URL under a key prefix of its own (removed after).
Three clients, on uvloop as in the service:

- `pipe`: `fraud_poc.store.redis_pipe.RedisPipe`, one connection shared by every concurrent request; batches of
  concurrent requests go out in one write each and the replies are matched in order;
- `dedicated`: one redis-py asyncio `Connection`, `send_packed_command(pack_commands(...))` then `read_response()`
  per command, under a lock (a connection carries one request's batch at a time);
- `pool`: `redis.asyncio.Redis` on a `BlockingConnectionPool` of 100 (the service's other client), a
  non-transactional `pipeline()` per request.

For each concurrency (1: one request at a time; 32: a loaded service) the clients take turns for `--rounds`
rounds (so a noisy neighbour hits all three alike); printed: the median over rounds of requests/s, latency p50
and p99, and the client's CPU per request, with ratios against `pipe`.

    . config/env.sh && .venv/bin/python bench/bench_redis_pipe.py
"""

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from uuid import uuid4

import numpy as np
import redis
import redis.asyncio as aioredis
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from report import recorded

from fraud_poc.store.redis_pipe import RedisPipe  # noqa: E402

SCRIPT = "local v = redis.call('GET', KEYS[1]); redis.call('SET', KEYS[1], v); return v"
STATE_BYTES = 2048


class Pipe:
    def __init__(self, url: str) -> None:
        self.pipe = RedisPipe(url)

    async def call(self, commands: list[tuple]) -> list:
        return await self.pipe.execute(commands)

    async def close(self) -> None:
        self.pipe.close()


class Dedicated:
    def __init__(self, url: str) -> None:
        pool = aioredis.ConnectionPool.from_url(url)
        self.connection = pool.make_connection()
        self.lock = asyncio.Lock()

    async def call(self, commands: list[tuple]) -> list:
        async with self.lock:
            if not self.connection.is_connected:
                await self.connection.connect()
            await self.connection.send_packed_command(self.connection.pack_commands(commands))
            return [await self.connection.read_response() for _ in commands]

    async def close(self) -> None:
        await self.connection.disconnect()


class Pool:
    def __init__(self, url: str) -> None:
        self.redis = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(url, max_connections=100)
        )

    async def call(self, commands: list[tuple]) -> list:
        async with self.redis.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return await pipe.execute()

    async def close(self) -> None:
        await self.redis.aclose()


CLIENTS = {"pipe": Pipe, "dedicated": Dedicated, "pool": Pool}


async def measure(client, requests: list[list[tuple]], concurrency: int) -> dict:
    latencies = np.empty(len(requests))
    next_index = iter(range(len(requests)))

    async def worker() -> None:
        for i in next_index:
            started = time.perf_counter()
            replies = await client.call(requests[i])
            latencies[i] = time.perf_counter() - started
            assert len(replies[0]) == STATE_BYTES, replies[0]

    await client.call(requests[0])  # connect and warm up outside the clock
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "rps": len(requests) / wall,
        "p50_ms": float(np.percentile(latencies, 50) * 1e3),
        "p99_ms": float(np.percentile(latencies, 99) * 1e3),
        "cpu_us": cpu / len(requests) * 1e6,
    }


async def main(args: argparse.Namespace) -> None:
    url = os.environ.get("FRAUD_REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"bench-pipe:{uuid4().hex[:8]}:"
    sync = redis.Redis.from_url(url)
    keys = [f"{prefix}state:{i}" for i in range(3000)]
    for start in range(0, len(keys), 500):
        sync.mset({key: os.urandom(STATE_BYTES // 2).hex() for key in keys[start : start + 500]})
    sha = sync.script_load(SCRIPT)
    rng = np.random.default_rng(0)
    try:
        print(
            f"Redis {url}; per request 3 EVALSHA of a {STATE_BYTES}-byte state; {args.rounds} rounds, median"
        )
        for concurrency, count in ((1, args.requests // 4), (32, args.requests)):
            requests = [
                [("EVALSHA", sha, 1, keys[k]) for k in rng.integers(0, len(keys), 3)] for _ in range(count)
            ]
            results = {name: [] for name in CLIENTS}
            for _ in range(args.rounds):
                for name, make in CLIENTS.items():
                    client = make(url)
                    results[name].append(await measure(client, requests, concurrency))
                    await client.close()
            print(f"\nconcurrency {concurrency}, {count} requests per round")
            print(
                f"{'client':10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>11}   vs pipe (req/s, CPU)"
            )
            base = {k: statistics.median(r[k] for r in results["pipe"]) for k in ("rps", "cpu_us")}
            for name, rounds in results.items():
                m = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
                print(
                    f"{name:10} {m['rps']:9.0f} {m['p50_ms']:8.3f} {m['p99_ms']:8.3f} {m['cpu_us']:11.1f}"
                    f"   {m['rps'] / base['rps']:.2f}x, {m['cpu_us'] / base['cpu_us']:.2f}x"
                )
    finally:
        for start in range(0, len(keys), 500):
            sync.unlink(*keys[start : start + 500])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per round at concurrency 32")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with recorded("bench_redis_pipe"):
        uvloop.run(main(args))
