"""Run state against real Redis: concurrent writers of one run (a step, the redeliver service, train-model's
run-level fields) never lose each other's change."""

import asyncio
from datetime import UTC, datetime

import pytest
from conftest import REDIS_URL

from fraud_poc.core.payloads import StepState
from fraud_poc.store.redis_store import Keys, async_redis
from fraud_poc.store.run_status import beat, create_run, get_run, update_run, update_step

STEP_CHANGES = [
    {"rows_in": 7},
    {"rows_out": 5},
    {"attempts": 3},
    {"error": "ValueError: boom"},
    {"owner": "host:1:token"},
    {"details": {"duplicates_dropped": 2}},
    {"started": datetime(2026, 1, 1, tzinfo=UTC)},
    {"ended": datetime(2026, 1, 2, tzinfo=UTC)},
]
pytestmark = pytest.mark.asyncio(loop_scope="module")  # one loop for the shared client of `async_redis`
RUN_CHANGES = [
    {"model_id": "xgb-r"},
    {"metrics": {"average_precision": 0.5}},
    {"promotion_reason": "passes the gate"},
]


@pytest.mark.parametrize("rounds", [5])
async def test_interleaved_updates_of_one_step_and_its_run_all_survive(key_prefix, rounds):
    """Every write of a round runs concurrently on one event loop, so each one's read happens before the others'
    writes: a plain read-modify-write keeps only the last of them."""
    redis, keys = async_redis(REDIS_URL), Keys(f"{key_prefix}atomic:")
    await beat(redis, keys, 60, owner="host:1:token")  # the step's owner lives: get_run shows it running
    for n in range(rounds):
        run_id = f"run-{n}"
        await create_run(redis, keys, run_id, "sample")
        await asyncio.gather(
            update_step(redis, keys, run_id, "preprocess", state=StepState.RUNNING),
            *(update_step(redis, keys, run_id, "preprocess", **change) for change in STEP_CHANGES),
            *(update_run(redis, keys, run_id, **change) for change in RUN_CHANGES),
        )
        run = await get_run(redis, keys, run_id)
        step = run.steps[1]
        assert {name: getattr(step, name) for change in STEP_CHANGES for name in change} == {
            name: value for change in STEP_CHANGES for name, value in change.items()
        }, step
        assert step.state == StepState.RUNNING and run.state == StepState.RUNNING, run
        assert (run.model_id, run.metrics, run.promotion_reason) == (
            "xgb-r",
            {"average_precision": 0.5},
            "passes the gate",
        ), run
        await redis.delete(keys.run(run_id))
    await redis.delete(keys.runs)


async def test_a_finished_run_stays_finished_under_concurrent_writes(key_prefix):
    redis, keys = async_redis(REDIS_URL), Keys(f"{key_prefix}atomic-done:")
    await create_run(redis, keys, "r", "sample")
    await asyncio.gather(
        update_run(redis, keys, "r", state=StepState.DONE, promoted=True),
        update_step(redis, keys, "r", "prepare-db", state=StepState.DONE, rows_out=3),
    )
    await update_step(redis, keys, "r", "prepare-db", state=StepState.RUNNING)  # a late duplicate message
    run = await get_run(redis, keys, "r")
    assert (run.state, run.promoted, run.steps[5].rows_out) == (StepState.DONE, True, 3), run
    await redis.delete(keys.run("r"), keys.runs)


async def test_unknown_run_or_step_is_a_key_error(key_prefix):
    redis, keys = async_redis(REDIS_URL), Keys(f"{key_prefix}atomic-unknown:")
    with pytest.raises(KeyError):
        await update_run(redis, keys, "nope", state=StepState.DONE)
    await create_run(redis, keys, "r", "sample")
    with pytest.raises(KeyError):
        await update_step(redis, keys, "r", "no-such-step", rows_in=1)
    await redis.delete(keys.run("r"), keys.runs)


async def test_a_status_stored_before_details_still_decodes_and_updates(key_prefix):
    """Statuses written by the previous version (no `details` field) are read and changed as they are."""
    redis, keys = async_redis(REDIS_URL), Keys(f"{key_prefix}atomic-old:")
    await create_run(redis, keys, "r", "sample")
    old = '{"step": "preprocess", "state": "done", "rows_in": 4, "rows_out": 3, "attempts": 1}'
    await redis.hset(keys.run("r"), "step:preprocess", old)
    assert (await get_run(redis, keys, "r")).steps[1].details is None
    step = await update_step(redis, keys, "r", "preprocess", details={"duplicates_dropped": 1})
    assert (step.rows_in, step.rows_out, step.details) == (4, 3, {"duplicates_dropped": 1}), step
    await redis.delete(keys.run("r"), keys.runs)
