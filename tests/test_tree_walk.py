"""The compiled tree walk gives XGBoost's own scores and approximate contributions, bit for bit, on many boosters
and hard inputs; boosters it does not cover keep XGBoost's path."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb
from xgboost.core import XGBoostError

from fraud_poc.core.schema import FEATURE_COLUMNS
from fraud_poc.model.row_predictor import RowPredictor
from fraud_poc.model.train import BASE_PARAMS, monotone_constraints, with_prior_correction
from fraud_poc.model.tree_walk import CompiledTrees, UnsupportedModel, walk_supported

N_FEATURES = 20
ROWS = 3000


def training_data(n_features: int, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows with 15% missing values and a label several features and an interaction drive."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, n_features)) * rng.choice([0.01, 1.0, 100.0], size=n_features)
    x[rng.random(x.shape) < 0.15] = np.nan
    z = np.nan_to_num(x / np.nanstd(x, axis=0))
    y = (z[:, 0] + z[:, 1] * z[:, 2] - z[:, 3] + rng.normal(size=rows) > 0.8).astype(float)
    return x, y


def trained(params: dict, rounds: int = 30, seed: int = 0) -> xgb.Booster:
    x, y = training_data(N_FEATURES, 4000, seed)
    booster = xgb.train({"objective": "binary:logistic", "nthread": 1, **params}, xgb.DMatrix(x, y), rounds)
    booster.set_param({"nthread": 1})
    return booster


def pipeline_like() -> xgb.Booster:
    """Trained as `train.train_booster` trains (its base params, the pipeline's configuration, monotone
    constraints on confirmed-fraud features, float32 quantile matrices, early stopping, the booster cut at its
    best iteration), then moved by a prior correction."""
    x, y = training_data(len(FEATURE_COLUMNS), 6000, 1)
    x = x.astype(np.float32)
    params = {
        **BASE_PARAMS,
        "max_depth": 6,
        "learning_rate": 0.3,
        "subsample": 0.9,
        "colsample_bytree": 0.9,
        "min_child_weight": 1.0,
        "seed": 42,
        "nthread": 1,
        "monotone_constraints": monotone_constraints(FEATURE_COLUMNS),
    }
    train = xgb.QuantileDMatrix(x[:4500], y[:4500], feature_names=FEATURE_COLUMNS)
    tune = xgb.QuantileDMatrix(x[4500:], y[4500:], feature_names=FEATURE_COLUMNS, ref=train)
    booster = xgb.train(
        params, train, 400, evals=[(tune, "tuning")], early_stopping_rounds=15, verbose_eval=False
    )
    booster = booster[: booster.best_iteration + 1]
    corrected = with_prior_correction(booster, 0.3)
    corrected.set_param({"nthread": 1})
    return corrected


BOOSTERS = {
    "depth 6": lambda: trained({"max_depth": 6}),
    "depth 1": lambda: trained({"max_depth": 1}),
    "depth 3, base_score 0.05": lambda: trained({"max_depth": 3, "base_score": 0.05}),
    "depth 8, eta 0.9, 80 trees": lambda: trained({"max_depth": 8, "eta": 0.9}, rounds=80),
    "lossguide, deep": lambda: trained({"grow_policy": "lossguide", "max_leaves": 64, "max_depth": 0}),
    "exact tree method": lambda: trained({"tree_method": "exact", "max_depth": 5}),
    "approx tree method": lambda: trained({"tree_method": "approx", "max_depth": 5}),
    "root leaves only": lambda: trained({"max_depth": 3, "min_child_weight": 1e6}),
    "scale_pos_weight": lambda: trained({"max_depth": 4, "scale_pos_weight": 5.0}),
    "forest of 3 per round": lambda: trained(
        {"max_depth": 4, "num_parallel_tree": 3, "subsample": 0.5, "colsample_bynode": 0.5}
    ),
    "reg:logistic": lambda: trained({"objective": "reg:logistic", "max_depth": 4}),
    "base_score 0.9999999 (clamped)": lambda: trained({"max_depth": 3, "base_score": 0.9999999}),
    "pipeline-like, 91 features": pipeline_like,
}


@pytest.fixture(scope="module", params=list(BOOSTERS), ids=list(BOOSTERS))
def booster(request) -> xgb.Booster:
    return BOOSTERS[request.param]()


def hard_rows(trees: CompiledTrees, rows: int, seed: int) -> np.ndarray:
    """Probe rows (values on, below and above the split conditions, missing values) with scale and extremes:
    huge values (one that rounds to FLT_MAX, others to infinity), ±inf, float32 subnormals, tiny doubles that
    round to 0, and -0.0."""
    rng = np.random.default_rng(seed)
    x = trees.probe_rows(rows, seed)
    rare = 0.1 / trees.n_features  # about 10% of rows for each of the infinite ones
    scaled = rng.random(x.shape) < 0.2
    x[scaled] *= rng.choice([1e-3, 1e3], size=scaled.sum())
    for value, rate in (
        (1e30, 0.01),
        (-1e30, 0.01),
        (1e-42, 0.01),  # a float32 subnormal
        (1e-300, 0.01),  # 0 as float32
        (-0.0, 0.01),
        (3.4028235e38 * (1 + 1e-9), 0.003),  # rounds to FLT_MAX, not to infinity
        (1e300, rare),  # infinite as float32
        (np.inf, rare),
        (-np.inf, rare),
    ):
        x[rng.random(x.shape) < rate] = value
    return x


def xgboost_contributions(booster: xgb.Booster, x: np.ndarray) -> np.ndarray:
    return booster.predict(xgb.DMatrix(x), pred_contribs=True, approx_contribs=True, validate_features=False)


def test_scores_and_contributions_are_xgboosts_bits(booster):
    predictor = RowPredictor(booster)
    assert predictor.path == "compiled", predictor.fallback_reason
    x = hard_rows(predictor.compiled, ROWS, seed=7)
    with np.errstate(over="ignore"):
        as_float32 = x.astype(np.float32)
    finite = ~np.isinf(as_float32).any(axis=1)
    assert 0.6 < finite.mean() < 0.9  # rows with infinite values are there, and most rows are not
    inner = predictor.compiled.tables.left != -1
    on_a_condition = np.isin(as_float32, predictor.compiled.tables.value[inner]).any(axis=1)
    assert on_a_condition.mean() > 0.5 or not inner.any()  # most rows have a value exactly on a split

    assert np.array_equal(predictor.scores(x), booster.inplace_predict(x))  # infinite values included
    scores, contributions = predictor.scores_and_contributions(x[finite])
    assert np.array_equal(scores, booster.inplace_predict(x[finite]))
    assert np.array_equal(contributions, xgboost_contributions(booster, x[finite]))
    assert contributions.dtype == np.float32 and contributions.shape == (
        finite.sum(),
        booster.num_features() + 1,
    )
    # one row at a time, as the service calls it (XGBoost's own one-row path differs from its block path)
    for i in np.flatnonzero(finite)[:200]:
        one = x[i : i + 1]
        scores, contributions = predictor.scores_and_contributions(one)
        assert np.array_equal(scores, booster.inplace_predict(one))
        assert np.array_equal(contributions, xgboost_contributions(booster, one))


def test_infinite_values_are_refused_for_contributions_as_xgboost_refuses_them(booster):
    predictor = RowPredictor(booster)
    row = np.zeros((1, booster.num_features()))
    for value in (np.inf, -np.inf, 1e300):
        row[0, -1] = value
        with pytest.raises(XGBoostError, match="Input data contains `inf`"):
            xgboost_contributions(booster, row)
        with pytest.raises(XGBoostError, match="Input data contains `inf`"):
            predictor.scores_and_contributions(row)
        with pytest.raises(XGBoostError, match="Input data contains `inf`"):
            predictor.contributions(row)
        assert np.array_equal(predictor.scores(row), booster.inplace_predict(row))


def test_float32_and_strided_input():
    booster = BOOSTERS["depth 6"]()
    predictor = RowPredictor(booster, compiled=True)
    x = hard_rows(predictor.compiled, 400, seed=3)
    x = np.where(np.abs(x) > 1e38, np.nan, x)  # no value infinite as float32
    view = np.asfortranarray(x.astype(np.float32))[::3]
    assert np.array_equal(predictor.scores(view), booster.inplace_predict(view))
    assert np.array_equal(predictor.contributions(view), xgboost_contributions(booster, view))


def test_a_one_ulp_error_would_be_caught():
    """The exactness checks can fail: the walk with its base margin one float32 step off differs."""
    booster = BOOSTERS["depth 6"]()
    trees = CompiledTrees(booster)
    x = trees.probe_rows(500)
    assert np.array_equal(trees(x)[0], booster.inplace_predict(x))
    off = trees.tables.base_margin
    trees.tables = dataclasses.replace(trees.tables, base_margin=np.nextafter(off, np.float32(np.inf)))
    scores, contributions, _ = trees(x)
    assert not np.array_equal(scores, booster.inplace_predict(x))
    assert not np.array_equal(contributions, xgboost_contributions(booster, x))


def categorical_booster() -> xgb.Booster:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {"kind": pd.Categorical(rng.choice(list("abcd"), 1000)), "amount": rng.normal(size=1000)}
    )
    y = (frame["kind"].isin(["a", "c"]) ^ (frame["amount"] > 1)).astype(float)
    params = {"objective": "binary:logistic", "max_cat_to_onehot": 1, "nthread": 1}
    return xgb.train(params, xgb.DMatrix(frame, y, enable_categorical=True), 5)


UNSUPPORTED = {
    "dart": (lambda: trained({"booster": "dart", "max_depth": 3}, rounds=5), "booster dart"),
    "multi-class": (
        lambda: xgb.train(
            {"objective": "multi:softprob", "num_class": 3, "nthread": 1},
            xgb.DMatrix(*training_data(5, 500, 0)[:1], label=np.arange(500) % 3),
            5,
        ),
        "objective multi:softprob",
    ),
    "squared error": (
        lambda: trained({"objective": "reg:squarederror"}, rounds=5),
        "objective reg:squarederror",
    ),
    "logit raw": (lambda: trained({"objective": "binary:logitraw"}, rounds=5), "objective binary:logitraw"),
    "categorical splits": (categorical_booster, "categorical splits"),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_models_keep_xgboosts_path(name):
    make, reason = UNSUPPORTED[name]
    booster = make()
    with pytest.raises(UnsupportedModel, match=reason):
        CompiledTrees(booster)
    predictor = RowPredictor(booster)
    assert (predictor.path, predictor.fallback_reason) == ("c-api", reason)
    with pytest.raises(UnsupportedModel, match=reason):
        RowPredictor(booster, compiled=True)


def test_exact_contributions_keep_xgboosts_path():
    booster = BOOSTERS["depth 6"]()
    predictor = RowPredictor(booster, approx_contributions=False)
    assert (predictor.path, predictor.fallback_reason) == ("c-api", "exact (TreeSHAP) contributions")
    x = training_data(N_FEATURES, 5, 9)[0]
    assert np.array_equal(predictor.contributions(x), booster.predict(xgb.DMatrix(x), pred_contribs=True))


def test_the_walk_only_on_the_xgboost_it_follows():
    assert walk_supported(xgb.__version__) == xgb.__version__.startswith("3.2.")
    assert not walk_supported("3.3.0") and not walk_supported("4.0.1")
