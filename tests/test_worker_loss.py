"""A Dask worker killed during train-model: the attempt fails at once, and the retry trains on the workers that exist.

Before: `pin_partitions` restricted each partition strictly to a worker address. The failed attempt's tasks stay
known to the scheduler, a retry computes the same keys, and the read tasks waited for the dead worker (`no-worker`)
until the step's stream timeout. Now the placement is a preference: where the worker is alive the partition still
runs there (reproducible models, `test_training_train.py`), else on another worker.

XGBoost's collective timeouts do not cover every phase: a peer lost while the group bootstraps can leave the
survivor blocked in `XGCommunicatorInit` for good (seen in CI: the attempt still waited after 120 s with a 20 s
timeout, and then its retry queued behind the blocked thread). `train.failing_on_worker_loss` restarts the
surviving workers and fails the attempt at once; the second test shows that on a task that blocks for good.
"""

import os
import signal
import threading
import time

import dask
import dask.dataframe as dd
import numpy as np
import pytest
from distributed import Client, LocalCluster
from test_training_train import synthetic

from fraud_poc.core.schema import LABEL
from fraud_poc.model.train import WorkerLost, failing_on_worker_loss, predict_scores, roc_auc, train_booster
from fraud_poc.pipeline.dask_client import LOCAL_CLUSTER_CONFIG

pytestmark = pytest.mark.system  # kills a Dask worker process (the system tier)

PARAMS = {"max_depth": 6, "learning_rate": 0.05, "seed": 11}
ROUNDS = 300  # a few seconds of training: time to kill a worker while it runs


@pytest.fixture
def cluster_client():
    """A cluster of its own (a worker gets killed): 2 worker processes under nannies, as the service starts them."""
    with (
        dask.config.set(LOCAL_CLUSTER_CONFIG),
        LocalCluster(
            n_workers=2, threads_per_worker=1, dashboard_address=":0", memory_limit="1GiB", host="127.0.0.1"
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        yield client


def training_workers(client: Client) -> set[str]:
    """The workers on which one of xgboost.dask's training tasks (`fn-*`, one per worker) is running."""
    return client.run_on_scheduler(
        lambda dask_scheduler: {
            ts.processing_on.address
            for key, ts in dask_scheduler.tasks.items()
            if str(key).startswith("fn-") and ts.state == "processing"
        }
    )


def kill_worker(client: Client, address: str) -> None:
    os.kill(client.run(os.getpid)[address], signal.SIGKILL)


def wait_for_workers(client: Client, n: int) -> None:
    deadline = time.monotonic() + 60
    while len(client.nthreads()) < n:  # the nanny starts a new worker, on a new address
        assert time.monotonic() < deadline, "no worker came back"
        time.sleep(0.2)


def test_retry_after_a_worker_died_in_training_runs_on_the_workers_that_exist(cluster_client, tmp_path):
    client = cluster_client
    dd.from_pandas(synthetic(20_000, 1), npartitions=6).to_parquet(tmp_path / "train")
    dd.from_pandas(synthetic(4_000, 2), npartitions=3).to_parquet(tmp_path / "tuning")
    holdout = synthetic(2_000, 3)
    results: dict = {}

    def attempt(name: str) -> None:
        # read from files, as the step does: every attempt builds the same task keys
        train, tuning = dd.read_parquet(tmp_path / "train"), dd.read_parquet(tmp_path / "tuning")
        try:
            results[name] = train_booster(client, train, tuning, PARAMS, ROUNDS, ROUNDS)
        except Exception as e:  # noqa: BLE001 -- the first attempt is expected to fail; recorded for the asserts
            results[name] = e

    first = threading.Thread(target=attempt, args=("first",), daemon=True)
    first.start()
    deadline = time.monotonic() + 60
    while len(training_workers(client)) < 2:
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.05)
    # into the boosting rounds: a kill during the collective's bootstrap can abort the process that runs XGBoost's
    # tracker (the scheduler's, here this one), an XGBoost fault no retry can help
    time.sleep(1.5)
    assert first.is_alive(), "training ended before the worker was killed: make ROUNDS larger"
    victim = sorted(client.nthreads())[0]
    kill_worker(client, victim)
    first.join(timeout=60)
    assert not first.is_alive(), "the attempt waits for the dead worker"
    assert isinstance(results["first"], Exception), "the attempt survived the loss of a worker"

    wait_for_workers(client, 2)
    assert victim not in client.nthreads()
    retry = threading.Thread(target=attempt, args=("retry",), daemon=True)
    retry.start()
    retry.join(timeout=180)  # a few seconds normally; before the fix, never
    assert not retry.is_alive(), "the retry waits for the dead worker"
    trained = results["retry"]
    assert not isinstance(trained, Exception), trained
    scores = predict_scores(client, trained.booster, dd.from_pandas(holdout, npartitions=2))
    assert roc_auc(holdout[LABEL].to_numpy(), np.asarray(scores)) > 0.9


def test_work_blocked_on_a_lost_peer_fails_at_once_and_frees_its_worker(cluster_client):
    """Like a survivor blocked in XGBoost's bootstrap: a task holds its worker's only thread for good."""
    client = cluster_client
    survivor, victim = sorted(client.nthreads())
    outcome: dict = {}

    def blocked_training() -> None:
        started = time.monotonic()
        try:
            with failing_on_worker_loss(client):
                client.submit(time.sleep, 3600, workers=[survivor], pure=False).result()
        except Exception as e:  # noqa: BLE001 -- recorded for the asserts
            outcome["error"] = e
        outcome["seconds"] = time.monotonic() - started

    attempt = threading.Thread(target=blocked_training, daemon=True)
    attempt.start()
    deadline = time.monotonic() + 30
    while not client.processing()[survivor]:
        assert time.monotonic() < deadline, "the blocking task never started"
        time.sleep(0.05)
    kill_worker(client, victim)
    attempt.join(timeout=60)
    assert not attempt.is_alive(), "the attempt waits for the blocked task"
    assert isinstance(outcome["error"], WorkerLost) and victim in str(outcome["error"]), outcome
    # the blocked worker was restarted: every worker takes new work at once
    wait_for_workers(client, 2)
    workers = sorted(client.nthreads())
    assert survivor not in workers
    done = [client.submit(os.getpid, workers=[w], pure=False) for w in workers]
    assert len(set(client.gather(done, direct=False))) == 2
