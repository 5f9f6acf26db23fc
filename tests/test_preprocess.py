"""fraud_poc.pipeline.steps.preprocess: step 2 on a real LocalCluster, over step 1's files and over a user's own files (as
`run-from-raw` gives them), under a data root of the session's own."""

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from step_runs import ROWS_PER_PARTITION, SAMPLE

from fraud_poc.core.schema import ENTITIES, LABEL, LABEL_DATE, RAW_COLUMNS, SCENARIO
from fraud_poc.features.validation import InvalidOrdersError
from fraud_poc.pipeline.steps.preprocess import preprocess_orders, read_by_entity
from fraud_poc.store.datasets import entity_dir, raw_dir

UPLOADS = Path("uploads/batch1")


def read_entity(data_root: Path, run_id: str, entity: str) -> pd.DataFrame:
    return pd.read_parquet(entity_dir(data_root, run_id, entity))


@pytest.fixture(scope="module")
def user_run(client, sample_run) -> tuple[Path, pd.DataFrame, object]:
    """Step 2 of run "user" over a CSV and a parquet file without fraud_scenario, 15 order ids repeated (the 10 last
    of the CSV again in the parquet file, and 5 repeated within it), the repeats with another amount."""
    data_root = sample_run.data_root
    orders = sample_run.orders.drop(columns=[SCENARIO, LABEL_DATE])
    folder = data_root / UPLOADS
    folder.mkdir(parents=True)
    orders.iloc[:12_000].to_csv(folder / "a.csv", index=False)
    repeated = pd.concat([orders.iloc[11_990:12_000], orders.iloc[12_000:12_005]]).assign(order_amount=999.0)
    pd.concat([orders.iloc[12_000:], repeated]).to_parquet(folder / "b.parquet", index=False)
    return data_root, orders, preprocess_orders(client, data_root, "user", UPLOADS)


def test_one_dataset_per_entity_partitioned_by_it(client, preprocessed_run):
    run = preprocessed_run
    step2 = run.results["preprocess"]
    n = SAMPLE["num_orders"]
    assert (step2.rows_in, step2.rows_out) == (n, n)
    assert step2.details == {
        "files": [f"runs/{run.run_id}/raw/{name}" for name in run.results["sample-data"].details["files"]],
        "duplicates_dropped": 0,
        "partitions": n // ROWS_PER_PARTITION,
    }
    assert json.loads(json.dumps(asdict(step2))) == asdict(step2)  # the run status stores it as JSON
    position = pd.Series(np.arange(n), index=run.orders["order_id"])
    for entity in ENTITIES:
        by_entity = read_by_entity(run.data_root, run.run_id, entity)
        assert by_entity.npartitions == n // ROWS_PER_PARTITION
        parts = client.gather(client.compute(by_entity.to_delayed()))
        values = [set(part[entity]) for part in parts]
        assert sum(map(len, values)) == len(set().union(*values))  # no value in two partitions
        for part in parts:  # rows keep their input order within a partition
            assert position[part["order_id"]].is_monotonic_increasing
        whole = pd.concat(parts, ignore_index=True)
        every_column = {**RAW_COLUMNS, LABEL: "bool", LABEL_DATE: "datetime64[us, UTC]", SCENARIO: "string"}
        kept = (
            every_column
            if entity == ENTITIES[0]
            else {
                c: t for c, t in every_column.items() if c not in ("location_lat", "location_long", SCENARIO)
            }
        )  # the email and IP datasets: what feature-calc reads
        assert {c: str(t) for c, t in whole.dtypes.items()} == kept
        whole = whole.sort_values("order_id", ignore_index=True)
        assert whole.equals(run.orders[whole.columns].sort_values("order_id", ignore_index=True))


def test_retry_replaces_the_output_with_the_same_and_leaves_step_1s_alone(client, preprocessed_run):
    run = preprocessed_run
    before = {entity: read_entity(run.data_root, run.run_id, entity) for entity in ENTITIES}
    raw = raw_dir(run.data_root, run.run_id)
    raw_files = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    again = preprocess_orders(client, run.data_root, run.run_id, None, rows_per_partition=ROWS_PER_PARTITION)
    assert again == run.results["preprocess"]
    for entity in ENTITIES:
        assert read_entity(run.data_root, run.run_id, entity).equals(before[entity])
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == raw_files
    assert run.leftovers() == []


def test_user_files_repeated_order_ids_dropped_first_wins(client, user_run):
    data_root, orders, step2 = user_run
    assert (step2.rows_in, step2.rows_out) == (len(orders) + 15, len(orders))
    assert step2.details == {
        "files": [str(UPLOADS / "a.csv"), str(UPLOADS / "b.parquet")],
        "duplicates_dropped": 15,
        "partitions": -(-len(orders) // 500_000),  # the default rows_per_partition
    }
    expected = orders.sort_values("order_id", ignore_index=True)
    for entity in ENTITIES:
        written = read_entity(data_root, "user", entity).sort_values("order_id", ignore_index=True)
        columns = [c for c in RAW_COLUMNS if c in written]  # each dataset's columns: the test above
        assert written[columns].equals(expected[columns])  # not one amount of 999.0
        if entity == ENTITIES[0]:
            assert (written[SCENARIO] == np.where(expected[LABEL], "unspecified", "")).all()


def test_bad_input_fails_naming_file_column_and_problem_and_keeps_the_output(client, user_run):
    data_root, orders, _ = user_run
    before = read_entity(data_root, "user", "email")
    good = orders.iloc[:100]
    cases = {
        "negative.csv": (
            good.assign(order_amount=-1.0),
            "column 'order_amount': 100 negative value(s), first -1.0 at line 2",
        ),
        "no_email.parquet": (
            good.drop(columns=["email"]),
            "column 'email': missing (the input has: "
            + ", ".join(c for c in orders.columns if c != "email")
            + ")",
        ),
        "no_label.csv": (
            good.drop(columns=[LABEL]),
            "column 'is_fraud': missing: the fraud label is required for training",
        ),
    }
    for name, (frame, problem) in cases.items():
        folder = data_root / "uploads" / f"bad-{name.split('.')[0]}"
        folder.mkdir()
        (folder / "a.csv").write_bytes((data_root / UPLOADS / "a.csv").read_bytes())
        path = folder / name
        frame.to_csv(path, index=False) if name.endswith(".csv") else frame.to_parquet(path, index=False)
        shown = folder.relative_to(data_root) / name
        with pytest.raises(InvalidOrdersError) as error:
            preprocess_orders(client, data_root, "user", folder.relative_to(data_root))
        assert str(error.value) == f"{shown}: {problem}"
    assert read_entity(data_root, "user", "email").equals(before)  # the previous output, untouched


def test_missing_raw_orders_name_the_step_to_run_first(client, tmp_path):
    with pytest.raises(FileNotFoundError, match="no raw orders for run 'r9': run step sample-data first"):
        preprocess_orders(client, tmp_path, "r9", None)


def test_a_path_outside_the_data_root_is_refused(client, preprocessed_run):
    with pytest.raises(InvalidOrdersError, match="^path '../elsewhere': outside the data root$"):
        preprocess_orders(client, preprocessed_run.data_root, "user", Path("../elsewhere"))
