"""Benchmark of the training pipeline's steps on a local Dask cluster, at the original proof of concept's size.

Runs each step of `STEPS` in order on one run (12 months x 100,000 orders, 10,000 customers by default) and
prints, per step and in total: wall seconds, orders per second, CPU seconds (this process and its Dask worker
processes) and peak memory (RSS of this process plus its worker processes, sampled every 20 ms).

    .venv/bin/python bench/bench_pipeline.py             # the services' default cluster: 2 worker processes x 1 thread
    .venv/bin/python bench/bench_pipeline.py --steps 4 --in-process --workers 1 --threads 2   # fastest for steps 1-4
    .venv/bin/python bench/bench_pipeline.py --scale 10   # then 12M orders, 100,000 customers: the ratios per step
    .venv/bin/python bench/bench_pipeline.py --scale 10 --external   # the same on a scheduler and 2 worker processes
    .venv/bin/python bench/bench_pipeline.py --orders 12000000 --customers 100000 --steps 3 --from-step feature-calc \
        --data-root /tmp/run12m   # one step again on the run an earlier call (--steps 2 --data-root ...) left there

Each step of `STEPS` is a `(name, callable)` pair; the callable takes a `BenchRun` and returns something with
`rows_out`. Steps 5-6 (train-model, prepare-db) use the configured Redis (`FRAUD_REDIS_URL`, default
redis://127.0.0.1:6379/0) under a key prefix of their own, removed afterwards. After the table: training rows/s,
feature-store entity states/s and the model's holdout metrics per fraud scenario.
"""

import argparse
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dask
import psutil
import redis
from distributed import Client, LocalCluster
from report import recorded

from fraud_poc.core.schema import FeatureSpec
from fraud_poc.core.settings import (
    FeatureStoreSettings,
    PreprocessSettings,
    TrainingDataSettings,
    TrainModelSettings,
)
from fraud_poc.pipeline.dask_client import (
    LOCAL_CLUSTER_CONFIG,
    WORKER_MALLOC,
    CompileKernels,
    release_worker_memory,
)
from fraud_poc.pipeline.steps.feature_calc import calc_features
from fraud_poc.pipeline.steps.prepare_db import PrepareResult, prepare_db_step
from fraud_poc.pipeline.steps.preprocess import preprocess_orders
from fraud_poc.pipeline.steps.sample_data import write_sample_data
from fraud_poc.pipeline.steps.train_model import TrainResult, train_model_step
from fraud_poc.pipeline.steps.training_data import make_training_data
from fraud_poc.store.redis_store import glob_escape, unlink_matching
from fraud_poc.store.registry import model_id_for_run


@dataclass
class BenchRun:
    """What every step needs: the cluster's client, the data root, the run id and the sample's size."""

    client: Client
    data_root: Path
    run_id: str
    num_orders: int
    num_customers: int
    months: int
    rows_per_partition: int = PreprocessSettings().rows_per_partition
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "fraudbench:"


STEPS: list[tuple[str, Callable[[BenchRun], object]]] = [
    (
        "sample-data",
        lambda run: write_sample_data(
            run.client,
            run.data_root,
            run.run_id,
            num_orders=run.num_orders,
            num_customers=run.num_customers,
            months=run.months,
            start_date="2025-01-01",
            fraud_rate=0.02,
            seed=42,
        ),
    ),
    (
        "preprocess",
        lambda run: preprocess_orders(
            run.client, run.data_root, run.run_id, None, rows_per_partition=run.rows_per_partition
        ),
    ),
    (
        "feature-calc",
        lambda run: calc_features(
            run.client,
            run.data_root,
            run.run_id,
            spec=FeatureSpec(
                window=FeatureStoreSettings().window, label_delay_days=FeatureStoreSettings().label_delay_days
            ),
        ),
    ),
    (
        "training-data",
        lambda run: make_training_data(run.client, run.data_root, run.run_id, TrainingDataSettings()),
    ),
    (
        "train-model",
        lambda run: train_model_step(
            run.client,
            run.data_root,
            run.run_id,
            redis_url=run.redis_url,
            key_prefix=run.key_prefix,
            settings=TrainModelSettings(),
        ),
    ),
    (
        "prepare-db",
        lambda run: prepare_db_step(
            run.client,
            run.data_root,
            run.run_id,
            model_id_for_run(run.run_id),
            redis_url=run.redis_url,
            key_prefix=run.key_prefix,
            chunk_size=FeatureStoreSettings().chunk_size,
        ),
    ),
]


def print_training_details(
    train: TrainResult | None, prepare: PrepareResult | None, prepare_wall: float
) -> None:
    """Training and feature-store rates, and the model's holdout metrics per fraud scenario."""
    if train is not None:
        m = train.metrics
        print(
            f"train-model: {train.train_rows:,} training rows in {train.train_seconds:.2f} s of training "
            f"= {train.train_rows / train.train_seconds:,.0f} rows/s; promoted: {train.promoted} ({train.reason})"
        )
        print(
            f"holdout ({train.holdout_rows:,} orders, {m['fraud_rows']:,} fraud): ROC AUC {m['roc_auc']:.4f}, "
            f"AP {m['average_precision']:.4f}, at threshold {m['threshold']:.4f}: precision {m['precision']:.4f}, "
            f"recall {m['recall']:.4f}, F1 {m['f1']:.4f}"
        )
        print(f"  {'scenario':<22}{'fraud':>8}{'detected':>10}{'recall':>8}")
        for name, row in m["recall_by_scenario"].items():
            print(f"  {name:<22}{row['count']:>8,}{row['detected']:>10,}{row['recall']:>8.3f}")
    if prepare is not None and prepare.loaded:
        print(
            f"prepare-db: {prepare.total_states:,} entity states {prepare.counts}; "
            f"read {prepare.read_seconds:.2f} s, Redis write {prepare.write_seconds:.2f} s "
            f"= {prepare.states_per_second:,.0f} states/s written; whole step {prepare.total_states / prepare_wall:,.0f} states/s"
        )


class MemorySampler:
    """Peak RSS of this process plus its child processes (the Dask workers), sampled in a thread."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me, processes = psutil.Process(), []
        for sample in itertools.count():
            if self._stop.is_set():
                break
            if sample % 50 == 0:  # finding the children scans every process of the machine: once a second
                processes = [me, *me.children(recursive=True)]
            total = 0
            for proc in processes:
                try:
                    total += proc.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live child processes."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--orders", type=int, default=1_200_000)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--months", type=int, default=12)
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="workers as threads of this process (default: worker processes)",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--external",
        action="store_true",
        help="a `dask scheduler` and --workers `dask worker` processes as the compose file starts them, not a LocalCluster",
    )
    parser.add_argument("--threads", type=int, default=1, help="threads per worker")
    parser.add_argument(
        "--rows-per-partition",
        type=int,
        default=PreprocessSettings().rows_per_partition,
        help="of the per-entity datasets (step 2)",
    )
    parser.add_argument(
        "--steps", type=int, default=len(STEPS), help="run only the first N steps (4: the data steps)"
    )
    parser.add_argument(
        "--data-root", type=Path, default=None, help="default: a temporary folder, removed after"
    )
    parser.add_argument(
        "--from-step",
        choices=[name for name, _ in STEPS],
        default=STEPS[0][0],
        help="start at this step, on the run an earlier call left in --data-root (e.g. feature-calc)",
    )
    parser.add_argument(
        "--scale",
        type=int,
        default=1,
        help="then again with this many times the orders and customers, and the ratios per step (10: 1.2M vs 12M)",
    )
    return parser.parse_args()


@dataclass
class StepFigures:
    result: object
    wall: float
    cpu: float
    peak: int


def run_steps(
    client: Client, args: argparse.Namespace, orders: int, customers: int, key_prefix: str
) -> dict[str, StepFigures]:
    """The first `args.steps` steps on a sample of `orders` and `customers`, a table line per step as it ends."""
    data_root = args.data_root or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    run = BenchRun(
        client,
        data_root,
        "bench",
        orders,
        customers,
        args.months,
        args.rows_per_partition,
        os.environ.get("FRAUD_REDIS_URL", "redis://127.0.0.1:6379/0"),
        key_prefix,
    )
    shape = f"{args.workers} {'in-process' if args.in_process else 'process'} worker(s) x {args.threads} thread(s)"
    print(
        f"{orders:,} orders, {customers:,} customers, {args.months} months; cluster: {shape}; "
        f"{args.rows_per_partition:,} rows per partition"
    )
    print(f"{'step':<15}{'wall s':>8}{'orders/s':>12}{'cpu s':>8}{'peak MB':>9}{'rows out':>11}")
    figures: dict[str, StepFigures] = {}
    try:
        first = [name for name, _ in STEPS].index(args.from_step)
        for name, step in STEPS[first : args.steps]:
            cpu_before = cpu_seconds()
            with MemorySampler() as memory:
                start = time.perf_counter()
                result = step(run)
                release_worker_memory(client)  # as the service does after every step
                wall = time.perf_counter() - start
            figures[name] = StepFigures(result, wall, cpu_seconds() - cpu_before, memory.peak)
            rows_out = getattr(result, "rows_out", 0)
            print(
                f"{name:<15}{wall:>8.2f}{orders / wall:>12,.0f}{figures[name].cpu:>8.1f}"
                f"{memory.peak / 2**20:>9,.0f}{rows_out:>11,}"
            )
        total_wall = sum(f.wall for f in figures.values())
        total_cpu = sum(f.cpu for f in figures.values())
        peak = max(f.peak for f in figures.values())
        print(
            f"{'total':<15}{total_wall:>8.2f}{orders / total_wall:>12,.0f}{total_cpu:>8.1f}{peak / 2**20:>9,.0f}"
        )
        print(f"load average (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in psutil.getloadavg())}")
        prepare = figures.get("prepare-db")
        train = figures.get("train-model")
        print_training_details(
            train and train.result, prepare and prepare.result, prepare.wall if prepare else 0.0
        )
    finally:
        unlink_matching(redis.Redis.from_url(run.redis_url), glob_escape(key_prefix) + "*")
        if args.data_root is None:
            shutil.rmtree(data_root, ignore_errors=True)
    return figures


def print_scaling(small: dict[str, StepFigures], large: dict[str, StepFigures], factor: int) -> None:
    """Per step, the larger sample's wall time, CPU and peak memory as multiples of the smaller's (linear: factor)."""
    print(f"scaling x{factor} (linear: {factor:.1f}x time and CPU)")
    print(f"{'step':<15}{'wall':>8}{'cpu':>8}{'peak MB':>9}")
    for name in small:
        a, b = small[name], large[name]
        print(f"{name:<15}{b.wall / a.wall:>7.1f}x{b.cpu / a.cpu:>7.1f}x{b.peak / a.peak:>8.1f}x")
    wall = sum(f.wall for f in large.values()) / sum(f.wall for f in small.values())
    cpu = sum(f.cpu for f in large.values()) / sum(f.cpu for f in small.values())
    print(f"{'total':<15}{wall:>7.1f}x{cpu:>7.1f}x")


def main() -> None:
    args = parse_args()
    if args.from_step != STEPS[0][0] and args.data_root is None:
        raise SystemExit("--from-step needs --data-root: the run its earlier steps left there")
    with cluster_client(args) as client:
        run_all(client, args)


@contextmanager
def cluster_client(args: argparse.Namespace) -> Iterator[Client]:
    """A client of the services' default local cluster, or with `--external` of a `dask scheduler` and `dask worker`
    processes started as docker/docker-compose.yml starts them (1 thread and 4 GiB each, work stealing off, the
    same malloc settings), children of this process so that their CPU and memory are counted."""
    if not args.external:
        with dask.config.set(
            LOCAL_CLUSTER_CONFIG
        ):  # the services' local cluster settings (fraud_poc.pipeline.dask_client)
            cluster = LocalCluster(
                n_workers=args.workers,
                threads_per_worker=args.threads,
                processes=not args.in_process,
                dashboard_address=":0",
                memory_limit="6GiB",
            )
        with cluster, Client(cluster, set_as_default=False) as client:
            yield client
        return
    dask_cli = str(Path(sys.executable).parent / "dask")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    env["DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING"] = "False"
    for key, value in WORKER_MALLOC.items():
        env["DASK_" + key.upper().replace(".", "__").replace("-", "_")] = str(value)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    command = [[dask_cli, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"]]
    command += [
        [dask_cli, "worker", address, "--name", f"worker-{i}", "--host", "127.0.0.1", "--nthreads", "1"]
        + ["--memory-limit", "4GiB", "--no-dashboard"]
        for i in range(args.workers)
    ]
    processes = [
        subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in command
    ]
    try:
        with Client(address, timeout=60, set_as_default=False) as client:
            client.wait_for_workers(args.workers, timeout=60)
            print(
                f"external cluster at {address}: a scheduler and {args.workers} worker processes (1 thread, 4 GiB)"
            )
            yield client
    finally:
        for process in processes[::-1]:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def run_all(client: Client, args: argparse.Namespace) -> None:
    # as the services' cluster does: workers load feature-calc's compiled kernels as they start
    client.register_plugin(CompileKernels())
    key_prefix = f"fraudbench:{os.getpid()}:"
    small = run_steps(client, args, args.orders, args.customers, key_prefix)
    if args.scale > 1:
        print()
        large = run_steps(client, args, args.orders * args.scale, args.customers * args.scale, key_prefix)
        print()
        print_scaling(small, large, args.scale)


if __name__ == "__main__":
    with recorded("bench_pipeline"):
        main()
