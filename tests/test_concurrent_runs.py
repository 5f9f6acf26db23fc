"""Six runs submitted at once to a real training service (`hopeit_server run --start-streams`, real Redis, its
own local Dask cluster): at most `runs.max_running` run at a time, the others wait `queued` (visible in
list-runs), requests beyond `runs.max_queued` are refused with a 429 in the error schema and register nothing,
and every accepted run completes: none hangs, no step is retried, no slot or queue place is left behind."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from uuid import uuid4

import pytest
import requests
from conftest import AUTH, ROOT, Service, free_port, service_env

from fraud_poc.launcher import SERVICES
from fraud_poc.store.redis_store import Keys
from fraud_poc.store.run_status import queued_key, running_key

pytestmark = pytest.mark.system  # services in subprocesses (the system tier)

API = "/api/training-pipeline/0x2"
RUN = {"num_orders": 12_000, "num_customers": 300, "months": 3, "fraud_rate": 0.03, "train_only": True}


class TrainingService(Service):
    """The training service with `settings` overrides in its own copy of `config/training-pipeline.json`,
    in a process group of its own (its Dask workers included), so that a test can kill -9 all of it."""

    def __init__(self, env: dict, log: Path, config_dir: Path, settings: dict):
        config = json.loads((ROOT / "config" / "training-pipeline.json").read_text())
        for key, values in settings.items():
            config["settings"][key] = {**config["settings"][key], **values}
        self.config = config_dir / "training-pipeline.json"
        self.config.write_text(json.dumps(config))
        self.env, self.log_dir, self.starts = env, log.parent, 0
        self.start()

    def start(self) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        args = [
            arg.replace("config/training-pipeline.json", str(self.config))
            for arg in SERVICES["training"].args(self.port)
        ]
        self.starts += 1
        self.log = self.log_dir / f"training-{self.starts}.log"
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "hopeit_server"), *args],
            cwd=ROOT,
            env=self.env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready()

    def kill(self) -> None:
        """kill -9 of the service and its Dask workers: nothing gets to clean up."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        super().stop()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # any worker left behind
        except ProcessLookupError:
            pass


def own_prefix(redis_client) -> Iterator[str]:
    """A key prefix of the test's own, its keys removed after it."""
    value = f"fraudtest:{uuid4().hex[:12]}:"
    yield value
    for key in redis_client.scan_iter(match=f"{value}*", count=1000):
        redis_client.unlink(key)


prefix = pytest.fixture(own_prefix, name="prefix")


def runs(service: Service) -> list[dict]:
    response = requests.get(f"{service.base}{API}/list-runs", params={"limit": 50}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["runs"]


def test_six_runs_at_once_queue_run_in_turn_and_all_complete(prefix, redis_client, tmp_path):
    settings = {"runs": {"max_running": 2, "max_queued": 3}, "delivery": {"check_interval_seconds": 1.0}}
    service = TrainingService(service_env(prefix, tmp_path / "data"), tmp_path / "log", tmp_path, settings)
    try:

        def submit(seed: int) -> requests.Response:
            return requests.post(
                f"{service.base}{API}/run-pipeline", json={**RUN, "seed": seed}, headers=AUTH, timeout=30
            )

        submitted = time.monotonic()
        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(pool.map(submit, range(6)))
        accepted = [a.json()["run_id"] for a in answers if a.status_code == 200]
        refused = [a for a in answers if a.status_code != 200]
        # 3 may wait; at most 2 of the accepted ones were admitted before the last request came
        assert 3 <= len(accepted) <= 5 and len(accepted) + len(refused) == 6, [a.text for a in answers]
        for answer in refused:
            assert answer.status_code == 429 and answer.headers["Content-Type"].startswith("application/json")
            assert answer.json() == {
                "status": 429,
                "error": "too many runs: 3 runs wait already: try again when one has started",
                "fields": [],
            }
        assert sorted(r["run_id"] for r in runs(service)) == sorted(accepted)  # a refused run left nothing

        most_running, seen_queued, deadline = 0, False, time.monotonic() + 480
        while time.monotonic() < deadline:
            snapshot = runs(service)
            states = [r["state"] for r in snapshot]
            most_running = max(most_running, states.count("running"))
            seen_queued = seen_queued or "queued" in states
            if all(state in ("done", "failed") for state in states):
                break
            time.sleep(0.3)
        final = runs(service)
        assert [r["state"] for r in final] == ["done"] * len(accepted), json.dumps(final, indent=1)
        assert seen_queued and 1 <= most_running <= 2
        print(
            f"{len(accepted)} accepted, {len(refused)} refused (429), all done {time.monotonic() - submitted:.1f} s after submission"
        )
        for run in final:
            assert [s["attempts"] for s in run["steps"]] == [1, 1, 1, 1, 1, 0], run  # nothing retried
        keys = Keys(prefix)
        assert redis_client.scard(running_key(keys)) == 0 and redis_client.zcard(queued_key(keys)) == 0
    finally:
        service.stop()
