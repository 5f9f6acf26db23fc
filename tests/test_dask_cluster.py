"""The pipeline on a Dask cluster the service did not start: `dask scheduler` and two `dask worker` processes,
as docker/docker-compose.yml runs them, and a training service pointed at it by DASK_SCHEDULER_ADDRESS."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Service, free_port, service_env
from distributed import Client
from test_end_to_end import SMALL, finished, start, wait_for

pytestmark = pytest.mark.system  # services in subprocesses (the system tier)

DASK = str(Path(sys.executable).parent / "dask")


def spawn(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([DASK, *args], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler and two single-thread workers on loopback, with the compose file's settings."""
    logs = tmp_path_factory.mktemp("dask-logs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env["DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING"] = "False"
    address = f"tcp://127.0.0.1:{free_port()}"
    port = address.rsplit(":", 1)[1]
    processes = [
        spawn(
            ["scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"],
            env,
            logs / "scheduler.log",
        )
    ]
    for name in ("worker-a", "worker-b"):
        processes.append(
            spawn(
                [
                    "worker",
                    address,
                    "--name",
                    name,
                    "--host",
                    "127.0.0.1",
                    "--nthreads",
                    "1",
                    "--memory-limit",
                    "3GiB",
                    "--no-dashboard",
                ],
                env,
                logs / f"{name}.log",
            )
        )
    try:
        with Client(address, timeout=60, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
            yield address, client
    finally:
        for process in processes[::-1]:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def executed_by_worker(client: Client) -> dict[str, int]:
    """Tasks each worker has run since it started, by worker name."""
    counts = client.run(lambda dask_worker: (dask_worker.name, dask_worker.state.executed_count))
    return dict(counts.values())


def test_pipeline_runs_to_promotion_on_an_external_cluster(
    cluster, key_prefix, redis_client, tmp_path_factory
):
    address, client = cluster
    before = executed_by_worker(client)
    env = {
        **service_env(key_prefix + "ext:", tmp_path_factory.mktemp("data")),
        "DASK_SCHEDULER_ADDRESS": address,
    }
    training = Service("training", env, tmp_path_factory.mktemp("logs") / "training.log")
    try:
        training.wait_ready()
        run_id = start(training, "run-pipeline", SMALL)
        status = wait_for(training, run_id, finished, timeout=400)
    finally:
        training.stop()
    assert status["state"] == "done" and status["promoted"] is True, status
    after = executed_by_worker(client)
    assert set(after) == {"worker-a", "worker-b"}  # the cluster's own workers, none started by the service
    ran = {name: after[name] - before.get(name, 0) for name in after}
    assert all(count > 0 for count in ran.values()), ran  # both workers ran pipeline tasks
