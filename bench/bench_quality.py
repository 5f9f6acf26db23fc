"""Model quality on the generator's data: feature set 1 alone against sets 1 + 3 (the time windows, on hourly
tiles), without and with the monotone constraints on the confirmed-fraud features (issue 19), and the default model
(sets 1+3 monotone) with its training rows capped (`train_model.max_train_rows`, issue 20), over several seeds.

For each seed: generate orders (SPEC 1.2, with compromised shared IPs and chargeback delays), compute every
order's features with `fraud_poc.features.definitions.compute_features`, split them as step 4 does (warm-up days as history
only, training rows with non-fraud subsampled, a tuning period for early stopping and the threshold, the most
recent days as the holdout), train XGBoost with the pipeline's parameters on each feature set, and print the
holdout's average precision, ROC AUC, precision and recall at the threshold, recall per fraud scenario and the
trees kept by early stopping, and the mean holdout score over the holdout's fraud rate (1: calibrated; the
scores are corrected for training's subsampling as train-model corrects them). A capped row keeps every fraud
row of the training part and the legitimate ones at the rate that makes the cap (`fraud_poc.model.train`'s
`negative_keep_rate` and `keep_negatives`, one partition). Single process (`xgboost.train`, the same parameters as `xgboost.dask` gets), so the
figures are about the features, not the cluster.

    .venv/bin/python bench/bench_quality.py                       # 3 seeds x 1.2M orders, 10,000 customers, 12 months
    .venv/bin/python bench/bench_quality.py --seeds 1 --orders 150000 --customers 1500
    .venv/bin/python bench/bench_quality.py --chart recall_by_scenario.png
    .venv/bin/python bench/bench_quality.py --seeds 1 --caps 0,250000,100000,50000   # only the default model
"""

import argparse
import time

import numpy as np
import pandas as pd
from report import recorded

from fraud_poc.core.schema import FEATURE_COLUMNS, FEATURE_SET_1, LABEL
from fraud_poc.core.settings import TrainingDataSettings, TrainModelSettings
from fraud_poc.features.generator import SCENARIOS, generate_orders
from fraud_poc.model.quality import holdout_quality, labelled_features
from fraud_poc.model.report import recall_by_scenario_png
from fraud_poc.model.train import keep_negatives, negative_keep_rate
from fraud_poc.pipeline.steps.train_model import booster_params
from fraud_poc.pipeline.steps.training_data import holdout_rows, split_bounds, training_rows, tuning_rows

# name: (the model's input, monotone constraints on its confirmed-fraud features)
VARIANTS = {
    "set 1": (FEATURE_SET_1, False),
    "sets 1+3 unconstrained": (FEATURE_COLUMNS, False),
    "sets 1+3 monotone": (FEATURE_COLUMNS, True),
}
DEFAULT_VARIANT = "sets 1+3 monotone"  # what the pipeline trains: the one the caps are measured on


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds (1, 2, ...)")
    parser.add_argument("--orders", type=int, default=1_200_000)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--months", type=int, default=12)
    parser.add_argument(
        "--chart", help="write the recall-per-scenario chart of the last seed to this PNG file"
    )
    parser.add_argument(
        "--caps",
        help="comma-separated max_train_rows (0: no cap): only the default model, with each of them (default: "
        "every feature variant uncapped, and the default model with the default cap)",
    )
    args = parser.parse_args()
    split = TrainingDataSettings()
    if args.caps is None:  # (variant, max_train_rows)
        runs = [(name, 0) for name in VARIANTS] + [(DEFAULT_VARIANT, TrainModelSettings().max_train_rows)]
    else:
        runs = [(DEFAULT_VARIANT, int(cap)) for cap in args.caps.split(",")]
    rows = []
    for seed in range(1, args.seeds + 1):
        started = time.perf_counter()
        orders = generate_orders(args.orders, args.customers, args.months, "2025-01-01", 0.02, seed)
        features = labelled_features(orders)
        dates = features["order_date"]  # step 4's periods, rows in time order
        bounds = split_bounds(
            dates.min(), dates.max(), split.validation_days, split.tuning_days, split.warmup_days
        )
        train = training_rows(features, bounds, split.non_fraud_fraction, seed)
        parts = tuple(
            p.sort_values(["order_date", "order_id"], ignore_index=True)
            for p in (train, tuning_rows(features, bounds), holdout_rows(features, bounds))
        )
        prepared = time.perf_counter() - started
        fraud_rows = int(parts[0][LABEL].sum())
        for name, cap in runs:
            columns, monotone = VARIANTS[name]
            started = time.perf_counter()
            settings = TrainModelSettings(monotone_confirmed_fraud=monotone, max_train_rows=cap)
            params = {**booster_params(settings, columns), "nthread": 2}
            rate = negative_keep_rate(len(parts[0]), fraud_rows, cap)
            train = keep_negatives(parts[0], rate, settings.seed, 0)
            metrics = holdout_quality(
                (train, parts[1], parts[2]),
                columns,
                params,
                settings.num_boost_round,
                settings.early_stopping_rounds,
                settings.threshold_metric,
                keep_rate=split.non_fraud_fraction * rate,
            )
            recall = {s: v["recall"] for s, v in metrics["recall_by_scenario"].items()}
            rows.append(
                {
                    "seed": seed,
                    "features": name if not cap else f"{name}, cap {cap:,}",
                    "train rows": len(train),
                    "AP": metrics["average_precision"],
                    "ROC AUC": metrics["roc_auc"],
                    "precision": metrics["precision"],
                    "recall": metrics["recall"],
                    "trees": metrics["trees"],
                    "score/fraud rate": metrics["mean_score"] / parts[2][LABEL].mean(),
                    **{f"recall {s}": recall.get(s, np.nan) for s in SCENARIOS},
                    "train s": time.perf_counter() - started,
                }
            )
        last = metrics
        print(
            f"seed {seed}: {len(orders):,} orders, fraud {orders[LABEL].mean():.2%}; "
            f"train {len(parts[0]):,} / tuning {len(parts[1]):,} / holdout {len(parts[2]):,} rows "
            f"({parts[2][LABEL].sum():,} fraud); features and split {prepared:.1f} s",
            flush=True,
        )
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.precision", 3):
        print(table.set_index(["seed", "features"]).T)
        print("\nmean over seeds:")
        print(table.drop(columns="seed").groupby("features", sort=False).mean().T)
    if args.chart:
        with open(args.chart, "wb") as f:
            f.write(recall_by_scenario_png(last["recall_by_scenario"]))
        print(f"chart: {args.chart}")


if __name__ == "__main__":
    with recorded("bench_quality"):
        main()
