"""The vectorised features against a plain per-order implementation written from SPEC 2 and 2.2, in batch and serving."""

import math

import numpy as np
import pandas as pd
import pytest

from fraud_poc.features import (
    compute_features,
    latest_orders,
    serving_features,
    timestamp_us,
    to_state_records,
)
from fraud_poc.schema import ENTITIES, FEATURE_COLUMNS, NO_FRAUD, STATE_FIELDS, TIME_WINDOWS_DAYS

DAY = pd.Timedelta(hours=24)


def label_counts_from(order: dict, delay: pd.Timedelta) -> pd.Timestamp | None:
    """SPEC 2.2: when a fraud label counts (label_date, else order_date + delay); None for a legitimate order."""
    if not order.get("is_fraud"):
        return None
    given = order.get("label_date")
    return order["order_date"] + delay if given is None or pd.isna(given) else given


def reference_features(orders: pd.DataFrame, window: int, label_delay_days: int = 7) -> pd.DataFrame:
    """SPEC 2 and 2.2 literally: H = the last `window` orders of the entity value up to and including the order;
    the time windows and matured windows by date, labels counted from their label date."""
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
            t, delay = o["order_date"], pd.Timedelta(days=label_delay_days)
            same = by_value[by][o[by]]
            for days in TIME_WINDOWS_DAYS:
                span = pd.Timedelta(days=days)
                recent = [r for r in same if key(r) <= key(o) and r["order_date"] > t - span]
                matured = [r for r in same if t - delay - span < r["order_date"] <= t - delay]
                fraud = [
                    r for r in matured if (when := label_counts_from(r, delay)) is not None and when <= t
                ]
                row[f"n_orders_{days}d_by_{by}"] = len(recent)
                row[f"amount_mean_{days}d_by_{by}"] = math.fsum(r["order_amount"] for r in recent) / len(
                    recent
                )
                row[f"n_matured_{days}d_by_{by}"] = len(matured)
                row[f"n_fraud_{days}d_by_{by}"] = len(fraud)
                row[f"risk_{days}d_by_{by}"] = len(fraud) / len(matured) if matured else 0.0
        rows.append(row)
    return pd.DataFrame(rows, columns=["order_id", *FEATURE_COLUMNS])


def random_orders(n: int, seed: int, days: int = 6) -> pd.DataFrame:
    """Orders on an hourly grid over `days` days (many equal timestamps, many exactly 24 h apart), few entity values,
    ~5% repeated order_ids with other contents, some sub-second times, extra columns; 5% fraud, half of it with a
    label_date 0-200 hours after the order (some exactly on a window's edge)."""
    rng = np.random.default_rng(seed)
    hours = rng.integers(0, days * 24, n)
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
            "is_fraud": (fraud := rng.random(n) < 0.05),
            "label_date": (order_date + pd.to_timedelta(rng.integers(0, 200, n), unit="h")).where(
                fraud & (rng.random(n) < 0.5)
            ),
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


@pytest.fixture(scope="module")
def months() -> pd.DataFrame:
    """Two months of orders: every time window and matured window fills and slides."""
    return random_orders(1500, seed=7, days=60)


@pytest.mark.parametrize("window", [10, 3])
def test_compute_features_matches_reference(orders, window):
    expected = reference_features(orders, window, label_delay_days=1)
    assert len(expected) == orders["order_id"].nunique() < len(orders)
    assert expected["n_orders_by_customer_id"].max() == window  # windows are full and slide
    assert (expected["secs_since_prev_by_email"] == 0).sum() > 10  # equal timestamps occur
    assert expected["n_fraud_1d_by_ip_addr"].max() > 0  # confirmed fraud counts
    assert_same_features(compute_features(orders, window, label_delay_days=1), expected)


@pytest.mark.parametrize("label_delay_days", [7, 2])
def test_time_windows_match_reference_over_months(months, label_delay_days):
    expected = reference_features(months, 10, label_delay_days)
    assert expected["n_matured_30d_by_customer_id"].max() > 20 and expected["risk_30d_by_ip_addr"].max() > 0
    assert_same_features(compute_features(months, 10, label_delay_days), expected)


def test_point_in_time(months):
    """A label dated after an order, and every order after it, change none of that order's features."""
    distinct = months.drop_duplicates("order_id").sort_values(["order_date", "order_id"], ignore_index=True)
    cut = len(distinct) // 2
    base = compute_features(distinct).set_index("order_id").loc[distinct["order_id"].iloc[:cut]]
    t_cut = distinct["order_date"].iloc[cut - 1]
    relabelled = distinct.copy()
    later_labels = relabelled["label_date"] > t_cut
    relabelled.loc[later_labels, "label_date"] = relabelled.loc[later_labels, "label_date"] + pd.Timedelta(
        days=9
    )
    late = relabelled["order_date"] > t_cut - pd.Timedelta(days=5)  # fraud after the cut-off's last order
    relabelled.loc[late, "is_fraud"] = ~relabelled.loc[late, "is_fraud"]
    assert later_labels.any() and late.any()
    for variant in (distinct.iloc[:cut], relabelled):
        features = compute_features(variant).set_index("order_id").loc[base.index]
        pd.testing.assert_frame_equal(features, base)


def _first_wins(shuffled: pd.DataFrame, original: pd.DataFrame) -> pd.DataFrame:
    """`shuffled` reordered so that each order_id's first row is the same as in `original` (row order is free)."""
    firsts = original.drop_duplicates("order_id")
    rest = shuffled.drop(index=firsts.index)
    return pd.concat([firsts.sample(frac=1.0, random_state=2), rest])


def test_compute_features_input_order_only_decides_duplicates(orders):
    expected = compute_features(orders).set_index("order_id").sort_index()
    shuffled = compute_features(_first_wins(orders.sample(frac=1.0, random_state=3), orders))
    pd.testing.assert_frame_equal(shuffled.set_index("order_id").sort_index(), expected)


@pytest.mark.parametrize("fixture", ["orders", "months"])
def test_serving_matches_reference_for_orders_in_time_order(fixture, request):
    """Each order scored from the serving state of the orders before it (labels as known at the time)."""
    frame = request.getfixturevalue(fixture)
    distinct = frame.drop_duplicates("order_id").sort_values(["order_date", "order_id"], ignore_index=True)
    expected = reference_features(distinct, 10).set_index("order_id")
    for i in range(0, len(distinct), 37):
        state = {by: dict(to_state_records(latest_orders(distinct.iloc[:i], by), by)) for by in ENTITIES}
        order = distinct.iloc[i]
        record = tuple(
            NO_FRAUD
            if field == "fraud_ts"
            else timestamp_us(order["order_date"])
            if field == "ts_us"
            else order[field]
            for field in STATE_FIELDS
        )
        histories = {by: state[by].get(order[by], []) for by in ENTITIES}
        np.testing.assert_allclose(
            serving_features(histories, record),
            expected.loc[order["order_id"]].to_numpy(np.float64),
            rtol=0,
            atol=1e-9,
        )
