"""The vectorised features against a plain per-order implementation, in batch and serving (feature set 3).

The plain implementation is `test_features_tiles_oracle.reference_features_v3` (SPEC 2 and 2.3 line by line);
this file runs it on an hourly grid (many equal timestamps, many exactly 24 h apart) and scores every order
through the serving path from the state of the orders before it.
"""

import numpy as np
import pandas as pd
import pytest
from test_features_tiles_oracle import TIME_COLUMNS, assert_same_features_v3, reference_features_v3

from fraud_poc.core.schema import ENTITIES, FEATURE_COLUMNS, FEATURE_SET_1, STATE_FIELDS, WINDOW
from fraud_poc.features.definitions import (
    compute_features,
    entity_view,
    serving_features,
    serving_states,
    state_of,
    timestamp_us,
)


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


@pytest.fixture(scope="module")
def orders() -> pd.DataFrame:
    return random_orders(3000, seed=2024)


@pytest.fixture(scope="module")
def months() -> pd.DataFrame:
    """Two months of orders: every time window and matured window fills and slides."""
    return random_orders(1500, seed=7, days=60)


@pytest.mark.parametrize("window", [10, 3])
def test_compute_features_matches_reference(orders, window):
    expected = reference_features_v3(orders, window, label_delay_days=1)
    assert len(expected) == orders["order_id"].nunique() < len(orders)
    assert expected["n_orders_by_customer_id"].max() == window  # windows are full and slide
    assert (expected["secs_since_prev_by_email"] == 0).sum() > 10  # equal timestamps occur
    assert expected["n_fraud_1d_by_ip_addr"].max() > 0  # confirmed fraud counts
    assert_same_features_v3(compute_features(orders, window, label_delay_days=1), expected)


def _first_wins(shuffled: pd.DataFrame, original: pd.DataFrame) -> pd.DataFrame:
    """`shuffled` reordered so that each order_id's first row is the same as in `original` (row order is free)."""
    firsts = original.drop_duplicates("order_id")
    rest = shuffled.drop(index=firsts.index)
    return pd.concat([firsts.sample(frac=1.0, random_state=2), rest])


def test_compute_features_input_order_only_decides_duplicates(orders):
    expected = compute_features(orders).set_index("order_id").sort_index()
    shuffled = compute_features(_first_wins(orders.sample(frac=1.0, random_state=3), orders))
    pd.testing.assert_frame_equal(shuffled.set_index("order_id").sort_index(), expected)


@pytest.mark.parametrize(("fixture", "label_delay_days"), [("orders", 1), ("months", 7), ("months", 2)])
def test_serving_matches_reference_for_orders_in_time_order(fixture, label_delay_days, request):
    """Each order scored from the serving state (last W records + hourly tiles) of the orders before it, with the
    labels known at its instant: set-1 columns to 1e-9, the time columns exactly."""
    frame = request.getfixturevalue(fixture)
    distinct = frame.drop_duplicates("order_id").sort_values(["order_date", "order_id"], ignore_index=True)
    expected = reference_features_v3(distinct, WINDOW, label_delay_days).set_index("order_id")
    served, ids = [], []
    for i in range(0, len(distinct), 37):  # i = 0: a cold start
        order = distinct.iloc[i]
        ts_us = timestamp_us(order["order_date"])
        history = distinct.iloc[:i]
        record = tuple(ts_us if field == "ts_us" else order[field] for field in STATE_FIELDS)
        views = {}
        for by in ENTITIES:
            states = serving_states(history, by, WINDOW, label_delay_days, as_of_us=ts_us)
            records, tiles = state_of(states, by, order[by])
            views[by] = entity_view(records, tiles, record, label_delay_days)
        served.append(serving_features(views, record, WINDOW, label_delay_days))
        ids.append(order["order_id"])
    got = pd.DataFrame(np.array(served), columns=FEATURE_COLUMNS, index=ids)
    want = expected.loc[ids, FEATURE_COLUMNS]
    np.testing.assert_allclose(
        got[FEATURE_SET_1].to_numpy(), want[FEATURE_SET_1].to_numpy(np.float64), rtol=0, atol=1e-9
    )
    np.testing.assert_array_equal(got[TIME_COLUMNS].to_numpy(), want[TIME_COLUMNS].to_numpy(np.float64))
    assert (want["n_orders_by_ip_addr"] > 1).mean() > 0.5  # most orders are scored from a known state
    assert (want["n_orders_1d_by_customer_id"] > 1).any()  # the tiles count earlier orders
    if fixture == "months":  # confirmed fraud reaches the served features through the tiles
        assert (want[[f"n_fraud_30d_by_{by}" for by in ENTITIES]].to_numpy() > 0).any()
