"""Feature set 3 (SPEC 2.3, hourly tiles) written line by line from the spec, against the vectorised `compute_features`.

The oracle is a plain per-order loop: set 1 (SPEC 2) as in `test_features_reference`, and set 3's time features with
each window's far edge on a whole UTC hour, amounts in integer cents (half to even) and the mean as one division.
"""

import math

import numpy as np
import pandas as pd
import pytest

from fraud_poc.core.schema import (
    ENTITIES,
    FEATURE_COLUMNS,
    FEATURE_SET_1,
    TIME_WINDOWS_DAYS,
    time_feature_columns,
)
from fraud_poc.features.definitions import compute_features

EPOCH = pd.Timestamp(0, tz="UTC")
HOUR = pd.Timedelta(hours=1)
DAY = pd.Timedelta(hours=24)
US = pd.Timedelta(microseconds=1)
TIME_COLUMNS = [col for by in ENTITIES for col in time_feature_columns(by)]
START = pd.Timestamp("2024-01-01", tz="UTC")


def hour_of(when: pd.Timestamp) -> int:
    """h(p) = floor(order_date(p) / 1 hour), UTC, as an integer hour since the epoch."""
    return (when - EPOCH) // HOUR


def cents(amount: float) -> int:
    """c(p): order_amount × 100 in float64, rounded half to even (Python's round on the float product)."""
    return round(float(amount) * 100.0)


def label_counts_from(order: dict, delay: pd.Timedelta) -> pd.Timestamp | None:
    """SPEC 2.2: when a fraud label counts (label_date, else order_date + δ); None for a legitimate order."""
    if not order.get("is_fraud"):
        return None
    given = order.get("label_date")
    return order["order_date"] + delay if given is None or pd.isna(given) else given


def _key(order: dict) -> tuple:
    return (order["order_date"], order["order_id"])


def _set_1(o: dict, by: str, history: list[dict]) -> dict:
    """SPEC 2's features of `o` over `history` (the last W orders of its `by` value, `o` last)."""
    row = {}
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
    row[f"secs_since_prev_by_{by}"] = (o["order_date"] - prev["order_date"]).total_seconds() if prev else -1.0
    row[f"n_orders_24h_by_{by}"] = sum(r["order_date"] > o["order_date"] - DAY for r in history)
    return row


def reference_features_v3(orders: pd.DataFrame, window: int, label_delay_days: int) -> pd.DataFrame:
    """SPEC 2 and 2.3 literally, one order at a time: one row per distinct order_id (first wins), in input order."""
    first_seen: dict[str, dict] = {}
    for order in orders.to_dict("records"):
        first_seen.setdefault(order["order_id"], order)  # duplicates: the first occurrence wins
    records = list(first_seen.values())
    by_value = {by: {} for by in ENTITIES}
    for order in records:
        for by in ENTITIES:
            by_value[by].setdefault(order[by], []).append(order)
    hour = {order["order_id"]: hour_of(order["order_date"]) for order in records}
    delay = pd.Timedelta(days=label_delay_days)
    L = 24 * label_delay_days

    rows = []
    for o in records:
        t, h = o["order_date"], hour[o["order_id"]]
        row = {"order_id": o["order_id"], "order_amount": o["order_amount"]}
        for by in ENTITIES:
            same = by_value[by][o[by]]
            history = sorted((p for p in same if _key(p) <= _key(o)), key=_key)[-window:]
            assert history[-1] is o
            row.update(_set_1(o, by, history))
            for d in TIME_WINDOWS_DAYS:
                D = 24 * d
                recent = [
                    p
                    for p in same
                    if h - D <= hour[p["order_id"]] < h or (hour[p["order_id"]] == h and _key(p) <= _key(o))
                ]
                matured = [p for p in same if h - L - D <= hour[p["order_id"]] < h - L]
                fraud = [
                    p for p in matured if (when := label_counts_from(p, delay)) is not None and when <= t
                ]
                total_cents = sum(cents(p["order_amount"]) for p in recent)
                row[f"n_orders_{d}d_by_{by}"] = len(recent)
                row[f"amount_mean_{d}d_by_{by}"] = float(total_cents) / float(100 * len(recent))
                row[f"n_matured_{d}d_by_{by}"] = len(matured)
                row[f"n_fraud_{d}d_by_{by}"] = len(fraud)
                row[f"risk_{d}d_by_{by}"] = len(fraud) / len(matured) if matured else 0.0
        rows.append(row)
    return pd.DataFrame(rows, columns=["order_id", *FEATURE_COLUMNS])


IMPLEMENTATIONS = {"oracle": reference_features_v3, "compute_features": compute_features}

# --- fixtures -----------------------------------------------------------------------------------------------------

SPECIAL_AMOUNTS = [
    0.005,
    1.015,
    2.675,
    1e-9,
    123456.785,
    0.0,
    0.125,
    0.135,
    0.025,
    0.625,
    1.005,
    33.335,
    0.875,
]
EDGE_HOURS = sorted(
    {24 * d for d in TIME_WINDOWS_DAYS} | {24 * (d + k) for d in TIME_WINDOWS_DAYS for k in (1, 3, 7)}
)


def tile_orders(n: int, seed: int, days: int = 91) -> pd.DataFrame:
    """~`n` orders over `days` days with few entity values, built to hit set 3's edges: many orders on an hour edge
    and 1 µs either side, equal timestamps (order_id decides), echoes of an order exactly D (and L + D) hours later
    and ± 1 µs, amounts whose cents round half to even, fraud labels missing, early, late, on a later order's date;
    some repeated order_ids with other contents (first wins) and a few labels on legitimate orders (ignored)."""
    rng = np.random.default_rng(seed)
    hours = rng.integers(0, days * 24, n)
    kind = rng.choice(4, n, p=[0.3, 0.2, 0.2, 0.3])  # on the hour, 1 µs before, 1 µs after, anywhere
    offset = np.select([kind == 0, kind == 1, kind == 2], [0, -1, 1], rng.integers(0, 3600 * 10**6, n))
    times = list(START + pd.to_timedelta(hours * 3600 * 10**6 + offset, unit="us"))
    entities = [
        (f"c{rng.integers(0, 6)}", f"e{rng.integers(0, 7)}@x.com", f"10.0.0.{rng.integers(0, 5)}")
        for _ in range(n)
    ]
    for i in rng.choice(
        n, n // 4, replace=False
    ):  # echoes: same entities, D or L + D hours later, ± 0 or 1 µs
        times.append(
            times[i] + EDGE_HOURS[rng.integers(0, len(EDGE_HOURS))] * HOUR + int(rng.integers(-1, 2)) * US
        )
        entities.append(entities[i])
    for i in rng.choice(
        len(times), len(times) // 10, replace=False
    ):  # ties: same instant, same or other values
        times.append(times[i])
        entities.append(entities[i] if rng.random() < 0.7 else entities[rng.integers(0, n)])
    for _ in range(6):  # bursts: one IP, many orders within a few hours
        centre, ip = times[rng.integers(0, n)], f"10.0.0.{rng.integers(0, 5)}"
        for _ in range(int(rng.integers(5, 12))):
            times.append(centre + int(rng.integers(-3 * 3600, 3 * 3600)) * pd.Timedelta(seconds=1))
            entities.append((f"c{rng.integers(0, 6)}", f"e{rng.integers(0, 7)}@x.com", ip))
    m = len(times)
    amount_kind = rng.choice(4, m, p=[0.4, 0.25, 0.2, 0.15])
    amounts = np.select(
        [amount_kind == 0, amount_kind == 1, amount_kind == 2],
        [
            np.round(rng.lognormal(3.0, 1.2, m), 2),
            np.array(SPECIAL_AMOUNTS)[rng.integers(0, len(SPECIAL_AMOUNTS), m)],
            rng.integers(0, 40_000, m) / 8,  # exact eighths: odd ones are exact half cents
        ],
        rng.lognormal(2.0, 2.0, m),  # many decimals
    )
    fraud = rng.random(m) < 0.2
    label_kind = rng.choice(
        5, m, p=[0.3, 0.2, 0.2, 0.2, 0.1]
    )  # missing, early, late, a later order's date, k days
    sorted_times = sorted(times)
    labels = []
    for i in range(m):
        if not fraud[i] and rng.random() > 0.03:
            labels.append(pd.NaT)
        elif label_kind[i] == 0:
            labels.append(pd.NaT)
        elif label_kind[i] == 1:
            labels.append(times[i] + int(rng.integers(0, 86_400 * 10**6)) * US)
        elif label_kind[i] == 2:
            labels.append(
                times[i]
                + int(rng.integers(14, 60)) * DAY
                + int(rng.integers(0, 3600)) * pd.Timedelta(seconds=1)
            )
        elif label_kind[i] == 3:
            later = [when for when in sorted_times if when > times[i]]
            labels.append(later[rng.integers(0, len(later))] if later else pd.NaT)
        else:
            labels.append(times[i] + int(rng.integers(1, 9)) * DAY)
    ids = rng.permutation(m)
    frame = pd.DataFrame(
        {
            "order_id": [f"o{i:04d}" for i in ids],
            "order_date": pd.DatetimeIndex(times).as_unit("us"),
            "customer_id": [e[0] for e in entities],
            "email": [e[1] for e in entities],
            "ip_addr": [e[2] for e in entities],
            "location_lat": rng.normal(size=m),
            "location_long": rng.normal(size=m),
            "order_amount": amounts.astype(np.float64),
            "is_fraud": fraud,
            "label_date": pd.DatetimeIndex(labels).as_unit("us"),
        }
    )
    repeats = frame.sample(n=m // 25, random_state=seed).assign(  # repeated ids with other contents
        order_date=lambda f: f["order_date"] + pd.Timedelta(hours=5),
        customer_id="c0",
        order_amount=7.77,
    )
    return pd.concat([frame, repeats]).sample(frac=1.0, random_state=seed + 1).reset_index(drop=True)


@pytest.fixture(scope="module")
def orders() -> pd.DataFrame:
    return tile_orders(420, seed=2303)


@pytest.fixture(scope="module")
def distinct(orders) -> pd.DataFrame:
    return orders.drop_duplicates("order_id").sort_values(["order_date", "order_id"], ignore_index=True)


@pytest.fixture(scope="module")
def oracle_by_delay(orders) -> dict[int, pd.DataFrame]:
    return {delay: reference_features_v3(orders, 10, delay) for delay in (1, 3, 7)}


def _mismatches(actual: pd.DataFrame, expected: pd.DataFrame, columns: list[str], atol: float) -> list[str]:
    lines = []
    for col in columns:
        a, e = actual[col].to_numpy(np.float64), expected[col].to_numpy(np.float64)
        for i in np.flatnonzero(~(np.abs(a - e) <= atol)):
            lines.append(
                f"{col} order {expected['order_id'].iloc[i]}: oracle {e[i]!r} compute_features {a[i]!r}"
            )
    return lines


def assert_same_features_v3(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Set-1 columns to 1e-9 (float sums in another order), set-3 time columns exactly."""
    assert actual.columns.tolist() == ["order_id", *FEATURE_COLUMNS]
    assert actual["order_id"].tolist() == expected["order_id"].tolist()
    wrong = _mismatches(actual, expected, FEATURE_SET_1, 1e-9) + _mismatches(
        actual, expected, TIME_COLUMNS, 0.0
    )
    assert not wrong, f"{len(wrong)} mismatches, first ones:\n" + "\n".join(wrong[:40])
    np.testing.assert_array_equal(
        actual[TIME_COLUMNS].to_numpy(np.float64), expected[TIME_COLUMNS].to_numpy(np.float64)
    )


# --- the fixture is worth comparing on --------------------------------------------------------------------------


def test_fixture_exercises_the_edges(orders, distinct, oracle_by_delay):
    assert orders["order_id"].duplicated().sum() >= 10 and 300 <= len(distinct) <= 900
    assert (distinct["order_date"].max() - distinct["order_date"].min()) > pd.Timedelta(days=85)
    assert distinct["order_date"].duplicated().sum() >= 20  # ties, decided by order_id
    within_hour = (distinct["order_date"] - distinct["order_date"].dt.floor("h")) // US
    for offset in (0, 1, 3600 * 10**6 - 1):  # on the hour edge, 1 µs after, 1 µs before
        assert (within_hour == offset).sum() >= 20
    stamps = {(r.customer_id, r.order_date) for r in distinct.itertuples()}
    for hours in (24, 24 * 8, 24 * 31):  # exactly D (or L + D) hours apart, and 1 µs more or less
        for extra in (-US, pd.Timedelta(0), US):
            assert any(
                (r.customer_id, r.order_date - hours * HOUR + extra) in stamps for r in distinct.itertuples()
            )
    assert (distinct["order_amount"] * 100 % 1 == 0.5).sum() >= 20  # exact half cents: half to even decides
    assert distinct["order_amount"].isin([1.015, 2.675, 1e-9, 123456.785, 0.0]).sum() >= 10
    fraud = distinct[distinct["is_fraud"]]
    assert fraud["label_date"].isna().sum() >= 10
    assert (fraud["label_date"] < fraud["order_date"] + DAY).sum() >= 10  # early
    assert (fraud["label_date"] > fraud["order_date"] + 14 * DAY).sum() >= 10  # late
    on_an_order = fraud["label_date"].isin(distinct["order_date"]) & (
        fraud["label_date"] > fraud["order_date"]
    )
    assert on_an_order.sum() >= 10
    assert distinct.loc[~distinct["is_fraud"], "label_date"].notna().any()  # ignored: not fraud
    one = oracle_by_delay[1]
    assert one["n_fraud_1d_by_ip_addr"].max() > 0 and one["n_matured_30d_by_customer_id"].max() > 20
    # the tiles matter: set 2's (t − 1 day, t] would count fewer orders, and the plain float mean differs
    plain = {}
    for r in distinct.to_dict("records"):
        same = distinct[distinct["customer_id"] == r["customer_id"]]
        seen = same[(same["order_date"] > r["order_date"] - DAY) & (same["order_date"] <= r["order_date"])]
        seen = seen[(seen["order_date"] < r["order_date"]) | (seen["order_id"] <= r["order_id"])]
        plain[r["order_id"]] = (len(seen), seen["order_amount"].mean())
    tiled = one.set_index("order_id").loc[distinct["order_id"]]
    counts = np.array([plain[i][0] for i in distinct["order_id"]])
    assert (tiled["n_orders_1d_by_customer_id"].to_numpy() > counts).sum() >= 10
    assert (tiled["n_orders_1d_by_customer_id"].to_numpy() < counts).sum() == 0
    same_rows = tiled["n_orders_1d_by_customer_id"].to_numpy() == counts
    means = np.array([plain[i][1] for i in distinct["order_id"]])
    assert (tiled["amount_mean_1d_by_customer_id"].to_numpy()[same_rows] != means[same_rows]).sum() >= 10


# --- compute_features against the oracle --------------------------------------------------------------------------


@pytest.mark.parametrize("label_delay_days", [1, 3, 7])
@pytest.mark.parametrize("window", [1, 3, 10])
def test_compute_features_matches_oracle(orders, oracle_by_delay, window, label_delay_days):
    expected = (
        oracle_by_delay[label_delay_days]
        if window == 10
        else reference_features_v3(orders, window, label_delay_days)
    )
    assert len(expected) == orders["order_id"].nunique() < len(orders)
    assert expected["n_orders_by_email"].max() == window
    assert_same_features_v3(
        compute_features(orders, window=window, label_delay_days=label_delay_days), expected
    )


# --- point in time ---------------------------------------------------------------------------------------------------


def _cuts(distinct: pd.DataFrame, seed: int) -> list[int]:
    """A random cut, a cut between two orders of the same instant, one between two orders of the same hour."""
    rng = np.random.default_rng(seed)
    dates = distinct["order_date"]
    tie = np.flatnonzero((dates == dates.shift()).to_numpy())
    hour = dates.dt.floor("h")
    same_hour = np.flatnonzero(((hour == hour.shift()) & (dates != dates.shift())).to_numpy())
    return [
        int(rng.integers(len(distinct) // 4, len(distinct))),
        int(rng.choice(tie)),
        int(rng.choice(same_hour)),
    ]


def _future_rewritten(distinct: pd.DataFrame, cut: int, seed: int) -> pd.DataFrame:
    """Everything not known at the cut changed: orders after it relabelled and re-amounted, labels dated after the
    last order before the cut moved later or withdrawn."""
    rng = np.random.default_rng(seed)
    t_cut = distinct["order_date"].iloc[cut - 1]
    changed = distinct.copy()
    after = np.arange(len(changed)) >= cut
    changed.loc[after, "is_fraud"] = ~changed.loc[after, "is_fraud"]
    changed.loc[after, "order_amount"] = rng.integers(0, 10_000, after.sum()) / 8
    late = (changed["label_date"] > t_cut).to_numpy() & ~after
    assert late.any()
    changed.loc[late, "label_date"] = changed.loc[late, "label_date"] + pd.to_timedelta(
        rng.integers(1, 10**9, late.sum()), unit="us"
    )
    withdrawn = late & (rng.random(len(changed)) < 0.3)
    changed.loc[withdrawn, "is_fraud"] = False
    return changed.sample(frac=1.0, random_state=seed).reset_index(drop=True)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("label_delay_days", [1, 7])
def test_point_in_time(distinct, implementation, label_delay_days):
    """Features of the orders before a cut are the same computed on those orders alone and on the whole frame,
    whatever the orders after the cut and the labels dated after it are."""
    features = IMPLEMENTATIONS[implementation]
    whole = features(distinct, window=10, label_delay_days=label_delay_days).set_index("order_id")
    for cut in _cuts(distinct, seed=label_delay_days):
        head_ids = distinct["order_id"].iloc[:cut]
        expected = whole.loc[head_ids].reset_index()
        for variant in (distinct.iloc[:cut], _future_rewritten(distinct, cut, seed=cut)):
            got = features(variant, window=10, label_delay_days=label_delay_days).set_index("order_id")
            assert_same_features_v3(got.loc[head_ids].reset_index(), expected)


def _counted_pairs(distinct: pd.DataFrame, label_delay_days: int) -> list[tuple[dict, dict]]:
    """(o, p): fraud order p whose label counts for o (p in o's matured tiles of some entity and window, label <= t)."""
    delay, L = pd.Timedelta(days=label_delay_days), 24 * label_delay_days
    records = distinct.to_dict("records")
    frauds = [
        (p, when, hour_of(p["order_date"]))
        for p in records
        if (when := label_counts_from(p, delay)) is not None
    ]
    pairs = []
    for o in records:
        h = hour_of(o["order_date"])
        for p, when, hp in frauds:
            if when > o["order_date"] or not any(p[by] == o[by] for by in ENTITIES):
                continue
            if h - L - 24 * max(TIME_WINDOWS_DAYS) <= hp < h - L:
                pairs.append((o, p))
    return pairs


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_label_dated_after_t_leaves_n_fraud(distinct, implementation):
    """Moving a counted label to t(o) + 1 µs takes p out of o's n_fraud in exactly the (entity, window) cells whose
    matured tiles hold p; moving it to t(o) itself changes nothing for o (label_date <= t)."""
    features, delay = IMPLEMENTATIONS[implementation], 3
    pairs = _counted_pairs(distinct, delay)
    assert len(pairs) > 50
    rng = np.random.default_rng(5)
    base = features(distinct, window=10, label_delay_days=delay).set_index("order_id")
    for k in rng.choice(len(pairs), 4, replace=False):
        o, p = pairs[k]
        row = distinct.index[distinct["order_id"] == p["order_id"]][0]
        for moved, removed in ((o["order_date"] + US, True), (o["order_date"], False)):
            changed = distinct.copy()
            changed.loc[row, "label_date"] = moved
            got = features(changed, window=10, label_delay_days=delay).set_index("order_id")
            unchanged = [c for c in FEATURE_COLUMNS if not c.startswith(("n_fraud_", "risk_"))]
            pd.testing.assert_frame_equal(got[unchanged], base[unchanged], check_exact=True)
            dropped = 0
            for by in ENTITIES:
                for d in TIME_WINDOWS_DAYS:
                    h, hp = hour_of(o["order_date"]), hour_of(p["order_date"])
                    holds_p = p[by] == o[by] and h - 24 * (delay + d) <= hp < h - 24 * delay
                    expected = base.at[o["order_id"], f"n_fraud_{d}d_by_{by}"] - int(removed and holds_p)
                    assert got.at[o["order_id"], f"n_fraud_{d}d_by_{by}"] == expected, (by, d, o, p)
                    n_matured = got.at[o["order_id"], f"n_matured_{d}d_by_{by}"]
                    risk = expected / n_matured if n_matured else 0.0
                    assert got.at[o["order_id"], f"risk_{d}d_by_{by}"] == risk, (by, d, o, p)
                    dropped += int(removed and holds_p)
            assert dropped >= 1 if removed else dropped == 0


# --- hand-built cases with exact numbers -------------------------------------------------------------------------

T = pd.Timestamp("2024-03-10 12:59:00", tz="UTC")  # t of order "o"; h = 2024-03-10 12:00


def _order(order_id, when, amount, fraud=False, label=None, values=("c1", "e1", "10.0.0.1")) -> dict:
    return {
        "order_id": order_id,
        "order_date": pd.Timestamp(when, tz="UTC") if isinstance(when, str) else when,
        "customer_id": values[0],
        "email": values[1],
        "ip_addr": values[2],
        "location_lat": 0.0,
        "location_long": 0.0,
        "order_amount": amount,
        "is_fraud": fraud,
        "label_date": label,
    }


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame["order_date"] = frame["order_date"].dt.as_unit("us")
    frame["label_date"] = pd.to_datetime(frame["label_date"], utc=True).dt.as_unit("us")
    return frame


def hand_orders() -> pd.DataFrame:
    """One customer/email/IP (c1, e1, 10.0.0.1) around o at 2024-03-10 12:59 (δ = 1: L = 24 h), plus "y" that shares
    only the IP and "x" that shares nothing. Cents: 0.125 → 12, 0.135 → 14, 2.675 → 268, 0.625 → 62, 0.005 → 0,
    1.015 → 101."""
    return _frame(
        [
            _order("z_tie", T, 100.0),  # same instant as o, after it by order_id: not in R
            _order(
                "p5", T + HOUR - pd.Timedelta(minutes=59) - US, 100.0
            ),  # 12:59:59.999999, after o: not in R
            _order(
                "m2", "2024-03-08 11:59:59.999999", 1.0, fraud=True
            ),  # M(7d), not M(1d); label 03-09 11:59:59.999999
            _order(
                "m1", "2024-03-08 12:00:00", 0.125, fraud=True, label=T
            ),  # far edge of M(1d) = hour h − 48; label = t
            _order("m3", "2024-03-08 20:00:00", 0.135),
            _order(
                "pb", "2024-03-09 11:59:59.999999", 2.675, fraud=True, label=T + US
            ),  # M(1d) not R(1d); label > t
            _order(
                "pa", "2024-03-09 12:00:00", 0.125
            ),  # 24 h 59 min before o, start of hour h − 24: in R(1d)
            _order("pc", "2024-03-09 12:59:30", 0.625),  # 23 h 59 min 30 s before o, in hour h − 24
            _order("pd", "2024-03-09 13:00:00", 0.135),  # 23 h 59 min before o, hour h − 23
            _order("p6", "2024-03-10 12:00:00", 0.005),  # o's hour, before o
            _order("a_tie", T, 1.015),  # same instant as o, before it by order_id
            _order("o", T, 0.135),
            _order("y", "2024-03-10 12:10:00", 0.0, fraud=True, values=("c3", "e3", "10.0.0.1")),
            _order("x", "2024-03-10 12:30:00", 5.0, fraud=True, values=("c2", "e2", "10.0.0.2")),
        ]
    )


# o's expected set-3 features with δ = 1, per entity and window: (n_orders, Σ cents, n_matured, n_fraud)
HAND_EXPECTED = {
    ("customer_id", 1): (6, 203, 3, 1),  # R: pa pc pd p6 a_tie o; M: m1 m3 pb; fraud: m1
    ("customer_id", 7): (10, 597, 4, 2),  # R: + m2 m1 m3 pb; M: m2 m1 m3 pb; fraud: m2 m1
    ("customer_id", 30): (10, 597, 4, 2),
    ("ip_addr", 1): (7, 203, 3, 1),  # + y (0 cents)
    ("ip_addr", 7): (11, 597, 4, 2),
    ("ip_addr", 30): (11, 597, 4, 2),
}
HAND_EXPECTED.update({("email", d): HAND_EXPECTED[("customer_id", d)] for d in TIME_WINDOWS_DAYS})


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_hand_built_hour_edges(implementation):
    features = IMPLEMENTATIONS[implementation](hand_orders(), window=10, label_delay_days=1).set_index(
        "order_id"
    )
    o = features.loc["o"]
    for (by, d), (n, total, matured, fraud) in HAND_EXPECTED.items():
        assert o[f"n_orders_{d}d_by_{by}"] == n, (by, d)
        assert o[f"amount_mean_{d}d_by_{by}"] == total / (100 * n), (by, d)
        assert o[f"n_matured_{d}d_by_{by}"] == matured, (by, d)
        assert o[f"n_fraud_{d}d_by_{by}"] == fraud, (by, d)
        assert o[f"risk_{d}d_by_{by}"] == fraud / matured, (by, d)
    assert (
        o["amount_mean_1d_by_customer_id"]
        == 0.3383333333333333
        != (0.125 + 0.625 + 0.135 + 0.005 + 1.015 + 0.135) / 6
    )
    p5 = features.loc["p5"]  # 12:59:59.999999: everything of hours h − 24 .. h, o's ties included
    assert p5["n_orders_1d_by_customer_id"] == 8 and p5["amount_mean_1d_by_customer_id"] == 20203 / 800
    m2 = features.loc["m2"]  # the first order: alone in its windows, nothing matured
    assert m2["n_orders_30d_by_email"] == 1 and m2["amount_mean_30d_by_email"] == 1.0
    assert m2["n_matured_30d_by_email"] == 0 and m2["risk_30d_by_email"] == 0.0
    x = features.loc["x"]  # shares no value: its own order only; its fraud counts for nobody
    assert (x["n_orders_1d_by_ip_addr"], x["amount_mean_1d_by_ip_addr"], x["n_matured_30d_by_ip_addr"]) == (
        1,
        5.0,
        0,
    )


def test_float_products_behind_the_cents():
    """The float64 products the cents are rounded from: exact halves go to the even cent; near-halves by their side."""
    assert 0.125 * 100 == 12.5 and round(0.125 * 100) == 12  # half up would give 13
    assert 0.135 * 100 == 13.5 and round(0.135 * 100) == 14  # the product rounds to exactly 13.5, even is 14
    assert 2.675 * 100 == 267.5 and round(2.675 * 100) == 268
    assert 1.015 * 100 < 101.5 and round(1.015 * 100) == 101  # decimal half up would give 102
    assert 123456.785 * 100 == 12345678.5 and round(123456.785 * 100) == 12345678


CENTS = [
    (0.125, 12),
    (0.135, 14),
    (2.675, 268),
    (1.015, 101),
    (1.005, 100),
    (0.005, 0),
    (0.015, 2),
    (0.025, 2),
    (0.625, 62),
    (0.875, 88),
    (33.335, 3334),
    (1e-9, 0),
    (123456.785, 12345678),
    (0.0, 0),
    (999999999.995, 100000000000),
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_hand_built_cents_half_to_even(implementation):
    """One order per entity value: amount_mean = c / 100; two 0.125 orders in one hour: (12 + 12) / 200, not 25 / 200;
    three orders: one division of the cent sum, Σ c / (100 · n)."""
    rows = [
        _order(f"a{i:02d}", "2024-02-01 10:00:00", amount, values=(f"c{i}", f"e{i}", f"ip{i}"))
        for i, (amount, _) in enumerate(CENTS)
    ]
    rows += [
        _order("b1", "2024-02-01 10:05:00", 0.125, values=("cb", "eb", "ipb")),
        _order("b2", "2024-02-01 10:06:00", 0.125, values=("cb", "eb", "ipb")),
        _order("t1", "2024-02-01 08:00:00", 0.01, values=("ct", "et", "ipt")),
        _order("t2", "2024-02-01 09:00:00", 0.01, values=("ct", "et", "ipt")),
        _order("t3", "2024-02-01 10:00:00", 2.2, values=("ct", "et", "ipt")),
    ]
    assert [cents(amount) for amount, _ in CENTS] == [c for _, c in CENTS]
    features = IMPLEMENTATIONS[implementation](_frame(rows), window=10, label_delay_days=7).set_index(
        "order_id"
    )
    for i, (_, c) in enumerate(CENTS):
        for by in ENTITIES:
            for d in TIME_WINDOWS_DAYS:
                assert features.at[f"a{i:02d}", f"amount_mean_{d}d_by_{by}"] == c / 100, (CENTS[i], by, d)
    assert features.at["b2", "amount_mean_1d_by_customer_id"] == 24 / 200 == 0.12
    # 222 / 300 = 0.74, whereas the float mean (0.01 + 0.01 + 2.2) / 3 and (222 / 100) / 3 give 0.7400000000000001
    assert features.at["t3", "amount_mean_1d_by_email"] == 222 / 300 == 0.74
    assert 0.74 != (0.01 + 0.01 + 2.2) / 3 and 0.74 != (222 / 100) / 3
