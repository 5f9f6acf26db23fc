"""fraud_poc.pipeline.steps.train_model: step 5 on runs made by the real steps 1-4, with prepare-db where the gate needs a
live champion; real Redis, real LocalCluster."""

import json
import shutil
from pathlib import Path
from uuid import uuid4

import msgpack
import numpy as np
import pandas as pd
import pytest
import redis
from step_runs import REDIS_URL, RUN_SPLIT, SETTINGS, prepare_args, run_steps_3_and_4

from fraud_poc.core.schema import ENTITIES, FEATURE_COLUMNS, LABEL, SCENARIO, FeatureSpec
from fraud_poc.core.settings import TrainModelSettings
from fraud_poc.features.definitions import serving_states, state_of, timestamp_us
from fraud_poc.features.serving_state import decode_state, decode_tile
from fraud_poc.model.health import bin_counts
from fraud_poc.model.train import average_precision, cap_training_rows, negative_keep_rate, prior_correction
from fraud_poc.pipeline.steps.prepare_db import prepare_db_step
from fraud_poc.pipeline.steps.train_model import train_model_step
from fraud_poc.store.datasets import (
    FEATURE_SPEC_FILE,
    FeatureSpecError,
    read_dataset,
    run_dir,
    serving_state_dir,
    training_paths,
    write_feature_spec,
)
from fraud_poc.store.feature_store import live_pointer, version_meta
from fraud_poc.store.redis_store import Keys
from fraud_poc.store.registry import list_models, load_booster, load_metadata

DEFAULT_SPEC = FeatureSpec()  # the spec make_runs' runs are computed with


@pytest.fixture(scope="module")
def store():
    r = redis.Redis.from_url(REDIS_URL)
    keys = Keys(f"fraudtest:{uuid4().hex}:")
    yield r, keys
    for key in r.scan_iter(match=f"{keys.prefix}*", count=1000):
        r.unlink(key)


def read_holdout(data_root: Path, run_id: str) -> pd.DataFrame:
    return pd.read_parquet(training_paths(data_root, run_id)[2]).sort_values("order_id", ignore_index=True)


def assert_loaded_states(
    r: redis.Redis, keys: Keys, version: str, orders: pd.DataFrame, spec: FeatureSpec = DEFAULT_SPEC
) -> None:
    """Every value's records, tiles and order entries in Redis equal the batch definition: `serving_states` of the
    run's orders with the run's `spec`, labels known by its newest order."""
    as_of_us = timestamp_us(orders["order_date"].max())
    entries = {}
    for by in ENTITIES:
        states = serving_states(orders, by, spec.window, spec.label_delay_days, as_of_us=as_of_us)
        values = states.records[by].unique().tolist()
        assert sorted(values) == sorted(orders[by].unique())
        pipe = r.pipeline(transaction=False)
        for v in values:
            pipe.get(keys.fs_state(version, by, v))
            pipe.zrange(keys.fs_tiles(version, by, v), 0, -1)
        replies = pipe.execute()
        stored = [
            (decode_state(raw), [decode_tile(member) for member in members])
            for raw, members in zip(replies[::2], replies[1::2], strict=True)
        ]
        assert stored == [state_of(states, by, v) for v in values], by
        assert any(tile[3] for _, tiles in stored for tile in tiles)  # labels are in the tiles
        for row in states.orders.itertuples(index=False, name=None):
            entries[row[0]] = [int(row[1]), *row[2:5], int(row[5]), int(row[6])]
    stored_entries = r.hgetall(keys.fs_orders(version))
    assert {k.decode(): msgpack.unpackb(v, raw=False) for k, v in stored_entries.items()} == entries


def test_pipeline_steps_5_and_6(client, store, runs):
    r, keys = store
    data_root, orders_a, orders_b = runs

    # run 1: the first model is promoted and goes live with its features
    first = train_model_step(
        client, data_root, "run-1", redis_url=REDIS_URL, key_prefix=keys.prefix, settings=SETTINGS
    )
    assert (first.model_id, first.promoted, first.champion_id, first.reused) == (
        "xgb-run-1",
        True,
        None,
        False,
    )
    assert (
        first.reason
        == f"first model: holdout average precision {first.metrics['average_precision']:.4f} reaches the minimum 0.1000"
    )
    metadata = load_metadata(data_root, "xgb-run-1")
    assert metadata["feature_spec"] == FeatureSpec().to_json()  # the run's: feature-calc used the defaults
    holdout = read_holdout(data_root, "run-1")
    assert metadata["data_sizes"]["holdout_rows"] == len(holdout) == first.holdout_rows
    assert metadata["data_sizes"]["holdout_fraud"] == int(holdout[LABEL].sum())
    scores = load_booster(data_root, "xgb-run-1").inplace_predict(holdout[FEATURE_COLUMNS].astype("float32"))
    assert metadata["metrics"]["average_precision"] == pytest.approx(
        average_precision(holdout[LABEL].to_numpy(), scores)
    )
    # the holdout's drift bins: every feature and the score, each bin's share as the holdout has it
    drift = metadata["drift"]
    assert set(drift["features"]) == set(FEATURE_COLUMNS) and drift["rows"] == len(holdout)
    for name, values in [("order_amount", holdout["order_amount"]), ("score", scores)]:
        ref = drift["score"] if name == "score" else drift["features"][name]
        assert len(ref["edges"]) >= 5 and ref["edges"] == sorted(ref["edges"])
        counts = bin_counts(ref["edges"], values.to_numpy() if name != "score" else values)
        assert ref["expected"] == pytest.approx(counts / counts.sum(), abs=1e-6)
    assert len(json.dumps(drift)) < 40_000
    fraud_scenarios = holdout.loc[holdout[LABEL], SCENARIO].value_counts().to_dict()
    assert {k: v["count"] for k, v in metadata["metrics"]["recall_by_scenario"].items()} == fraud_scenarios
    assert sorted(p.name for p in (data_root / "models" / "xgb-run-1" / "report").iterdir()) == [
        "feature_importance.png",
        "precision_recall.png",
        "recall_by_scenario.png",
        "score_distribution.png",
    ]
    assert live_pointer(r, keys) is None

    prepared = prepare_db_step(client, data_root, "run-1", "xgb-run-1", **prepare_args(keys.prefix))
    assert prepared.loaded and prepared.previous is None and prepared.rows_in == len(orders_a)
    assert prepared.counts == {by: orders_a[by].nunique() for by in ENTITIES}
    assert (
        live_pointer(r, keys)
        == prepared.live
        == {**prepared.live, "model_id": "xgb-run-1", "fs_version": "run-1"}
    )
    assert (
        r.hget(keys.model("xgb-run-1"), "booster")
        == (data_root / "models" / "xgb-run-1" / "model.ubj").read_bytes()
    )
    assert_loaded_states(r, keys, "run-1", orders_a)
    assert version_meta(r, keys, "run-1")["feature_spec"] == FeatureSpec().to_json()

    # idempotent re-runs: same model, same version, no new keys, nothing switched
    keys_before = sorted(r.scan_iter(match=keys.prefix + "*"))
    again = train_model_step(
        client, data_root, "run-1", redis_url=REDIS_URL, key_prefix=keys.prefix, settings=SETTINGS
    )
    assert again.reused and again.promoted and again.metrics == first.metrics
    assert (again.champion_id, again.champion_average_precision) == (
        "xgb-run-1",
        first.metrics["average_precision"],
    )
    redo = prepare_db_step(client, data_root, "run-1", "xgb-run-1", **prepare_args(keys.prefix))
    assert not redo.loaded and redo.live == prepared.live and redo.removed_keys == 0
    assert sorted(r.scan_iter(match=keys.prefix + "*")) == keys_before

    # run 3: same data as run 1, a far weaker model -> worse than the champion on the same holdout
    weak = TrainModelSettings(
        num_boost_round=1, early_stopping_rounds=1, max_depth=1, min_average_precision=0.0
    )
    worse = train_model_step(
        client, data_root, "run-3", redis_url=REDIS_URL, key_prefix=keys.prefix, settings=weak
    )
    assert not worse.promoted and worse.champion_id == "xgb-run-1"
    assert worse.champion_average_precision == pytest.approx(
        first.metrics["average_precision"]
    )  # same holdout
    assert worse.reason.endswith(
        f"is worse than champion xgb-run-1's {worse.champion_average_precision:.4f} on the same holdout"
    )

    # run 2: a gate minimum it cannot reach, then a reachable one; its promotion keeps run 1's version (rollback)
    strict = TrainModelSettings(
        num_boost_round=80, early_stopping_rounds=10, max_depth=4, min_average_precision=0.999
    )
    below = train_model_step(
        client, data_root, "run-2", redis_url=REDIS_URL, key_prefix=keys.prefix, settings=strict
    )
    assert not below.promoted and "is below the minimum 0.9990" in below.reason
    second = train_model_step(
        client,
        data_root,
        "run-2",
        redis_url=REDIS_URL,
        key_prefix=keys.prefix,
        settings=TrainModelSettings(min_average_precision=0.0),
    )
    assert (
        second.reused and second.champion_id == "xgb-run-1" and second.champion_average_precision is not None
    )
    switched = prepare_db_step(client, data_root, "run-2", "xgb-run-2", **prepare_args(keys.prefix))
    assert switched.previous["fs_version"] == "run-1" and switched.removed_keys == 0
    assert live_pointer(r, keys)["fs_version"] == "run-2" and version_meta(r, keys, "run-1") is not None
    assert switched.counts == {by: orders_b[by].nunique() for by in ENTITIES}
    assert list_models(data_root) == ["xgb-run-1", "xgb-run-2", "xgb-run-3"]


def test_training_data_must_exist(client, tmp_path):
    """A run with its feature spec (feature-calc finished) but no training data (step 4 did not run)."""
    serving_state_dir(tmp_path, "run-x").mkdir(parents=True)
    write_feature_spec(serving_state_dir(tmp_path, "run-x"), DEFAULT_SPEC)
    with pytest.raises(Exception, match="train.parquet"):
        train_model_step(
            client, tmp_path, "run-x", redis_url=REDIS_URL, key_prefix="fraudtest:none:", settings=SETTINGS
        )
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []
    np.testing.assert_equal(list_models(tmp_path), [])


def test_steps_5_and_6_use_the_runs_feature_spec(client, runs, tmp_path):
    """Train-model and prepare-db take W and δ from the spec feature-calc recorded for the run (they have no
    parameters of their own): a copy of run 1 recomputed with W = 6, δ = 3 gives a model and a feature-store
    version of that spec, with states of that W and δ."""
    data_root, orders_a, _ = runs
    r = redis.Redis.from_url(REDIS_URL)
    keys = Keys(f"fraudtest:{uuid4().hex}:")
    spec = FeatureSpec(window=6, label_delay_days=3)
    try:
        (tmp_path / "runs").mkdir()
        shutil.copytree(run_dir(data_root, "run-1"), run_dir(tmp_path, "run-1"))
        run_steps_3_and_4(client, tmp_path, "run-1", spec)
        trained = train_model_step(
            client, tmp_path, "run-1", redis_url=REDIS_URL, key_prefix=keys.prefix, settings=SETTINGS
        )
        metadata = load_metadata(tmp_path, trained.model_id)
        assert (
            metadata["feature_spec"] == spec.to_json()
            and FeatureSpec.from_json(metadata["feature_spec"]) == spec
        )
        assert (metadata["window"], metadata["label_delay_days"]) == (6, 3)
        assert metadata["feature_set_fingerprint"] == spec.fingerprint != FeatureSpec().fingerprint
        prepared = prepare_db_step(client, tmp_path, "run-1", trained.model_id, **prepare_args(keys.prefix))
        assert prepared.loaded and prepared.live["model_id"] == trained.model_id
        meta = version_meta(r, keys, "run-1")
        assert meta["feature_spec"] == spec.to_json() and (meta["window"], meta["label_delay_days"]) == (6, 3)
        assert_loaded_states(r, keys, "run-1", orders_a, spec)
    finally:
        for key in r.scan_iter(match=f"{keys.prefix}*", count=1000):
            r.unlink(key)


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_steps_5_and_6_refuse_a_run_without_a_usable_feature_spec(client, runs, tmp_path, damage):
    """A run whose feature_spec.json is missing or unusable: train-model and prepare-db fail with FeatureSpecError
    naming the run (a permanent error: the run fails at once), and change nothing."""
    data_root, _, _ = runs
    r = redis.Redis.from_url(REDIS_URL)
    keys = Keys(f"fraudtest:{uuid4().hex}:")
    (tmp_path / "runs").mkdir()
    shutil.copytree(run_dir(data_root, "run-1"), run_dir(tmp_path, "run-1"))
    path = serving_state_dir(tmp_path, "run-1") / FEATURE_SPEC_FILE
    if damage == "missing":
        path.unlink()
        message = "run run-1 has no feature spec .*: its feature-calc did not finish"
    else:
        path.write_text(path.read_text()[:-7])
        message = "run run-1: its feature spec .* is unusable"
    with pytest.raises(FeatureSpecError, match=message):
        train_model_step(
            client, tmp_path, "run-1", redis_url=REDIS_URL, key_prefix=keys.prefix, settings=SETTINGS
        )
    assert list_models(tmp_path) == []
    with pytest.raises(FeatureSpecError, match=message):  # before it reads the model or Redis
        prepare_db_step(client, tmp_path, "run-1", "xgb-run-1", **prepare_args(keys.prefix))
    assert list(r.scan_iter(match=keys.prefix + "*")) == []


def test_capped_training_keeps_every_fraud_row_and_scores_stay_probabilities(client, runs, tmp_path):
    """`max_train_rows` below the run's training rows: every fraud row is kept and the legitimate ones at the
    recorded rate (the same seed keeps the same rows), and the saved model's holdout scores are, on average, the
    fraud rate, as the uncapped model's are, while the raw scores of the capped model are far above it."""
    data_root, _, _ = runs
    (tmp_path / "runs").mkdir()
    shutil.copytree(run_dir(data_root, "run-1"), run_dir(tmp_path, "run-1"))
    shutil.copytree(run_dir(data_root, "run-1"), run_dir(tmp_path, "run-9"))
    train_path = training_paths(tmp_path, "run-1")[0]
    labels = pd.read_parquet(train_path, columns=[LABEL])[LABEL]
    rows, fraud = len(labels), int(labels.sum())
    cap = rows // 2  # every fraud row and fewer than half the legitimate ones
    rate = negative_keep_rate(rows, fraud, cap)
    assert 0 < rate < 0.5

    # the rows: every fraud row, legitimate ones at the rate; the same seed, the same rows; another, others
    def kept(seed: int) -> pd.DataFrame:
        frame = read_dataset(train_path, ["order_id", LABEL])
        return client.compute(cap_training_rows(frame, rate, seed), sync=True).reset_index(drop=True)

    first, again, other = kept(42), kept(42), kept(43)
    assert int(first[LABEL].sum()) == fraud
    assert abs((~first[LABEL]).sum() - rate * (rows - fraud)) < 4 * np.sqrt(rows * rate)
    pd.testing.assert_frame_equal(first, again)
    assert set(first["order_id"]) != set(other["order_id"])

    keys = Keys(f"fraudtest:{uuid4().hex}:")
    args = {"redis_url": REDIS_URL, "key_prefix": keys.prefix}
    settings = {
        "num_boost_round": 80,
        "early_stopping_rounds": 10,
        "max_depth": 4,
        "min_average_precision": 0.0,
    }
    capped = train_model_step(
        client, tmp_path, "run-1", **args, settings=TrainModelSettings(**settings, max_train_rows=cap)
    )
    full = train_model_step(
        client, tmp_path, "run-9", **args, settings=TrainModelSettings(**settings, max_train_rows=0)
    )
    training = load_metadata(tmp_path, capped.model_id)["training"]
    non_fraud_fraction = RUN_SPLIT.non_fraud_fraction
    assert training["max_train_rows"] == cap and training["fitted_rows"] == len(first)
    assert training["sampling"] == {
        "non_fraud_fraction": non_fraud_fraction,
        "cap_keep_rate": rate,
        "negative_keep_rate": non_fraud_fraction * rate,
        "seed": 42,
        "scores": training["sampling"]["scores"],
    }
    uncapped = load_metadata(tmp_path, full.model_id)["training"]
    assert uncapped["fitted_rows"] == rows and uncapped["sampling"]["cap_keep_rate"] == 1.0
    assert uncapped["sampling"]["negative_keep_rate"] == non_fraud_fraction

    holdout = read_holdout(tmp_path, "run-1")
    x, fraud_rate = holdout[FEATURE_COLUMNS].astype("float32"), holdout[LABEL].mean()
    capped_scores = load_booster(tmp_path, capped.model_id).inplace_predict(x).astype("float64")
    full_scores = load_booster(tmp_path, full.model_id).inplace_predict(x).astype("float64")
    r = non_fraud_fraction * rate
    raw_scores = capped_scores / (capped_scores + r * (1 - capped_scores))  # prior_correction undone
    np.testing.assert_allclose(prior_correction(raw_scores, r), capped_scores, rtol=1e-6, atol=1e-9)
    assert 0.5 < capped_scores.mean() / fraud_rate < 2, (capped_scores.mean(), fraud_rate)
    assert 0.5 < full_scores.mean() / fraud_rate < 2, (full_scores.mean(), fraud_rate)
    assert 0.67 < capped_scores.mean() / full_scores.mean() < 1.5
    assert raw_scores.mean() > 2 * full_scores.mean()  # uncorrected, they would be far from probabilities
    assert capped.metrics["average_precision"] == pytest.approx(
        average_precision(holdout[LABEL].to_numpy(), capped_scores), abs=1e-6
    )
