"""fraud_poc.pipeline.steps.prepare_db: step 6 on runs made by the real steps 1-4 and trained by step 5; real Redis, real
LocalCluster."""

import shutil
from datetime import timedelta
from uuid import uuid4

import pytest
import redis
from step_runs import REDIS_URL, SETTINGS, prepare_args

from fraud_poc.core.schema import FeatureSpec
from fraud_poc.core.settings import TrainModelSettings
from fraud_poc.pipeline.steps.prepare_db import prepare_db_step
from fraud_poc.pipeline.steps.train_model import train_model_step
from fraud_poc.store.carry_over import (
    CARRY_MARGIN,
    added_key,
    carried_since,
    carry_over,
    run_started,
    stream_id_at,
)
from fraud_poc.store.datasets import data_cutoff, serving_state_dir
from fraud_poc.store.feature_store import live_pointer
from fraud_poc.store.redis_store import Keys
from fraud_poc.store.registry import list_models


def test_prepare_db_failing_midway_leaves_live_untouched(client, runs):
    data_root, _, _ = runs
    r = redis.Redis.from_url(REDIS_URL)
    keys = Keys(f"fraudtest:{uuid4().hex}:")
    try:
        train_model_step(
            client, data_root, "run-1", redis_url=REDIS_URL, key_prefix=keys.prefix, settings=SETTINGS
        )
        prepare_db_step(client, data_root, "run-1", "xgb-run-1", **prepare_args(keys.prefix))
        live_before = live_pointer(r, keys)
        keys_before = sorted(r.scan_iter(match=keys.prefix + "*"))
        broken = data_root / "broken"
        shutil.copytree(data_root / "runs" / "run-2", broken / "runs" / "run-2")
        train_model_step(
            client,
            broken,
            "run-2",
            redis_url=REDIS_URL,
            key_prefix=keys.prefix,
            settings=TrainModelSettings(min_average_precision=0.0),
        )
        victim = sorted((serving_state_dir(broken, "run-2") / "email").glob("*.parquet"))[-1]
        victim.write_bytes(victim.read_bytes()[:200])  # a truncated file: that partition cannot be read
        with pytest.raises(Exception, match="(?i)parquet|arrow|invalid|magic"):
            prepare_db_step(client, broken, "run-2", "xgb-run-2", **prepare_args(keys.prefix))
        assert live_pointer(r, keys) == live_before
        assert list(r.scan_iter(match=keys.fs_prefix("run-2") + "*")) == []
        assert sorted(r.scan_iter(match=keys.prefix + "*")) == keys_before
        shutil.rmtree(serving_state_dir(broken, "run-2") / "email")  # feature-calc never ran to the end
        with pytest.raises(
            FileNotFoundError, match="no serving state of email .* run step feature-calc first"
        ):
            prepare_db_step(client, broken, "run-2", "xgb-run-2", **prepare_args(keys.prefix))
        assert sorted(r.scan_iter(match=keys.prefix + "*")) == keys_before
    finally:
        for key in r.scan_iter(match=f"{keys.prefix}*", count=1000):
            r.unlink(key)


def test_prepare_db_needs_a_registered_model(client, runs):
    data_root, _, _ = runs
    r = redis.Redis.from_url(REDIS_URL)
    keys = Keys(f"fraudtest:{uuid4().hex}:")
    with pytest.raises(FileNotFoundError, match="model xgb-nope is not in the registry"):
        prepare_db_step(client, data_root, "run-2", "xgb-nope", **prepare_args(keys.prefix))
    assert list(r.scan_iter(match=keys.prefix + "*")) == []


def test_prepare_db_refuses_a_switch_the_gate_did_not_compare(client, runs):
    """Two runs gated while nothing was live: the first to switch goes live, the second is refused at the
    switch (its gate never compared it with the first), keeps its model registered, and says why."""
    data_root, _, _ = runs
    r = redis.Redis.from_url(REDIS_URL)
    keys = Keys(f"fraudtest:{uuid4().hex}:")
    lenient = TrainModelSettings(min_average_precision=0.0)
    try:
        gates = [
            train_model_step(
                client, data_root, run_id, redis_url=REDIS_URL, key_prefix=keys.prefix, settings=lenient
            )
            for run_id in ("run-1", "run-2")
        ]
        assert [g.champion_id for g in gates] == [None, None] and all(g.promoted for g in gates)
        first = prepare_db_step(
            client, data_root, "run-1", "xgb-run-1", **prepare_args(keys.prefix), expected_live=""
        )
        assert first.refused is None and live_pointer(r, keys)["model_id"] == "xgb-run-1"
        second = prepare_db_step(
            client, data_root, "run-2", "xgb-run-2", **prepare_args(keys.prefix), expected_live=""
        )
        assert second.refused is not None and "but xgb-run-1 is live now" in second.refused
        assert second.live == first.live == live_pointer(r, keys) and r.get(keys.live_previous) is None
        assert "xgb-run-2" in list_models(data_root)  # registered, not live
        again = prepare_db_step(  # gated against the model that is live: it switches
            client,
            data_root,
            "run-2",
            "xgb-run-2",
            **prepare_args(keys.prefix),
            expected_live="xgb-run-1",
        )
        assert again.refused is None and live_pointer(r, keys)["model_id"] == "xgb-run-2"
        assert again.previous["model_id"] == "xgb-run-1"
    finally:
        for key in r.scan_iter(match=f"{keys.prefix}*", count=1000):
            r.unlink(key)


def _log(r: redis.Redis, keys: Keys, entry_id: str, fields: dict) -> None:
    """An event as the prediction service's scripts log it, with the id of when it was logged."""
    r.xadd(keys.events, fields, id=entry_id)
    r.incr(added_key(keys))  # the scripts' count of events ever logged (Redis 6.2 has no entries-added)


def _order(i: int, ts_us: int) -> dict:
    """A scored order of a new customer, email and IP (`carried-<i>`)."""
    return {
        "kind": "order",
        "order_id": f"carried-o{i}",
        "ts": ts_us,
        "customer_id": f"carried-c{i}",
        "email": f"carried-{i}@example.com",
        "ip_addr": f"203.0.113.{i}",
        "order_amount": "25.0",
        "location_lat": "40.4",
        "location_long": "-3.7",
    }


def test_prepare_db_carries_every_event_after_the_data_cut_off(client, runs):
    """Orders scored and labels reported an hour before a run was submitted, after its data's cut-off, go into the
    version it makes live (a replay from the submission, as before, took none). A log trimmed past a version's
    cut-off refuses its switch, saying how many events are missing; with accept_loss it goes on."""
    data_root, _, _ = runs
    r = redis.Redis.from_url(REDIS_URL)
    keys = Keys(f"fraudtest:{uuid4().hex}:")
    lenient = TrainModelSettings(min_average_precision=0.0)
    try:
        for run_id in ("run-1", "run-2", "run-3"):
            train_model_step(
                client, data_root, run_id, redis_url=REDIS_URL, key_prefix=keys.prefix, settings=lenient
            )
        prepare_db_step(client, data_root, "run-1", "xgb-run-1", **prepare_args(keys.prefix))
        cut = max(data_cutoff(data_root, "run-2"), data_cutoff(data_root, "run-3"))
        logged_ms = int((cut + timedelta(minutes=10)).timestamp() * 1000)  # logged after the cut-offs...
        r.zadd(
            keys.runs, {"run-2": (cut + timedelta(minutes=70)).timestamp()}
        )  # ...an hour before submission
        ts = int(cut.timestamp() * 1e6)
        for i in range(20):
            _log(r, keys, f"{logged_ms}-{i}", _order(i, ts + (i + 1) * 1_000_000))
        for i in range(5):  # five of them reported as fraud
            label = {**_order(i, ts + (i + 1) * 1_000_000), "kind": "label", "is_fraud": "1"}
            _log(r, keys, f"{logged_ms + 1}-{i}", {**label, "label_ts": ts + 10**8})
        since = carried_since(r, keys, data_root, "run-2")
        assert since == data_cutoff(data_root, "run-2")
        done = prepare_db_step(
            client, data_root, "run-2", "xgb-run-2", **prepare_args(keys.prefix), carry_since=since
        )
        assert (done.refused, done.carried_orders, done.carried_labels, done.events_lost) == (
            None,
            20,
            5,
            None,
        )
        assert live_pointer(r, keys)["model_id"] == "xgb-run-2"
        for i in range(20):
            assert r.exists(keys.fs_state("run-2", "customer_id", f"carried-c{i}")), i
        by_clock = stream_id_at(run_started(r, keys, "run-2") - CARRY_MARGIN)  # the replay's start before
        assert carry_over(r, keys, "run-x", by_clock, FeatureSpec()).orders == 0

        for i in range(
            30
        ):  # 30 more, then the log is trimmed to 10: 45 events after run-3's cut-off are gone
            _log(r, keys, f"{logged_ms + 2}-{i}", _order(100 + i, ts + 10**9 + i))
        r.xtrim(keys.events, maxlen=10, approximate=False)
        since = carried_since(r, keys, data_root, "run-3")
        refused = prepare_db_step(
            client, data_root, "run-3", "xgb-run-3", **prepare_args(keys.prefix), carry_since=since
        )
        assert refused.refused is not None and "no longer holds up to 45 event(s)" in refused.refused
        assert "accept_loss" in refused.refused and refused.details["events_lost"]["missing_events"] == 45
        assert live_pointer(r, keys)["model_id"] == "xgb-run-2" and "xgb-run-3" in list_models(data_root)
        went = prepare_db_step(
            client,
            data_root,
            "run-3",
            "xgb-run-3",
            **prepare_args(keys.prefix),
            carry_since=since,
            accept_loss=True,
        )
        assert went.refused is None and live_pointer(r, keys)["model_id"] == "xgb-run-3"
        assert went.carried_orders == 10 and went.events_lost["missing_events"] == 45
    finally:
        for key in r.scan_iter(match=f"{keys.prefix}*", count=1000):
            r.unlink(key)
