"""fraud_poc.pipeline.steps.sample_data: step 1 on a real LocalCluster, real files under a data root of the session's own."""

import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
from step_runs import SAMPLE

from fraud_poc.core.schema import LABEL, SCENARIO
from fraud_poc.pipeline.steps.sample_data import write_sample_data
from fraud_poc.store.datasets import raw_dir, run_dir

MONTH_FILES = ["orders-2025-01.parquet", "orders-2025-02.parquet", "orders-2025-03.parquet"]


def read_files(folder: Path) -> dict[str, pd.DataFrame]:
    return {p.name: pd.read_parquet(p) for p in sorted(folder.iterdir())}


def test_one_file_per_month_holding_what_generate_orders_gives(sample_run):
    step1, orders = sample_run.results["sample-data"], sample_run.orders
    assert (step1.rows_in, step1.rows_out) == (0, SAMPLE["num_orders"])
    fraud = orders[orders[LABEL]]
    assert step1.details == {
        "files": MONTH_FILES,
        "fraud_rows": len(fraud),
        "scenarios": {name: int(n) for name, n in sorted(fraud[SCENARIO].value_counts().items())},
    }
    assert json.loads(json.dumps(asdict(step1))) == asdict(step1)  # the run status stores it as JSON
    files = read_files(raw_dir(sample_run.data_root, sample_run.run_id))
    assert list(files) == MONTH_FILES
    for month, frame in enumerate(files.values(), start=1):
        assert (frame["order_date"].dt.month == month).all()
    assert pd.concat(files.values(), ignore_index=True).equals(orders)


def test_retry_replaces_the_output_with_the_same(client, sample_run):
    folder = raw_dir(sample_run.data_root, sample_run.run_id)
    before = read_files(folder)
    again = write_sample_data(client, sample_run.data_root, sample_run.run_id, **SAMPLE)
    assert again == sample_run.results["sample-data"]
    after = read_files(folder)
    assert list(after) == MONTH_FILES and all(after[name].equals(before[name]) for name in MONTH_FILES)
    assert sample_run.leftovers() == []


def test_a_retry_with_other_arguments_replaces_every_file(client, sample_run, tmp_path):
    """The output is replaced as a whole: a month the new attempt does not make is gone, not left over."""
    data_root = sample_run.copy(tmp_path)
    step1 = write_sample_data(
        client, data_root, sample_run.run_id, **{**SAMPLE, "months": 2, "num_orders": 500}
    )
    assert step1.rows_out == 500 and step1.details["files"] == MONTH_FILES[:2]
    files = read_files(raw_dir(data_root, sample_run.run_id))
    assert list(files) == MONTH_FILES[:2] and sum(map(len, files.values())) == 500


def test_a_failing_attempt_leaves_the_previous_output(client, sample_run, tmp_path):
    data_root = sample_run.copy(tmp_path)
    folder = raw_dir(data_root, sample_run.run_id)
    before = read_files(folder)
    with pytest.raises(
        ValueError, match=r"num_customers must be >= 1, got 0"
    ):  # fails on a worker, mid-write
        write_sample_data(client, data_root, sample_run.run_id, **{**SAMPLE, "num_customers": 0})
    after = read_files(folder)
    assert list(after) == MONTH_FILES and all(after[name].equals(before[name]) for name in MONTH_FILES)
    assert sample_run.leftovers(data_root) == []


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_orders": 0}, r"num_orders \(0\) and months \(3\) must be >= 1"),
        ({"months": 0}, r"num_orders \(20000\) and months \(0\) must be >= 1"),
        ({"fraud_rate": 1.0}, r"fraud_rate must be in \[0, 1\), got 1.0"),
    ],
    ids=["no-orders", "no-months", "all-fraud"],
)
def test_bad_arguments_fail_at_once_naming_the_argument(client, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        write_sample_data(client, tmp_path, "r1", **{**SAMPLE, **change})
    assert not run_dir(tmp_path, "r1").exists()  # nothing written, not even the run's folder
