"""fraud_poc.steps.feature_calc: step 3 on a real LocalCluster over step 2's datasets, under a data root of the
session's own; its output against the batch definition computed in pandas (`features.compute_features`)."""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import msgpack
import pandas as pd
import pytest
from step_runs import FEATURE_PARAMS, SAMPLE

from fraud_poc import features
from fraud_poc.datasets import entity_dir, feature_params, features_dir, serving_state_dir
from fraud_poc.schema import ENTITIES, FEATURE_COLUMNS, LABEL, SCENARIO, WINDOW
from fraud_poc.serving_state import ENCODED_COLUMNS, decode_state, encoded_states
from fraud_poc.steps.feature_calc import FEATURES_OUTPUT_COLUMNS, calc_features


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
    assert step3.details == {**FEATURE_PARAMS, "partitions": run.results["preprocess"].details["partitions"]}
    assert json.loads(json.dumps(asdict(step3))) == asdict(step3)  # the run status stores it as JSON
    assert feature_params(run.data_root, run.run_id) == FEATURE_PARAMS  # recorded for the later steps
    computed = pd.read_parquet(features_dir(run.data_root, run.run_id))
    assert list(computed.columns) == FEATURES_OUTPUT_COLUMNS
    computed = computed.sort_values("order_id", ignore_index=True)
    expected = features.compute_features(run.orders, **FEATURE_PARAMS).sort_values(
        "order_id", ignore_index=True
    )
    assert computed[["order_id", *FEATURE_COLUMNS]].equals(expected)
    labels = run.orders.sort_values("order_id", ignore_index=True)[["order_date", LABEL, SCENARIO]]
    assert computed[["order_date", LABEL, SCENARIO]].equals(labels)


def decoded_states(encoded: pd.DataFrame) -> dict[str, tuple[list, list, list]]:
    """value -> (records in stored order, tiles in stored order, order entries sorted): what the bytes hold."""
    return {
        value: (
            decode_state(state),
            [tuple(tile) for tile in msgpack.unpackb(tiles)],
            sorted(tuple(entry) for entry in msgpack.unpackb(orders, raw=False)),
        )
        for value, state, tiles, orders in encoded[ENCODED_COLUMNS].itertuples(index=False, name=None)
    }


def test_serving_state_is_every_values_records_and_tiles(features_run):
    """Each value's stored state is `serving_states` of the whole run's orders, labels known by its newest order."""
    run = features_run
    as_of_us = features.timestamp_us(run.orders["order_date"].max())
    for by in ENTITIES:
        stored = pd.read_parquet(serving_state_dir(run.data_root, run.run_id) / by)
        assert stored.columns.tolist() == ENCODED_COLUMNS and stored["value"].is_unique
        states = features.serving_states(run.orders, by, **FEATURE_PARAMS, as_of_us=as_of_us)
        expected = decoded_states(encoded_states(states, by))
        assert decoded_states(stored) == expected
        assert max(len(records) for records, _, _ in expected.values()) == FEATURE_PARAMS["window"]
        assert any(tile[3] > 0 for _, tiles, _ in expected.values() for tile in tiles)  # labels in the tiles


def test_retry_replaces_the_output_with_the_same_and_leaves_step_2s_alone(client, features_run):
    run = features_run
    before = read_outputs(run.data_root, run.run_id)
    email = pd.read_parquet(entity_dir(run.data_root, run.run_id, "email"))
    assert calc_features(client, run.data_root, run.run_id, **FEATURE_PARAMS) == run.results["feature-calc"]
    assert_same_outputs(read_outputs(run.data_root, run.run_id), before)
    assert feature_params(run.data_root, run.run_id) == FEATURE_PARAMS
    assert pd.read_parquet(entity_dir(run.data_root, run.run_id, "email")).equals(email)
    assert run.leftovers() == []


def test_a_failing_attempt_leaves_the_previous_output_and_params(client, features_run, tmp_path):
    run = features_run
    data_root = run.copy(tmp_path)
    before = read_outputs(data_root, run.run_id)
    victim = sorted(entity_dir(data_root, run.run_id, "email").glob("*.parquet"))[-1]
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated file: that partition cannot be read
    with pytest.raises(Exception, match="(?i)parquet|arrow|invalid|magic"):
        calc_features(client, data_root, run.run_id, window=WINDOW, label_delay_days=7)
    assert_same_outputs(read_outputs(data_root, run.run_id), before)
    assert feature_params(data_root, run.run_id) == FEATURE_PARAMS  # not the failed attempt's
    assert run.leftovers(data_root) == []


@pytest.mark.parametrize("missing", ENTITIES)
def test_missing_step_2_output_names_it_and_the_step_to_run_first(client, features_run, tmp_path, missing):
    run = features_run
    data_root = run.copy(tmp_path)
    shutil.rmtree(entity_dir(data_root, run.run_id, missing))
    with pytest.raises(
        FileNotFoundError, match=f"no orders by {missing} for run 'r1': run step preprocess first"
    ):
        calc_features(client, data_root, run.run_id, **FEATURE_PARAMS)
    assert features_dir(data_root, run.run_id).is_dir()  # the previous features, untouched
