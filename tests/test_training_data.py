"""fraud_poc.pipeline.steps.training_data: step 4 on a real LocalCluster over step 3's features, under a data root of the
session's own; the split partition by partition against the split of the whole frame in pandas."""

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from step_runs import SAMPLE, SPLIT

from fraud_poc.core.schema import LABEL
from fraud_poc.core.settings import TrainingDataSettings
from fraud_poc.pipeline.steps.training_data import (
    SPLIT_PARTS,
    holdout_rows,
    make_training_data,
    split_bounds,
    training_rows,
    tuning_rows,
)
from fraud_poc.store.datasets import features_dir, training_paths


def read_parts(data_root: Path, run_id: str) -> dict[str, pd.DataFrame]:
    """Step 4's output, each part sorted by order date and id."""
    return {
        part: pd.read_parquet(path).sort_values(["order_date", "order_id"], ignore_index=True)
        for part, path in zip(SPLIT_PARTS, training_paths(data_root, run_id), strict=True)
    }


@pytest.fixture(scope="module")
def whole(training_run) -> pd.DataFrame:
    """Step 3's features, read as one pandas frame."""
    return pd.read_parquet(features_dir(training_run.data_root, training_run.run_id))


def test_the_split_is_the_split_of_the_whole_frame(training_run, whole):
    bounds = split_bounds(
        whole["order_date"].min(),
        whole["order_date"].max(),
        SPLIT.validation_days,
        SPLIT.tuning_days,
        SPLIT.warmup_days,
    )
    expected = {
        "train": training_rows(whole, bounds, SPLIT.non_fraud_fraction, SPLIT.seed),
        "tuning": tuning_rows(whole, bounds),
        "holdout": holdout_rows(whole, bounds),
    }
    parts = read_parts(training_run.data_root, training_run.run_id)
    for part in SPLIT_PARTS:  # partition by partition = the whole frame at once
        assert parts[part].equals(expected[part].sort_values(["order_date", "order_id"], ignore_index=True))


def test_details_give_the_periods_and_their_sizes(training_run):
    step4, orders = training_run.results["training-data"], training_run.orders
    parts = read_parts(training_run.data_root, training_run.run_id)
    earliest, latest = orders["order_date"].min(), orders["order_date"].max()
    holdout_start = latest - pd.Timedelta(days=SPLIT.validation_days)
    assert step4.rows_in == SAMPLE["num_orders"] and step4.rows_out == sum(map(len, parts.values()))
    assert step4.details == {
        "train_from": (earliest + pd.Timedelta(days=SPLIT.warmup_days)).isoformat(),
        "tuning_start": (holdout_start - pd.Timedelta(days=SPLIT.tuning_days)).isoformat(),
        "holdout_start": holdout_start.isoformat(),
        **{f"{part}_rows": len(parts[part]) for part in SPLIT_PARTS},
        **{f"{part}_fraud": int(parts[part][LABEL].sum()) for part in SPLIT_PARTS},
    }
    assert json.loads(json.dumps(asdict(step4))) == asdict(step4)  # the run status stores it as JSON
    # the periods follow each other: training, tuning, holdout, up to the latest order
    details = {k: pd.Timestamp(v) for k, v in step4.details.items() if not k.endswith(("_rows", "_fraud"))}
    assert parts["train"]["order_date"].max() <= details["tuning_start"] < parts["tuning"]["order_date"].min()
    assert (
        parts["tuning"]["order_date"].max() <= details["holdout_start"] < parts["holdout"]["order_date"].min()
    )
    assert parts["holdout"]["order_date"].max() == latest


def test_warm_up_days_are_history_only(training_run, whole):
    train_from = pd.Timestamp(training_run.results["training-data"].details["train_from"])
    warm_up = set(whole.loc[whole["order_date"] < train_from, "order_id"])
    assert len(warm_up) > 1_000  # the sample has orders there
    parts = read_parts(training_run.data_root, training_run.run_id)
    assert all(warm_up.isdisjoint(parts[part]["order_id"]) for part in SPLIT_PARTS)
    assert parts["train"]["order_date"].min() >= train_from


def test_non_fraud_subsample_is_seeded_and_keeps_every_fraud(client, training_run, whole, tmp_path):
    details = training_run.results["training-data"].details
    start, end = pd.Timestamp(details["train_from"]), pd.Timestamp(details["tuning_start"])
    period = whole[(whole["order_date"] >= start) & (whole["order_date"] <= end)]
    fraud, legitimate = (
        set(period.loc[period[LABEL], "order_id"]),
        set(period.loc[~period[LABEL], "order_id"]),
    )
    data_root = training_run.copy(tmp_path)
    other = make_training_data(client, data_root, training_run.run_id, replace(SPLIT, seed=SPLIT.seed + 1))
    parts = read_parts(training_run.data_root, training_run.run_id)
    others = read_parts(data_root, training_run.run_id)
    kept, kept_other = (set(p["train"].loc[~p["train"][LABEL], "order_id"]) for p in (parts, others))
    n, f = len(legitimate), SPLIT.non_fraud_fraction
    for train, chosen in ((parts["train"], kept), (others["train"], kept_other)):
        assert set(train.loc[train[LABEL], "order_id"]) == fraud  # all fraud of the period
        assert chosen <= legitimate and abs(len(chosen) - f * n) < 4 * np.sqrt(n * f * (1 - f))
    # another seed, another choice: about as independent as two draws (overlap near f * f * n)
    assert abs(len(kept & kept_other) - f * f * n) < 4 * np.sqrt(n * f * f * (1 - f * f))
    assert all(others[part].equals(parts[part]) for part in ("tuning", "holdout"))
    assert other.details["tuning_rows"] == len(parts["tuning"])


def test_retry_replaces_the_output_with_the_same_and_leaves_step_3s_alone(client, training_run, whole):
    run = training_run
    before = read_parts(run.data_root, run.run_id)
    assert make_training_data(client, run.data_root, run.run_id, SPLIT) == run.results["training-data"]
    after = read_parts(run.data_root, run.run_id)
    assert all(after[part].equals(before[part]) for part in SPLIT_PARTS)
    assert pd.read_parquet(features_dir(run.data_root, run.run_id)).equals(whole)
    assert run.leftovers() == []


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            TrainingDataSettings(validation_days=365),
            r"the orders span 90\.0 days \(2025-01-01 00:05 to 2025-03-31 23:46 UTC\), but warm-up \(30\), "
            r"tuning \(15\) and holdout \(365\) take 410 days",
        ),
        (TrainingDataSettings(validation_days=0), r"validation_days must be >= 1, got 0"),
    ],
    ids=["no-training-period", "no-holdout-days"],
)
def test_a_split_it_cannot_make_fails_clearly_and_leaves_the_previous_output(
    client, training_run, tmp_path, settings, message
):
    data_root = training_run.copy(tmp_path)
    before = read_parts(data_root, training_run.run_id)
    with pytest.raises(ValueError, match=f"^{message}"):
        make_training_data(client, data_root, training_run.run_id, settings)
    after = read_parts(data_root, training_run.run_id)
    assert all(after[part].equals(before[part]) for part in SPLIT_PARTS)


def test_missing_features_name_the_step_to_run_first(client, tmp_path):
    with pytest.raises(FileNotFoundError, match="no features for run 'r9': run step feature-calc first"):
        make_training_data(client, tmp_path, "r9", SPLIT)
