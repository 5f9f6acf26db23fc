"""fraud_poc.model.train: metrics against brute-force definitions, threshold choice, distributed training on a real LocalCluster."""

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

from fraud_poc.core.schema import FEATURE_COLUMNS, LABEL
from fraud_poc.model.train import (
    average_precision,
    choose_threshold,
    classification_metrics,
    evaluate,
    importance_gain,
    precision_recall_curve,
    predict_scores,
    roc_auc,
    train_booster,
)


def brute_force_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Probability that a random fraud scores above a random legitimate order, ties counting half."""
    pos, neg = s[y], s[~y]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def brute_force_ap(y: np.ndarray, s: np.ndarray) -> float:
    """Mean over frauds of the precision when flagging every order scoring at least as high."""
    return float(np.mean([(y & (s >= t)).sum() / (s >= t).sum() for t in s[y]]))


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(300) < 0.2
    scores = np.round(rng.random(300) * 0.6 + 0.3 * y, 1)  # coarse scores: many ties, also across classes
    assert roc_auc(y, scores) == pytest.approx(brute_force_auc(y, scores), abs=1e-12)
    assert average_precision(y, scores) == pytest.approx(brute_force_ap(y, scores), abs=1e-12)
    precision, recall, thresholds = precision_recall_curve(y, scores)
    assert np.all(np.diff(thresholds) < 0) and recall[-1] == 1.0
    f1 = [classification_metrics(y, scores, t)["f1"] for t in np.unique(scores)]
    best = choose_threshold(y, scores)
    assert classification_metrics(y, scores, best)["f1"] == pytest.approx(max(f1), abs=1e-12)


def test_hand_computed_values():
    y, s = np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.2, 0.9])
    assert roc_auc(y, s) == 0.875
    assert average_precision(y, s) == pytest.approx(5 / 6)
    assert roc_auc(np.array([1, 0]), np.array([0.9, 0.1])) == 1.0
    assert choose_threshold(np.array([1, 1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.6, 0.1]), "f0.5") == 0.8


def test_errors():
    with pytest.raises(ValueError, match="both fraud and legitimate"):
        average_precision(np.array([1, 1]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="one length"):
        roc_auc(np.array([1, 0, 1]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="unknown threshold metric 'precision'"):
        choose_threshold(np.array([1, 0]), np.array([0.9, 0.1]), "precision")


def test_evaluate_per_scenario():
    y = np.array([1, 1, 1, 0, 0, 1])
    s = np.array([0.9, 0.2, 0.8, 0.7, 0.1, 0.6])
    scenario = np.array(["account_takeover", "account_takeover", "card_testing", "", "", "amount_anomaly"])
    metrics = evaluate(y, s, scenario, threshold=0.6)
    assert metrics["recall_by_scenario"] == {
        "account_takeover": {"count": 2, "detected": 1, "recall": 0.5},
        "amount_anomaly": {"count": 1, "detected": 1, "recall": 1.0},
        "card_testing": {"count": 1, "detected": 1, "recall": 1.0},
    }
    assert (metrics["true_positives"], metrics["false_positives"], metrics["false_negatives"]) == (3, 1, 1)
    assert metrics["precision"] == 0.75 and metrics["recall"] == 0.75 and metrics["f1"] == 0.75


def synthetic(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, len(FEATURE_COLUMNS))), columns=FEATURE_COLUMNS)
    logit = 2.5 * frame["order_amount"] + 2 * frame["n_orders_24h_by_ip_addr"] - 5
    frame[LABEL] = rng.random(n) < 1 / (1 + np.exp(-logit))
    return frame


def test_distributed_training_is_reproducible_and_learns(client):
    train = dd.from_pandas(synthetic(6000, 1), npartitions=5)
    holdout_frame = synthetic(2000, 2)
    holdout = dd.from_pandas(holdout_frame, npartitions=3)
    params = {"max_depth": 3, "learning_rate": 0.2, "subsample": 0.8, "colsample_bytree": 0.8, "seed": 11}
    first = train_booster(client, train, holdout, params, num_boost_round=300, early_stopping_rounds=15)
    again = train_booster(client, train, holdout, params, num_boost_round=300, early_stopping_rounds=15)
    scores = predict_scores(client, first.booster, holdout)
    np.testing.assert_array_equal(scores, predict_scores(client, again.booster, holdout))
    assert first.best_iteration == again.best_iteration < 299
    assert first.booster.num_boosted_rounds() == first.best_iteration + 1
    assert first.booster.feature_names == FEATURE_COLUMNS
    y = holdout_frame[LABEL].to_numpy()
    assert roc_auc(y, scores) > 0.9 and average_precision(y, scores) > 0.5
    assert first.best_score == pytest.approx(max(first.history["tuning"]["aucpr"]))
    assert set(list(importance_gain(first.booster))[:2]) == {"order_amount", "n_orders_24h_by_ip_addr"}
    other_seed = train_booster(client, train, holdout, {**params, "seed": 12}, 300, 15)
    assert not np.array_equal(scores, predict_scores(client, other_seed.booster, holdout))
