"""model-health over a large log: fills the score log and the event log under a key prefix of its own with N scored
orders (the live model's 91 feature bins each), their order events and 2% fraud labels, then computes health in a
fresh process and prints its time and peak memory (RSS) against the same process before the computation.

    . config/env.sh && .venv/bin/python -m fraud_poc.store.redis_server -- .venv/bin/python bench/bench_health.py --orders 1000000
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from uuid import uuid4

import numpy as np
from report import recorded

from fraud_poc.core.schema import FEATURE_COLUMNS
from fraud_poc.model.health import DAY_US, drift_reference
from fraud_poc.store.health_log import scores_key
from fraud_poc.store.redis_store import Keys, redis_url_from_env, sync_redis

MODEL_ID = "xgb-bench"
PAUSE_RATIO = float(os.environ.get("HEALTH_PAUSE_RATIO", "0.5"))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fill(url: str, prefix: str, root: Path, orders: int, seed: int = 0) -> None:
    """The model's metadata on disk and `orders` scored orders, their events and labels in Redis."""
    rng = np.random.default_rng(seed)
    features = {c: rng.gamma(2, 10, 20_000) for c in FEATURE_COLUMNS}
    metadata = {
        "model_id": MODEL_ID,
        "threshold": 0.5,
        "label_delay_days": 7,
        "feature_columns": FEATURE_COLUMNS,
        "metrics": {
            "precision": 0.8,
            "recall": 0.7,
            "average_precision": 0.75,
            "rows": 20_000,
            "fraud_rows": 400,
        },
        "drift": drift_reference(features, rng.beta(1, 30, 20_000)),
    }
    (root / "models" / MODEL_ID / "report").mkdir(parents=True)
    (root / "models" / MODEL_ID / "metadata.json").write_text(json.dumps(metadata))
    r, keys = sync_redis(url), Keys(prefix)
    now_us = int(datetime.now(UTC).timestamp() * 1_000_000)
    chunk = 5000
    for start in range(0, orders, chunk):
        n = min(chunk, orders - start)
        ts = now_us - rng.integers(0, 30 * DAY_US, n)
        scores = rng.beta(1, 30, n)
        bins = rng.integers(0, 11, (n, len(FEATURE_COLUMNS)), dtype=np.uint8)
        fraud = rng.random(n) < 0.02
        pipe = r.pipeline(transaction=False)
        for i in range(n):
            oid = f"o{start + i}"
            pipe.xadd(
                scores_key(keys),
                {
                    "order_id": oid,
                    "ts": str(ts[i]),
                    "model_id": MODEL_ID,
                    "score": repr(float(scores[i])),
                    "bins": bins[i].tobytes(),
                },
            )
            pipe.xadd(
                keys.events,
                {
                    "kind": "order",
                    "order_id": oid,
                    "ts": str(ts[i]),
                    "customer_id": f"c{i % 5000}",
                    "email": f"e{i % 7000}@x.io",
                    "ip_addr": f"10.0.{i % 250}.{i % 200}",
                    "order_amount": "42.5",
                    "location_lat": "40.4",
                    "location_long": "-3.7",
                },
            )
            if fraud[i]:
                pipe.xadd(
                    keys.events,
                    {
                        "kind": "label",
                        "order_id": oid,
                        "ts": str(ts[i]),
                        "customer_id": f"c{i % 5000}",
                        "email": "e@x.io",
                        "ip_addr": "10.0.0.1",
                        "is_fraud": "1",
                        "label_ts": str(ts[i] + DAY_US),
                    },
                )
        pipe.execute()


def measure(url: str, prefix: str, root: str) -> None:
    """Compute health once and print time and peak RSS (run in a fresh process)."""
    import asyncio

    from fraud_poc.core.settings import HealthSettings
    from fraud_poc.store.health_log import compute_health, in_nice_thread

    r, keys = sync_redis(url), Keys(prefix)
    before = peak_mb()
    started = time.perf_counter()
    settings = HealthSettings(pause_ratio=PAUSE_RATIO)  # as the training service runs it: nice 10, paced
    report = asyncio.run(in_nice_thread(compute_health, r, keys, root, MODEL_ID, datetime.now(UTC), settings))
    print(
        json.dumps(
            {
                "seconds": round(time.perf_counter() - started, 1),
                "peak_rss_mb_before": round(before, 1),
                "peak_rss_mb_after": round(peak_mb(), 1),
                "computed": report["computed"],
                "verdict": report["verdict"],
                "live": report["quality"][MODEL_ID]["live"],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=1_000_000)
    parser.add_argument("--measure", nargs=2, metavar=("PREFIX", "ROOT"), help=argparse.SUPPRESS)
    parser.add_argument("--loop", nargs=2, metavar=("PREFIX", "ROOT"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--beside",
        help="a command (e.g. bench/bench_service.py ...) run twice after the measurement: alone, then while health "
        "is computed over and over on the same Redis",
    )
    args = parser.parse_args()
    url = redis_url_from_env()
    if args.measure:
        return measure(url, *args.measure)
    if args.loop:
        while True:
            measure(url, *args.loop)
    prefix = f"bench-health-{uuid4().hex[:8]}:"
    r = sync_redis(url)
    with tempfile.TemporaryDirectory() as root:
        started = time.perf_counter()
        fill(url, prefix, Path(root), args.orders)
        print(
            f"filled {args.orders:,} scored orders in {time.perf_counter() - started:.1f} s; "
            f"Redis used_memory {r.info('memory')['used_memory'] / 2**20:.0f} MB"
        )
        try:
            subprocess.run([sys.executable, __file__, "--measure", prefix, root], check=True)
            if args.beside:
                print("--- alone", flush=True)
                subprocess.run(args.beside, shell=True, check=True)
                print("--- while health is computed over and over", flush=True)
                loop = subprocess.Popen([sys.executable, __file__, "--loop", prefix, root])
                try:
                    time.sleep(3)  # the loop is reading the logs
                    subprocess.run(args.beside, shell=True, check=True)
                finally:
                    loop.terminate()
                    loop.wait()
        finally:
            r.delete(scores_key(Keys(prefix)), Keys(prefix).events)


if __name__ == "__main__":
    with recorded("bench_health"):
        main()
