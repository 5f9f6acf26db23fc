"""The training app's stream chain, stream settings and redelivery map, as hopeit loads them from config/."""

import os

import pytest
from hopeit.app.config import EventType
from hopeit.testing.apps import config

from fraud_poc.core.payloads import PIPELINE_STEPS
from fraud_poc.core.settings import DeliverySettings
from fraud_poc.training import run_pipeline
from fraud_poc.web.pipeline_events import ChainMismatch, chain_problems, check_chain


@pytest.fixture(scope="module")
def training_app():
    for name, value in {
        "FRAUD_REDIS_URL": "redis://x:1/0",
        "FRAUD_KEY_PREFIX": "p:",
        "FRAUD_DATA_ROOT": "/d",
    }.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("DASK_SCHEDULER_ADDRESS", "")
    os.environ.setdefault("FRAUD_API_TOKEN", "")
    return config("config/training-pipeline.json")


def test_steps_are_chained_through_streams_in_pipeline_order(training_app):
    assert chain_problems(training_app) == []  # the check the service makes at start (nbs/49a)
    events = training_app.events
    assert [events[step].type for step in PIPELINE_STEPS] == [EventType.STREAM] * len(PIPELINE_STEPS)
    assert events["prepare-db"].write_stream is None
    assert events["run-from-raw"].write_stream.name == events["preprocess"].read_stream.name


def test_a_config_that_chains_the_steps_otherwise_stops_the_start(training_app, monkeypatch):
    """hopeit builds the spec (and so calls run-pipeline's `__api__`) at start with `--api-file`."""
    events = training_app.events
    monkeypatch.setattr(events["train-model"], "read_stream", events["feature-calc"].read_stream)
    with pytest.raises(
        ChainMismatch, match="step 'train-model' must be a STREAM event reading what 'training-data'"
    ):
        run_pipeline.__api__(run_pipeline, training_app, "run-pipeline", None)
    with pytest.raises(ChainMismatch, match="which no step reads"):
        check_chain(training_app)


def test_stream_steps_run_one_message_at_a_time_with_long_timeouts_and_bounded_streams(training_app):
    for step in PIPELINE_STEPS:
        stream = training_app.effective_settings[step]["stream"]
        assert (stream["batch_size"], stream["timeout"] >= 600, stream["target_max_len"] > 0) == (
            1,
            True,
            True,
        )
        assert stream["serialization"].value == "json"


def test_every_step_stream_is_watched_for_redelivery(training_app):
    delivery = DeliverySettings(**training_app.settings["delivery"])
    watched = {stream: step for stream, step in delivery.streams.items()}
    expected = {training_app.events[step].read_stream.name: step for step in PIPELINE_STEPS}
    assert watched == expected
    longest = max(training_app.effective_settings[step]["stream"]["timeout"] for step in PIPELINE_STEPS)
    assert delivery.stale_after_seconds > longest
    assert delivery.dead_letter_stream not in watched
