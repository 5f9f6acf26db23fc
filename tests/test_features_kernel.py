"""The compiled batch kernels against the numpy implementation they replaced, bit for bit.

`numpy_set_1` runs serving's numpy core (`window_features`) over zero-copy lag views of the sorted rows, and
`numpy_time_window_features` is the vectorised SPEC 2.3 code (searchsorted, prefix sums, difference arrays)
that feature-calc used before the kernels: both kept here as the reference, so the kernels must give the same
bits, in float64 and in float32, for every W and δ tried (the oracle tests compare with SPEC to 1e-9 only).
"""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from test_features_reference import random_orders

from fraud_poc.core.schema import ENTITIES, NO_FRAUD, TIME_STATS, TIME_WINDOWS_DAYS, entity_feature_columns
from fraud_poc.features import definitions as F


def _lag_views(values: np.ndarray, window: int) -> np.ndarray:
    padded = np.concatenate([np.zeros(window - 1, values.dtype), values])
    return sliding_window_view(padded, len(values))[::-1]


def numpy_set_1(order, position, ts_us, amount, other_codes, window, out) -> None:
    """Feature set 1 of every row through `window_features`, in blocks of rows (the former batch path)."""
    amount_lags, ts_lags = _lag_views(amount[order], window), _lag_views(ts_us[order], window)
    code_lags = [_lag_views(codes[order], window) for codes in other_codes]
    lags = np.arange(window)[:, None]
    for start in range(0, len(order), 8192):
        rows = slice(start, start + 8192)
        codes = np.stack([lagged[:, rows] for lagged in code_lags])
        out[:, rows] = F.window_features(
            amount_lags[:, rows], ts_lags[:, rows], codes, lags <= position[rows]
        )


def _group_search(group, ts_us):
    low, high = int(ts_us.min()), int(ts_us.max()) + 1
    width = high - low + 1
    if (int(group.max()) + 1) * width < 2**62:
        keys = group * width + (ts_us - low)
        return lambda rows, since: np.searchsorted(
            keys, group[rows] * width + (np.clip(since, low, high) - low)
        )
    instants = np.unique(ts_us)
    ranks = len(instants) + 1
    rank_keys = group * ranks + np.searchsorted(instants, ts_us)
    return lambda rows, since: np.searchsorted(
        rank_keys, group[rows] * ranks + np.searchsorted(instants, since)
    )


def _range_counts(n, start, stop):
    diff = np.bincount(start, minlength=n + 1) - np.bincount(stop, minlength=n + 1)
    return np.cumsum(diff[:-1])


def numpy_time_window_features(group, ts_us, cents, fraud_ts, delay) -> np.ndarray:
    """SPEC 2.3's features, vectorised (the former `time_window_features`)."""
    n = len(ts_us)
    first_at_or_after = _group_search(group, ts_us)
    rows, hour = np.arange(n), F.hours_of(ts_us)
    prefix = np.r_[0, np.cumsum(cents, dtype=np.int64)]
    fraud = np.flatnonzero(fraud_ts != NO_FRAUD)
    result = np.empty((len(TIME_STATS), len(TIME_WINDOWS_DAYS), n))
    matured_end = first_at_or_after(rows, F.matured_hours(hour, 0, delay)[1] * F.HOUR_US)
    lagged = hour[fraud] + 24 * delay
    counts_from = first_at_or_after(fraud, np.maximum(fraud_ts[fraud], (lagged + 1) * F.HOUR_US))
    for k, days in enumerate(TIME_WINDOWS_DAYS):
        start = first_at_or_after(rows, F.recent_first_hour(hour, days) * F.HOUR_US)
        n_orders = rows - start + 1
        n_matured = matured_end - first_at_or_after(rows, F.matured_hours(hour, days, delay)[0] * F.HOUR_US)
        until = first_at_or_after(fraud, (lagged + 24 * days + 1) * F.HOUR_US)
        n_fraud = _range_counts(n, counts_from, np.maximum(until, counts_from))
        cents_sum = prefix[rows + 1] - prefix[start]
        stats = {
            "n_orders": n_orders,
            "amount_mean": cents_sum.astype(np.float64) / (100 * n_orders).astype(np.float64),
            "n_matured": n_matured,
            "n_fraud": n_fraud,
            "risk": np.divide(n_fraud, n_matured, out=np.zeros(n), where=n_matured > 0),
        }
        for s, stat in enumerate(TIME_STATS):
            result[s, k] = stats[stat]
    return result.reshape(len(TIME_STATS) * len(TIME_WINDOWS_DAYS), n)


def _busy(n: int, seed: int) -> pd.DataFrame:
    """Few values and many orders each over 70 days: long groups, full windows, plenty of matured fraud; plus
    zero amounts, equal instants and a value missing (None) in an entity column."""
    orders = random_orders(n, seed, days=70).drop_duplicates("order_id", ignore_index=True)
    rng = np.random.default_rng(seed)
    orders.loc[rng.random(len(orders)) < 0.03, "email"] = None
    return orders


def _both(orders: pd.DataFrame, by: str, window: int, delay: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(kernel, numpy) features of entity `by`, rows in `_group_rows`' order, in `dtype`."""
    ts_us = F.timestamps_us(orders["order_date"])
    fraud_ts = F.fraud_timestamps(orders, ts_us, delay)
    amount = orders["order_amount"].to_numpy(np.float64)
    cents = F.cents_of(amount)
    by_codes = F._codes(orders[by])
    order, position, _ = F._group_rows(F._time_order(ts_us, orders["order_id"]), by_codes)
    others = [F._codes(orders[col]) for col in F.other_entities(by)]
    width, n = len(entity_feature_columns(by)), len(orders)
    kernel, reference = np.empty((width + 15, n), dtype), np.empty((width + 15, n), dtype)
    F._write_entity_features(order, position, ts_us, amount, others, window, kernel[:width])
    F.time_window_features(
        by_codes[order], ts_us[order], cents[order], fraud_ts[order], delay, out=kernel[width:]
    )
    numpy_set_1(order, position, ts_us, amount, others, window, reference[:width])
    reference[width:] = numpy_time_window_features(
        by_codes[order], ts_us[order], cents[order], fraud_ts[order], delay
    )
    return kernel, reference


@pytest.fixture(scope="module")
def busy() -> pd.DataFrame:
    return _busy(4000, seed=11)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("window", "delay"), [(10, 7), (1, 1), (2, 3), (3, 7), (40, 2)])
@pytest.mark.parametrize("by", ENTITIES)
def test_kernels_equal_the_numpy_implementation_bit_for_bit(busy, by, window, delay, dtype):
    kernel, reference = _both(busy, by, window, delay, dtype)
    assert (reference[F.entity_feature_columns(by).index(f"n_orders_by_{by}")] == min(window, 40)).any()
    assert reference[-6:-3].max() > 0  # n_fraud counts
    np.testing.assert_array_equal(
        kernel.view(np.uint8), reference.view(np.uint8)
    )  # the same bits, signs of 0 too


def test_kernels_on_one_order_and_on_none():
    one = _busy(40, seed=3).iloc[:1]
    for by in ENTITIES:
        kernel, reference = _both(one, by, 10, 7, np.float64)
        np.testing.assert_array_equal(kernel, reference)
    empty = F.time_window_features(*(np.zeros(0, np.int64),) * 4, 7)
    assert empty.shape == (15, 0)


def test_serving_modules_do_not_load_numba():
    """The kernels compile at their first call: a process that only serves never loads numba (~100 MiB)."""
    code = "import sys, fraud_poc.features.definitions, fraud_poc.features.serving_state; print('numba' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        == "False\n"
    )
