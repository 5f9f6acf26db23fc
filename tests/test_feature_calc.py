"""fraud_poc.pipeline.steps.feature_calc: step 3 on a real LocalCluster over step 2's datasets, under a data root of the
session's own; its output against the batch definition computed in pandas (`features.compute_features`)."""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import msgpack
import pandas as pd
import pytest
from step_runs import FEATURE_SPEC, SAMPLE

from fraud_poc.core.schema import ENTITIES, FEATURE_COLUMNS, LABEL, SCENARIO, FeatureSpec
from fraud_poc.features import definitions as features
from fraud_poc.features.serving_state import ENCODED_COLUMNS, decode_state, encoded_states
from fraud_poc.pipeline.steps.feature_calc import FEATURE_DTYPE, FEATURES_OUTPUT_COLUMNS, calc_features
from fraud_poc.store.datasets import (
    FEATURE_SPEC_FILE,
    FeatureSpecError,
    entity_dir,
    feature_spec,
    features_dir,
    serving_state_dir,
)


def read_outputs(data_root: Path, run_id: str) -> dict[str, pd.DataFrame]:
    """Step 3's output: the features and each entity's serving state."""
    return {
        "features": pd.read_parquet(features_dir(data_root, run_id)),
        **{by: pd.read_parquet(serving_state_dir(data_root, run_id) / by) for by in ENTITIES},
    }


def assert_same_outputs(after: dict[str, pd.DataFrame], before: dict[str, pd.DataFrame]) -> None:
    assert list(after) == list(before) and all(after[name].equals(before[name]) for name in before)


def test_features_equal_the_batch_definition(features_run):
    run = features_run
    step3 = run.results["feature-calc"]
    assert (step3.rows_in, step3.rows_out) == (SAMPLE["num_orders"], SAMPLE["num_orders"])
    assert step3.details == {
        "feature_spec": FEATURE_SPEC.to_json(),
        "partitions": run.results["preprocess"].details["partitions"],
        "data_cutoff": run.orders["order_date"]
        .max()
        .isoformat(),  # the newest order: what carry-over starts after
    }
    assert json.loads(json.dumps(asdict(step3))) == asdict(step3)  # the run status stores it as JSON
    assert feature_spec(run.data_root, run.run_id) == FEATURE_SPEC  # recorded for the later steps
    recorded = json.loads((serving_state_dir(run.data_root, run.run_id) / FEATURE_SPEC_FILE).read_text())
    assert recorded == FEATURE_SPEC.to_json() and FeatureSpec.from_json(recorded) == FEATURE_SPEC
    computed = pd.read_parquet(features_dir(run.data_root, run.run_id))
    assert list(computed.columns) == FEATURES_OUTPUT_COLUMNS
    computed = computed.sort_values("order_id", ignore_index=True)
    expected = features.compute_features(
        run.orders, FEATURE_SPEC.window, FEATURE_SPEC.label_delay_days
    ).sort_values("order_id", ignore_index=True)
    assert (computed[FEATURE_COLUMNS].dtypes == FEATURE_DTYPE).all()  # stored as the model sees them
    assert computed[["order_id", *FEATURE_COLUMNS]].equals(
        expected.astype(dict.fromkeys(FEATURE_COLUMNS, FEATURE_DTYPE))
    )
    labels = run.orders.sort_values("order_id", ignore_index=True)[["order_date", LABEL, SCENARIO]]
    assert computed[["order_date", LABEL, SCENARIO]].equals(labels)


def decoded_states(encoded: pd.DataFrame) -> dict[str, tuple[list, list, list]]:
    """value -> (records in stored order, tiles in stored order, order entries sorted): what the bytes hold."""
    decoded = {}
    for value, state, tiles, hours, ids, orders in encoded[ENCODED_COLUMNS].itertuples(
        index=False, name=None
    ):
        tiles = [tuple(msgpack.unpackb(tile)) for tile in tiles]
        assert [tile[0] for tile in tiles] == list(hours)  # each tile scored by its hour
        entries = sorted((i, *msgpack.unpackb(e, raw=False)) for i, e in zip(ids, orders, strict=True))
        decoded[value] = (decode_state(state), tiles, entries)
    return decoded


def test_serving_state_is_every_values_records_and_tiles(features_run):
    """Each value's stored state is `serving_states` of the whole run's orders, labels known by its newest order."""
    run = features_run
    as_of_us = features.timestamp_us(run.orders["order_date"].max())
    for by in ENTITIES:
        stored = pd.read_parquet(serving_state_dir(run.data_root, run.run_id) / by)
        assert stored.columns.tolist() == ENCODED_COLUMNS and stored["value"].is_unique
        states = features.serving_states(
            run.orders, by, FEATURE_SPEC.window, FEATURE_SPEC.label_delay_days, as_of_us=as_of_us
        )
        expected = decoded_states(encoded_states(states, by))
        assert decoded_states(stored) == expected
        assert max(len(records) for records, _, _ in expected.values()) == FEATURE_SPEC.window
        assert any(tile[3] > 0 for _, tiles, _ in expected.values() for tile in tiles)  # labels in the tiles


def test_retry_replaces_the_output_with_the_same_and_leaves_step_2s_alone(client, features_run):
    run = features_run
    before = read_outputs(run.data_root, run.run_id)
    email = pd.read_parquet(entity_dir(run.data_root, run.run_id, "email"))
    assert calc_features(client, run.data_root, run.run_id, spec=FEATURE_SPEC) == run.results["feature-calc"]
    assert_same_outputs(read_outputs(run.data_root, run.run_id), before)
    assert feature_spec(run.data_root, run.run_id) == FEATURE_SPEC
    assert pd.read_parquet(entity_dir(run.data_root, run.run_id, "email")).equals(email)
    assert run.leftovers() == []


def test_a_failing_attempt_leaves_the_previous_output_and_spec(client, features_run, tmp_path):
    run = features_run
    data_root = run.copy(tmp_path)
    before = read_outputs(data_root, run.run_id)
    victim = sorted(entity_dir(data_root, run.run_id, "email").glob("*.parquet"))[-1]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated file: that partition cannot be read
    with pytest.raises(Exception, match="(?i)parquet|arrow|invalid|magic"):
        calc_features(client, data_root, run.run_id, spec=FeatureSpec(window=10, label_delay_days=7))
    assert_same_outputs(read_outputs(data_root, run.run_id), before)
    assert feature_spec(data_root, run.run_id) == FEATURE_SPEC  # not the failed attempt's
    assert run.leftovers(data_root) == []


@pytest.mark.parametrize("missing", ENTITIES)
def test_missing_step_2_output_names_it_and_the_step_to_run_first(client, features_run, tmp_path, missing):
    run = features_run
    data_root = run.copy(tmp_path)
    shutil.rmtree(entity_dir(data_root, run.run_id, missing))
    with pytest.raises(
        FileNotFoundError, match=f"no orders by {missing} for run 'r1': run step preprocess first"
    ):
        calc_features(client, data_root, run.run_id, spec=FEATURE_SPEC)
    assert features_dir(data_root, run.run_id).is_dir()  # the previous features, untouched


def test_a_run_without_a_usable_spec_is_a_feature_spec_error_naming_it(features_run, tmp_path):
    """`datasets.feature_spec`: what every later step reads; missing or unusable is FeatureSpecError (permanent)."""
    run = features_run
    data_root = run.copy(tmp_path)
    path = serving_state_dir(data_root, run.run_id) / FEATURE_SPEC_FILE
    path.unlink()
    with pytest.raises(
        FeatureSpecError, match=f"run {run.run_id} has no feature spec .*feature-calc did not finish"
    ):
        feature_spec(data_root, run.run_id)
    for corrupt in ("{not json", json.dumps({**FEATURE_SPEC.to_json(), "window": 0}), json.dumps([8, 5])):
        path.write_text(corrupt)
        with pytest.raises(FeatureSpecError, match=f"run {run.run_id}: its feature spec .* is unusable"):
            feature_spec(data_root, run.run_id)
    path.write_text(json.dumps({**FEATURE_SPEC.to_json(), "fingerprint": "0" * 12}))
    with pytest.raises(FeatureSpecError, match="fingerprint .* does not match"):
        feature_spec(data_root, run.run_id)
