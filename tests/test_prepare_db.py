"""fraud_poc.steps.prepare_db: step 6 on runs made by the real steps 1-4 and trained by step 5; real Redis, real
LocalCluster."""

import shutil
from uuid import uuid4

import pytest
import redis
from step_runs import REDIS_URL, SETTINGS, prepare_args

from fraud_poc.datasets import serving_state_dir
from fraud_poc.feature_store import live_pointer
from fraud_poc.redis_store import Keys
from fraud_poc.registry import list_models
from fraud_poc.settings import TrainModelSettings
from fraud_poc.steps.prepare_db import prepare_db_step
from fraud_poc.steps.train_model import train_model_step


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
