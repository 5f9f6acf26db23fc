"""fraud_poc.store.registry and fraud_poc.model.report: model round trip, atomic writes, report PNGs, the promotion gate."""

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb
from matplotlib.image import imread

from fraud_poc.core.schema import FEATURE_COLUMNS, FEATURE_SET_VERSION, FeatureSpec, feature_set_fingerprint
from fraud_poc.model.report import PNG_SIGNATURE, report_pngs
from fraud_poc.model.train import evaluate, importance_gain
from fraud_poc.store.registry import (
    MODEL_FILE,
    list_models,
    load_booster,
    load_metadata,
    model_bytes,
    model_dir,
    model_exists,
    model_metadata,
    promotion_gate,
    save_model,
)

SPEC = FeatureSpec(window=6, label_delay_days=3)  # not the defaults: the metadata must say these


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(3)
    x = pd.DataFrame(rng.normal(size=(400, len(FEATURE_COLUMNS))), columns=FEATURE_COLUMNS).astype("float32")
    y = (x["order_amount"] + 0.3 * rng.normal(size=400) > 1).to_numpy()
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 3, "seed": 1}, xgb.DMatrix(x, y), 20)
    scores = booster.inplace_predict(x)
    scenario = np.where(y, "amount_anomaly", "")
    metrics = evaluate(y, scores, scenario, 0.5)
    metadata = model_metadata(
        "xgb-r1",
        "r1",
        {"max_depth": 3},
        metrics,
        {"train_rows": 400, "train_fraud": int(y.sum()), "holdout_rows": 400, "holdout_fraud": int(y.sum())},
        {"best_iteration": 19},
        SPEC,
    )
    report = report_pngs(y, scores, 0.5, importance_gain(booster))
    return booster, x, metadata, report


def test_round_trip_same_predictions(tmp_path, model):
    booster, x, metadata, report = model
    path = save_model(tmp_path, "xgb-r1", booster, metadata, report)
    assert path == tmp_path / "models" / "xgb-r1" and list_models(tmp_path) == ["xgb-r1"]
    loaded = load_booster(tmp_path, "xgb-r1")
    np.testing.assert_array_equal(loaded.inplace_predict(x), booster.inplace_predict(x))
    assert loaded.feature_names == FEATURE_COLUMNS
    assert model_bytes(tmp_path, "xgb-r1") == bytes(booster.save_raw("ubj"))
    assert (path / MODEL_FILE).read_bytes()[:1] == b"{"  # UBJSON object, not pickle
    stored = load_metadata(tmp_path, "xgb-r1")
    assert stored == json.loads(json.dumps(metadata))
    assert (
        stored["feature_columns"] == FEATURE_COLUMNS and stored["feature_set_version"] == FEATURE_SET_VERSION
    )
    assert (
        stored["feature_set_fingerprint"]
        == feature_set_fingerprint(FEATURE_COLUMNS, 6, 3)
        == SPEC.fingerprint
    )
    assert stored["feature_spec"] == SPEC.to_json() and FeatureSpec.from_json(stored["feature_spec"]) == SPEC
    assert (stored["window"], stored["label_delay_days"]) == (6, 3)
    assert set(stored["metrics"]) >= {
        "roc_auc",
        "average_precision",
        "precision",
        "recall",
        "f1",
        "recall_by_scenario",
    }
    assert set(stored["library_versions"]) >= {"xgboost", "dask", "pandas", "numpy", "python"}


def test_report_files_are_valid_pngs(tmp_path, model):
    booster, _, metadata, report = model
    path = save_model(tmp_path, "xgb-r1", booster, metadata, report)
    files = sorted(p.name for p in (path / "report").iterdir())
    assert files == ["feature_importance.png", "precision_recall.png", "score_distribution.png"]
    for name in files:
        data = (path / "report" / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        image = imread(io.BytesIO(data), format="png")
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0  # something was drawn


def test_half_written_model_never_visible(tmp_path, model):
    booster, _, metadata, report = model
    with pytest.raises(TypeError):
        save_model(tmp_path, "xgb-r2", booster, {**metadata, "bad": object()}, report)  # metadata not JSON
    assert not model_exists(tmp_path, "xgb-r2") and not model_dir(tmp_path, "xgb-r2").exists()
    assert list(Path(tmp_path, "models").iterdir()) == []
    save_model(tmp_path, "xgb-r2", booster, metadata, report)
    with pytest.raises(TypeError):
        save_model(tmp_path, "xgb-r2", booster, {**metadata, "bad": object()}, report)
    assert load_metadata(tmp_path, "xgb-r2") == json.loads(json.dumps(metadata))
    assert [p.name for p in Path(tmp_path, "models").iterdir()] == ["xgb-r2"]


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model xgb-none is not in the registry"):
        load_booster(tmp_path, "xgb-none")
    with pytest.raises(ValueError, match="invalid model_id"):
        save_model(tmp_path, "../evil", xgb.Booster(), {}, {})


def test_gate_below_minimum():
    decision = promotion_gate(0.2, 0.3)
    assert not decision.promoted
    assert decision.reason == "holdout average precision 0.2000 is below the minimum 0.3000"


def test_gate_worse_than_champion():
    decision = promotion_gate(0.61, 0.3, "xgb-old", 0.62)
    assert not decision.promoted and decision.champion_id == "xgb-old"
    assert (
        decision.reason
        == "holdout average precision 0.6100 is worse than champion xgb-old's 0.6200 on the same holdout"
    )


def test_gate_first_model():
    decision = promotion_gate(0.45, 0.3)
    assert decision.promoted and decision.champion_id is None
    assert decision.reason == "first model: holdout average precision 0.4500 reaches the minimum 0.3000"


def test_gate_better_or_equal_champion():
    assert promotion_gate(0.62, 0.3, "xgb-old", 0.62).promoted
    better = promotion_gate(0.7, 0.3, "xgb-old", 0.62)
    assert better.promoted and better.reason.endswith(
        "not worse than champion xgb-old's 0.6200 on the same holdout"
    )
    assert not promotion_gate(
        0.25, 0.3, "xgb-old", 0.1
    ).promoted  # the minimum holds even against a weak champion
