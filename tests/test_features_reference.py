"""The vectorised features against a plain per-order implementation written from SPEC 2, on pandas, Dask and serving."""

import math

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster

from fraud_poc.features import (
    compute_features,
    features_dask,
    latest_orders,
    serving_features,
    timestamp_us,
    to_state_records,
)
from fraud_poc.schema import ENTITIES, FEATURE_COLUMNS, STATE_FIELDS

DAY = pd.Timedelta(hours=24)


def reference_features(orders: pd.DataFrame, window: int) -> pd.DataFrame:
    """SPEC 2 literally: for each order, H = the last `window` orders of its entity value up to and including it."""
    first_seen: dict[str, dict] = {}
    for order in orders.to_dict("records"):
        first_seen.setdefault(order["order_id"], order)  # duplicates: the first occurrence wins
    records = list(first_seen.values())
    by_value = {by: {} for by in ENTITIES}
    for order in records:
        for by in ENTITIES:
            by_value[by].setdefault(order[by], []).append(order)

    def key(order: dict) -> tuple:
        return (order["order_date"], order["order_id"])

    rows = []
    for o in records:
        row = {"order_id": o["order_id"], "order_amount": o["order_amount"]}
        for by in ENTITIES:
            history = sorted((r for r in by_value[by][o[by]] if key(r) <= key(o)), key=key)[-window:]
            assert history[-1] is o
            prev = history[-2] if len(history) > 1 else None
            without_o = history[:-1]
            others = [col for col in ENTITIES if col != by]
            row[f"n_orders_by_{by}"] = len(history)
            for col in others:
                row[f"num_{col}_by_{by}"] = len({r[col] for r in history})
            for col in others:
                row[f"same_{col}_by_{by}"] = int(prev is not None and prev[col] == o[col])
            for col in others:
                row[f"known_{col}_by_{by}"] = int(any(r[col] == o[col] for r in without_o))
            amounts = [r["order_amount"] for r in history]
            mean = sum(amounts) / len(amounts)
            row[f"order_amount_mean_by_{by}"] = mean
            row[f"order_amount_std_by_{by}"] = math.sqrt(sum((a - mean) ** 2 for a in amounts) / len(amounts))
            row[f"order_amount_min_by_{by}"] = min(amounts)
            row[f"order_amount_max_by_{by}"] = max(amounts)
            row[f"order_amount_sum_by_{by}"] = sum(amounts)
            if without_o:
                mean_without_o = sum(r["order_amount"] for r in without_o) / len(without_o)
                row[f"amount_ratio_by_{by}"] = (o["order_amount"] + 1) / (mean_without_o + 1)
            else:
                row[f"amount_ratio_by_{by}"] = 1.0
            row[f"secs_since_prev_by_{by}"] = (
                (o["order_date"] - prev["order_date"]).total_seconds() if prev else -1.0
            )
            row[f"n_orders_24h_by_{by}"] = sum(r["order_date"] > o["order_date"] - DAY for r in history)
        rows.append(row)
    return pd.DataFrame(rows, columns=["order_id", *FEATURE_COLUMNS])


def random_orders(n: int, seed: int) -> pd.DataFrame:
    """Orders on an hourly grid over 6 days (many equal timestamps, many exactly 24 h apart), few entity values,
    ~5% repeated order_ids with other contents, some sub-second times, extra columns."""
    rng = np.random.default_rng(seed)
    hours = rng.integers(0, 6 * 24, n)
    micros = np.where(rng.random(n) < 0.1, rng.integers(0, 1_000_000, n), 0)
    order_date = pd.Timestamp("2024-05-01", tz="UTC") + pd.to_timedelta(
        hours * 3600 * 10**6 + micros, unit="us"
    )
    return pd.DataFrame(
        {
            "order_id": [f"o{i:05d}" for i in rng.integers(0, int(n * 0.95), n)],
            "order_date": order_date.as_unit("us"),
            "customer_id": [f"c{i}" for i in rng.integers(0, 25, n)],
            "email": [f"e{i}@x.com" for i in rng.integers(0, 30, n)],
            "ip_addr": [f"10.0.{i // 8}.{i % 8}" for i in rng.integers(0, 40, n)],
            "location_lat": rng.normal(size=n),
            "location_long": rng.normal(size=n),
            "order_amount": np.round(rng.lognormal(3.0, 1.2, n), 2) * (rng.random(n) > 0.02),  # some zeros
            "is_fraud": rng.random(n) < 0.02,
        }
    )


def assert_same_features(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert actual.columns.tolist() == ["order_id", *FEATURE_COLUMNS]
    assert actual["order_id"].tolist() == expected["order_id"].tolist()
    np.testing.assert_allclose(
        actual[FEATURE_COLUMNS].to_numpy(np.float64),
        expected[FEATURE_COLUMNS].to_numpy(np.float64),
        rtol=0,
        atol=1e-9,
    )


@pytest.fixture(scope="module")
def orders() -> pd.DataFrame:
    return random_orders(3000, seed=2024)


@pytest.mark.parametrize("window", [10, 3])
def test_compute_features_matches_reference(orders, window):
    expected = reference_features(orders, window)
    assert len(expected) == orders["order_id"].nunique() < len(orders)
    assert expected["n_orders_by_customer_id"].max() == window  # windows are full and slide
    assert (expected["secs_since_prev_by_email"] == 0).sum() > 10  # equal timestamps occur
    assert_same_features(compute_features(orders, window), expected)


def _first_wins(shuffled: pd.DataFrame, original: pd.DataFrame) -> pd.DataFrame:
    """`shuffled` reordered so that each order_id's first row is the same as in `original` (row order is free)."""
    firsts = original.drop_duplicates("order_id")
    rest = shuffled.drop(index=firsts.index)
    return pd.concat([firsts.sample(frac=1.0, random_state=2), rest])


def test_compute_features_input_order_only_decides_duplicates(orders):
    expected = compute_features(orders).set_index("order_id").sort_index()
    shuffled = compute_features(_first_wins(orders.sample(frac=1.0, random_state=3), orders))
    pd.testing.assert_frame_equal(shuffled.set_index("order_id").sort_index(), expected)


def test_serving_matches_reference_for_orders_in_time_order(orders):
    distinct = orders.drop_duplicates("order_id").sort_values(["order_date", "order_id"], ignore_index=True)
    expected = reference_features(distinct, 10).set_index("order_id")
    for i in range(0, len(distinct), 97):
        state = {by: dict(to_state_records(latest_orders(distinct.iloc[:i], by), by)) for by in ENTITIES}
        order = distinct.iloc[i]
        record = tuple(
            order[field] if field != "ts_us" else timestamp_us(order["order_date"]) for field in STATE_FIELDS
        )
        histories = {by: state[by].get(order[by], []) for by in ENTITIES}
        np.testing.assert_allclose(
            serving_features(histories, record),
            expected.loc[order["order_id"]].to_numpy(np.float64),
            rtol=0,
            atol=1e-9,
        )


def test_dask_on_local_cluster_matches_compute_features(orders):
    expected = (
        compute_features(orders).sort_values("order_id", ignore_index=True).astype({"order_id": object})
    )
    ddf = dd.from_pandas(orders, npartitions=4, sort=False)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        result = client.compute(features_dask(ddf, npartitions=3)).result()
    result = result.sort_values("order_id", ignore_index=True).astype({"order_id": object})
    pd.testing.assert_frame_equal(result, expected, check_exact=True)
