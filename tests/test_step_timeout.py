"""fraud_poc.pipeline.step_runner under a stream timeout, with real Redis and a real local Dask cluster: a timed-out
attempt stops (its Dask work cancelled, its thread ended) before the timeout propagates, so its retry cannot
overlap it; and steps of one process never do their Dask work at the same time."""

import asyncio
import threading
import time
from dataclasses import dataclass
from uuid import uuid4

import pytest
import redis
import redis.asyncio as aioredis
from isolation import REDIS_URL

from fraud_poc.core.payloads import StepState
from fraud_poc.pipeline.step_runner import cancel_dask_work, holding_step_lock, run_step
from fraud_poc.store.redis_store import Keys
from fraud_poc.store.run_status import create_run, get_run


@dataclass
class Rows:
    rows_in: int
    rows_out: int


@pytest.fixture
def keys():
    value = Keys(f"fraudtest:{uuid4().hex[:12]}:")
    yield value
    r = redis.Redis.from_url(REDIS_URL)
    for key in r.scan_iter(match=f"{value.prefix}*", count=1000):
        r.unlink(key)


async def test_timed_out_attempt_stops_before_its_retry(client, keys):
    r = aioredis.Redis.from_url(REDIS_URL)  # one per test: each test has its own event loop
    await create_run(r, keys, "run-t", "sample")
    submitted, ended = [], threading.Event()

    def slow_dask_work() -> Rows:
        try:
            future = client.submit(time.sleep, 8, pure=False)
            submitted.append(future)
            future.result()  # raises once the future is cancelled
            return Rows(0, 1)
        finally:
            ended.set()

    attempt = run_step(
        r, keys, "run-t", "sample-data", slow_dask_work, cancel=lambda: cancel_dask_work(client)
    )
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(attempt, timeout=2.0)  # what hopeit's stream timeout does
    assert ended.is_set(), "the timed-out attempt's thread was still running when the timeout propagated"
    assert submitted and submitted[0].cancelled()
    step = (await get_run(r, keys, "run-t")).steps[0]
    assert (step.state, step.attempts) == (StepState.RETRYING, 1)
    assert step.error == "step timed out or was cancelled: attempt stopped"

    assert await run_step(r, keys, "run-t", "sample-data", lambda: Rows(0, 5)) == Rows(0, 5)
    step = (await get_run(r, keys, "run-t")).steps[0]
    assert (step.state, step.attempts, step.rows_out, step.error) == (StepState.DONE, 2, 5, None)


async def test_steps_of_one_process_do_not_overlap(client, keys):
    """Two runs' steps submitted at once: their Dask work (graph building included) runs one after the other."""
    r = aioredis.Redis.from_url(REDIS_URL)  # one per test: each test has its own event loop
    inside, most = [0], [0]
    guard = threading.Lock()

    def dask_work(n: int) -> Rows:
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            return Rows(0, client.submit(sum, range(n), pure=False).result())
        finally:
            time.sleep(0.2)
            with guard:
                inside[0] -= 1

    for run_id in ("run-a", "run-b", "run-c"):
        await create_run(r, keys, run_id, "sample")
    results = await asyncio.gather(
        *(
            run_step(r, keys, run_id, "sample-data", lambda n=n: dask_work(n))
            for n, run_id in enumerate(("run-a", "run-b", "run-c"), start=3)
        )
    )
    assert [x.rows_out for x in results] == [3, 6, 10] and most[0] == 1


async def test_attempt_timed_out_waiting_for_the_lock_leaves_the_holders_work_alone(client, keys):
    """A step that times out while another user of the client (promote-model's load) holds the lock stops
    without cancelling that user's Dask work."""
    r = aioredis.Redis.from_url(REDIS_URL)
    await create_run(r, keys, "run-w", "sample")
    release, futures = threading.Event(), []

    def load() -> int:
        future = client.submit(sum, [1, 2], pure=False)
        futures.append(future)
        release.wait(10)
        return future.result()

    holder = asyncio.ensure_future(asyncio.to_thread(holding_step_lock, load))
    while not futures:
        await asyncio.sleep(0.05)
    attempt = run_step(
        r, keys, "run-w", "sample-data", lambda: Rows(0, 1), cancel=lambda: cancel_dask_work(client)
    )
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(attempt, timeout=1.0)
    step = (await get_run(r, keys, "run-w")).steps[0]
    assert (step.state, step.error) == (
        StepState.RETRYING,
        "step timed out or was cancelled: attempt stopped",
    )
    release.set()
    assert await holder == 3 and not futures[0].cancelled()
