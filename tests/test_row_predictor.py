"""RowPredictor gives XGBoost's own results, bit for bit, by the compiled walk, through the C API and through the
Python API fallback."""

import ctypes

import numpy as np
import pytest
import xgboost as xgb
from xgboost.core import XGBoostError

from fraud_poc.model.row_predictor import RowPredictor, _check, _library, c_api_supported


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 12))
    y = (x[:, 0] + x[:, 1] * x[:, 2] + rng.normal(size=2000) > 1).astype(float)
    booster = xgb.train({"max_depth": 6, "objective": "binary:logistic", "nthread": 1}, xgb.DMatrix(x, y), 60)
    booster.set_param({"nthread": 1})
    return booster, x


PATHS = {  # path: RowPredictor's arguments
    "compiled": {"use_c_api": True, "compiled": True},
    "c-api": {"use_c_api": True, "compiled": False},
    "python-api": {"use_c_api": False, "compiled": False},
}
BACKENDS = [pytest.param(PATHS[name], id=name) for name in PATHS]


@pytest.mark.parametrize("use_c_api", BACKENDS)
def test_scores_and_contributions_equal_xgboost(model, use_c_api):
    booster, x = model
    predictor = RowPredictor(booster, **use_c_api)
    assert predictor.uses_c_api is use_c_api["use_c_api"]
    assert predictor.path == (
        "compiled" if use_c_api["compiled"] else "c-api" if use_c_api["use_c_api"] else "python-api"
    )
    for rows in (x[:1], x[10:17], x[20:40:2, :].astype(np.float32)):
        np.testing.assert_array_equal(predictor.scores(rows), booster.inplace_predict(rows))
        expected = booster.predict(xgb.DMatrix(rows), pred_contribs=True, approx_contribs=True)
        np.testing.assert_array_equal(predictor.contributions(rows), expected)
        margins = booster.predict(xgb.DMatrix(rows), output_margin=True)
        np.testing.assert_allclose(predictor.contributions(rows).sum(axis=1), margins, rtol=1e-5, atol=1e-5)
        both = predictor.scores_and_contributions(rows)
        np.testing.assert_array_equal(both[0], booster.inplace_predict(rows))
        np.testing.assert_array_equal(both[1], expected)
    exact_predictor = RowPredictor(booster, approx_contributions=False, use_c_api=use_c_api["use_c_api"])
    exact = exact_predictor.contributions(x[:3])
    np.testing.assert_array_equal(exact, booster.predict(xgb.DMatrix(x[:3]), pred_contribs=True))
    assert not np.array_equal(exact, predictor.contributions(x[:3]))


@pytest.mark.parametrize("use_c_api", BACKENDS)
def test_reused_proxy_and_missing_values(model, use_c_api):
    booster, x = model
    predictor = RowPredictor(booster, **use_c_api)
    first = x[:5].copy()
    predictor.scores(first)
    del first
    np.testing.assert_array_equal(predictor.scores(x[5:6]), booster.inplace_predict(x[5:6]))
    gaps = x[:4].copy()
    gaps[0, 0] = gaps[2, 5] = np.nan
    np.testing.assert_array_equal(predictor.scores(gaps), booster.inplace_predict(gaps))
    np.testing.assert_array_equal(
        predictor.contributions(gaps),
        booster.predict(xgb.DMatrix(gaps), pred_contribs=True, approx_contribs=True),
    )


@pytest.mark.parametrize("use_c_api", BACKENDS)
def test_wrong_width_is_refused(model, use_c_api):
    booster, x = model
    predictor = RowPredictor(booster, **use_c_api)
    with pytest.raises(ValueError, match="expected rows of 12 features"):
        predictor.scores(x[:2, :5])
    with pytest.raises(ValueError, match=r"got an array of shape \(12,\)"):
        predictor.contributions(np.zeros(12))
    with pytest.raises(ValueError, match="expected rows of 12 features"):
        predictor.scores_and_contributions(x[:2, :11])


def test_xgboost_errors_carry_their_message():
    with pytest.raises(XGBoostError, match="Booster has not been initialized"):
        _check(_library().XGBoosterPredictFromDMatrix(None, None, b"{}", None, None, None))


def test_declared_argument_types_refuse_a_wrong_call():
    with pytest.raises(ctypes.ArgumentError, match="wrong type"):  # declared argtypes: a str is not a char*
        _library().XGDMatrixCreateFromDense("{}", b"{}", None)


def test_c_api_only_on_the_checked_version():
    assert c_api_supported(xgb.__version__) == xgb.__version__.startswith("3.2.")
    assert c_api_supported("3.2.7")
    assert not c_api_supported("3.3.0")
    assert not c_api_supported("2.1.4")
