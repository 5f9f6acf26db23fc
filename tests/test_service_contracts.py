"""The prediction service's wiring without running it: config, event modules, API spec, layers, payloads."""

import ast
import importlib
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hopeit.dataobjects.payload import Payload

from fraud_poc.core.service_payloads import Contribution, KnownEntities, Order, Prediction

REPO = Path(__file__).resolve().parents[1]
EVENTS = {
    "predict": "POST",
    "predict-batch": "POST",
    "find-orders": "GET",
    "model-info": "GET",
    "report-label": "POST",
}


def test_config_names_one_thin_module_per_event():
    config = json.loads((REPO / "config" / "fraud-service.json").read_text())
    assert (config["app"]["name"], config["app"]["version"]) == ("fraud-service", "0.2")
    assert config["engine"]["import_modules"] == ["fraud_poc.service"]
    events = {name: event["type"] for name, event in config["events"].items()}
    assert events.pop("security-setup") == "SETUP"
    assert events == EVENTS
    for name in EVENTS:
        module = importlib.import_module(f"fraud_poc.service.{name.replace('-', '_')}")
        assert module.__steps__ and module.__api__, name
        assert len(Path(module.__file__).read_text().splitlines()) < 120, f"{name} should stay thin"


def test_api_spec_has_every_event():
    spec = json.loads((REPO / "config" / "openapi-service.json").read_text())
    paths = {path.rsplit("/", 1)[1]: methods for path, methods in spec["paths"].items()}
    assert {name: next(iter(methods)).upper() for name, methods in paths.items()} == EVENTS
    for name, methods in paths.items():
        assert {"200", "400", "503"} <= set(next(iter(methods.values()))["responses"]), name


def _imports(module: str) -> set[str]:
    tree = ast.parse(Path(importlib.import_module(module).__file__).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add(("." * node.level) + (node.module or ""))
    return found


def test_the_service_has_no_window_setting():
    """W and δ reach serving only from the live model's metadata (what train-model recorded), never from config."""
    config = json.loads((REPO / "config" / "fraud-service.json").read_text())
    assert "feature_store" not in config["settings"]
    assert not [name for name, event in config["events"].items() if "feature_store" in event["setting_keys"]]


@pytest.mark.parametrize(
    "module", ["store.store_scripts", "serving.serving_model", "serving.batching", "serving.scorer"]
)
def test_scoring_is_below_the_event_layer(module):
    """Layer 2 never imports hopeit's app or server machinery, nor the event modules."""
    imports = _imports(f"fraud_poc.{module}")
    assert not [name for name in imports if name.startswith(("hopeit.app", "hopeit.server", ".service."))]


def test_prediction_round_trips_through_json():
    prediction = Prediction(
        order_id="o1",
        fraud_score=0.25,
        is_fraud=False,
        threshold=0.5,
        model_id="m1",
        feature_store_version="v1",
        known_entities=KnownEntities(customer_id=True, email=False, ip_addr=False),
        cold_start=False,
        features={"order_amount": 12.5},
        top_contributions=[Contribution(feature="order_amount", value=12.5, contribution=-0.75)],
        margin=-1.0986,
        bias=-0.3486,
    )
    assert Payload.from_json(Payload.to_json(prediction), Prediction) == prediction
    order = Order(
        order_id="o1",
        order_date=datetime(2025, 1, 1, tzinfo=UTC),
        customer_id="c",
        email="e",
        ip_addr="i",
        order_amount=1.0,
        location_lat=0.0,
        location_long=0.0,
    )
    assert json.loads(Payload.to_json(order))["order_date"] == "2025-01-01T00:00:00Z"
