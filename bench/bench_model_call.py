"""The model part of one request: score and approximate contributions of 1 and of 100 rows, by the compiled tree
walk against XGBoost's C API (two calls) and its Python API, on boosters of the pipeline's shape (91 features,
depth 6, `--trees`). Also what the compiled path costs a process once: numba's import, the kernel compiled or
read from numba's cache, and the resident memory both add.

Each figure is the median wall time of `--repeat` calls, one thread, and the CPU time per call over them.

    .venv/bin/python bench/bench_model_call.py --trees 30,100
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report import recorded  # noqa: E402

from fraud_poc.core.schema import FEATURE_COLUMNS  # noqa: E402


def booster_of(trees: int, seed: int = 0):
    """A binary:logistic booster with `trees` trees of depth 6 over the model's 91 features, 10% missing values."""
    import xgboost as xgb

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(20_000, len(FEATURE_COLUMNS))).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan
    z = np.nan_to_num(x)
    y = z[:, 0] + z[:, 1] * z[:, 2] - z[:, 3] + z[:, 4:20].sum(axis=1) * 0.2 + rng.normal(size=len(x)) > 1.5
    params = {
        "objective": "binary:logistic",
        "max_depth": 6,
        "learning_rate": 0.3,
        "nthread": 1,
        "seed": seed,
    }
    booster = xgb.train(params, xgb.QuantileDMatrix(x, y.astype(float)), trees)
    booster.set_param({"nthread": 1})
    return booster, x


def per_call(fn, repeat: int) -> tuple[float, float]:
    """Median wall time and mean CPU time of `fn()`, in microseconds."""
    for _ in range(max(repeat // 10, 5)):
        fn()
    samples, cpu = [], time.process_time()
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return float(np.median(samples) * 1e6), (time.process_time() - cpu) / repeat * 1e6


def process_cost() -> str:
    """In a fresh process: the seconds and resident MB that building a compiled predictor adds to a process that
    has loaded XGBoost and a booster already."""
    code = """
import resource, time
import numpy as np, xgboost as xgb
rng = np.random.default_rng(0)
x = rng.normal(size=(500, 91))
booster = xgb.train({"objective": "binary:logistic", "max_depth": 6, "nthread": 1}, xgb.DMatrix(x, x[:, 0] > 0), 30)
from fraud_poc.model.row_predictor import RowPredictor
RowPredictor(booster, compiled=False)
def memory():
    fields = dict(line.split(":") for line in open("/proc/self/smaps_rollup") if line.count(":") == 1)
    return [int(fields[k].split()[0]) / 1024 for k in ("Rss", "Anonymous")]
before, started = memory(), time.perf_counter()
predictor = RowPredictor(booster)
print(predictor.path, f"{time.perf_counter() - started:.2f}", *(f"{b - a:.0f}" for a, b in zip(before, memory())))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    path, seconds, rss, anonymous = out.stdout.split()
    return f"{path} predictor built in {seconds} s, +{rss} MB resident of which {anonymous} MB anonymous"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trees", type=lambda s: [int(t) for t in s.split(",")], default=[30, 100])
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()

    from fraud_poc.model.row_predictor import RowPredictor

    cached = any((REPO / "fraud_poc" / "model" / "__pycache__").glob("tree_walk._walk_rows-*.nbi"))
    print(f"numba's cache {'has' if cached else 'does not have'} the kernel at the start")
    print(f"a new process: {process_cost()}")  # before this process compiles it, if it must
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores, one thread per call")
    for trees in args.trees:
        booster, x = booster_of(trees)
        paths = {
            "Python API": RowPredictor(booster, use_c_api=False, compiled=False),
            "C API": RowPredictor(booster, compiled=False),
            "compiled": RowPredictor(booster, compiled=True),
        }
        for n in (1, 100):
            rows = x[:n].astype(np.float64)
            repeat = args.repeat if n == 1 else max(args.repeat // 10, 50)
            figures = {
                name: per_call(lambda p=p, rows=rows: p.scores_and_contributions(rows), repeat)
                for name, p in paths.items()
            }
            line = ", ".join(
                f"{name} {wall:7.1f} us (CPU {cpu:7.1f})" for name, (wall, cpu) in figures.items()
            )
            print(f"{trees:4d} trees, {n:3d} row(s): {line}")
    print(f"another new process: {process_cost()}")


if __name__ == "__main__":
    with recorded("bench_model_call"):
        main()
