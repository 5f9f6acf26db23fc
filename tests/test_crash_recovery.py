"""kill -9 of a real training service (and its Dask workers) in the middle of a step: the run status stops
saying `running` for the step as soon as the dead process's heartbeat expires, and a restarted service
delivers the step again at once: the run completes within a minute of the restart."""

import asyncio
import time

import pytest
import redis.asyncio as aioredis
import requests
from conftest import AUTH, REDIS_URL, service_env
from test_concurrent_runs import API, TrainingService, own_prefix

from fraud_poc.store.redis_store import Keys
from fraud_poc.store.run_status import get_run

pytestmark = pytest.mark.system  # services in subprocesses (the system tier)

RUN = {"num_orders": 40_000, "num_customers": 800, "months": 3, "fraud_rate": 0.03, "seed": 11}
OWNER_TTL = 4.0
prefix = pytest.fixture(own_prefix, name="prefix")


def status(service: TrainingService, run_id: str) -> dict:
    response = requests.get(f"{service.base}{API}/pipeline-status", params={"run_id": run_id}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


async def step_state(prefix: str, run_id: str, step: str) -> tuple[str, str | None]:
    """What pipeline-status would say (the same `get_run`), read while no service is up."""
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        found = next(s for s in (await get_run(r, Keys(prefix), run_id)).steps if s.step == step)
        return found.state.value, found.error
    finally:
        await r.aclose()


@pytest.mark.parametrize("step", ["feature-calc", "train-model"])
def test_kill_9_mid_step_resumes_within_a_minute_of_restart(prefix, tmp_path, step):
    settings = {
        "runs": {"owner_ttl_seconds": OWNER_TTL},
        "delivery": {"check_interval_seconds": 1.0, "retry_after_seconds": 2.0},
    }
    service = TrainingService(service_env(prefix, tmp_path / "data"), tmp_path / "log", tmp_path, settings)
    try:
        answer = requests.post(f"{service.base}{API}/run-pipeline", json=RUN, headers=AUTH, timeout=30)
        assert answer.status_code == 200, answer.text
        run_id = answer.json()["run_id"]
        deadline = time.monotonic() + 240
        while next(s for s in status(service, run_id)["steps"] if s["step"] == step)["state"] != "running":
            assert time.monotonic() < deadline, status(service, run_id)
            time.sleep(0.1)
        service.kill()

        killed, seen = time.monotonic(), []
        while time.monotonic() - killed < OWNER_TTL + 10:
            seen.append(asyncio.run(step_state(prefix, run_id, step)))
            if seen[-1][0] != "running":
                break
            time.sleep(0.2)
        state, error = seen[-1]
        assert state == "retrying" and error.startswith("interrupted: its process "), seen
        print(f"{step} shown interrupted {time.monotonic() - killed:.1f} s after kill -9")

        service.start()
        restarted, final = time.monotonic(), None
        while time.monotonic() - restarted < 60:
            final = status(service, run_id)
            if final["state"] in ("done", "failed"):
                break
            time.sleep(0.5)
        assert final["state"] == "done", final
        steps = {s["step"]: s for s in final["steps"]}
        assert steps[step]["attempts"] == 2 and steps[step]["state"] == "done", steps[step]
        assert all(s["state"] in ("done", "skipped") for s in final["steps"]), final
        print(f"run done {time.monotonic() - restarted:.1f} s after the restarted service was ready")
    finally:
        service.stop()
