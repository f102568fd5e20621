"""Tests of matching, precision-recall, average precision and thresholds, with values worked out by hand."""

import math

import numpy as np
import pandas as pd
import pytest

from napari_pupick.errors import CoordinateError
from napari_pupick.metrics import (
    PRCurve,
    average_precision,
    evaluate,
    fbeta_threshold,
    match_picks,
    precision_at_recall,
    precision_recall,
)
from napari_pupick.synthetic import make_synthetic


@pytest.fixture
def hand():
    """Five true particles; five picks whose ranked hits are T F T F T (the table is not in ranked order)."""
    truth = pd.DataFrame({"x": [0.0, 100.0, 200.0, 300.0, 400.0], "y": [0.0] * 5})
    # Ranked by score: 0.9 hits particle 0, 0.8 is far from everything, 0.7 hits particle 1, 0.6 is far,
    # 0.5 hits particle 2. Particles 3 and 4 are never found.
    picks = pd.DataFrame({
        "x": [101.0, 50.0, 1.0, 203.0, 150.0],
        "y": [1.0, 50.0, 0.0, 0.0, 50.0],
        "score": [0.7, 0.6, 0.9, 0.5, 0.8],
    })
    return picks, truth


def test_match_flags_in_input_order(hand):
    picks, truth = hand
    assert match_picks(picks, truth, 5.0).tolist() == [True, False, True, True, False]


def test_precision_recall_and_ap_by_hand(hand):
    picks, truth = hand
    curve = precision_recall(picks, truth, 5.0)
    # Ranked hits T F T F T, n_true = 5:
    #   k:          1    2    3    4    5
    #   Pr(k):      1/1  1/2  2/3  2/4  3/5
    #   Re(k):      1/5  1/5  2/5  2/5  3/5
    np.testing.assert_allclose(curve.precision, [1, 1 / 2, 2 / 3, 2 / 4, 3 / 5])
    np.testing.assert_allclose(curve.recall, [1 / 5, 1 / 5, 2 / 5, 2 / 5, 3 / 5])
    np.testing.assert_allclose(curve.thresholds, [0.9, 0.8, 0.7, 0.6, 0.5])
    assert curve.n_true == 5
    # AP = 1 * (1/5) + (2/3) * (1/5) + (3/5) * (1/5) = (15 + 10 + 9) / 75 = 34 / 75
    assert average_precision(picks, truth, 5.0) == pytest.approx(34 / 75)


def test_precision_at_recall_by_hand(hand):
    curve = precision_recall(*hand, 5.0)
    # Recall >= 0.6 only at k = 5 (precision 3/5); >= 0.4 at k = 3, 4, 5: best 2/3; 0.9 is never reached.
    assert precision_at_recall(curve, 0.6) == pytest.approx(3 / 5)
    assert precision_at_recall(curve, 0.4) == pytest.approx(2 / 3)
    assert precision_at_recall(curve, 0.9) == 0.0
    assert precision_at_recall(curve, 0.0) == 1.0


def test_fbeta_threshold_by_hand(hand):
    curve = precision_recall(*hand, 5.0)
    # F2 = 5 P R / (4 P + R):
    #   k=1: 5 * 1 * 0.2 / (4 + 0.2)          = 1 / 4.2   = 0.2381
    #   k=2: 5 * 0.5 * 0.2 / (2 + 0.2)        = 0.5 / 2.2 = 0.2273
    #   k=3: 5 * (2/3) * 0.4 / (8/3 + 0.4)    = (4/3) / (46/15) = 20/46 = 0.4348
    #   k=4: 5 * 0.5 * 0.4 / (2 + 0.4)        = 1 / 2.4   = 0.4167
    #   k=5: 5 * 0.6 * 0.6 / (2.4 + 0.6)      = 1.8 / 3   = 0.6   <- best, threshold = 5th score 0.5
    threshold, f2 = fbeta_threshold(curve, beta=2.0)
    assert threshold == 0.5 and f2 == pytest.approx(0.6)
    # F1 = 2 P R / (P + R): k=1: 0.4/1.2 = 0.333; k=3: (16/15)/(16/15) = 0.5; k=5: 0.72/1.2 = 0.6 <- best.
    assert fbeta_threshold(curve, beta=1.0) == (0.5, pytest.approx(0.6))
    # F0.1 ~ precision: k=1 (P = 1, R = 0.2): 1.01 * 0.2 / (0.01 + 0.2) = 0.9619 beats k=5 (0.6).
    threshold, f = fbeta_threshold(curve, beta=0.1)
    assert threshold == 0.9 and f == pytest.approx(1.01 * 0.2 / 0.21)


def test_fbeta_threshold_respects_ties():
    # Ranked hits T T F with scores 3, 2, 2 and 2 true particles. k=2 (F2 = 1) cannot be had: score >= 2 keeps 3.
    #   k=1: P=1, R=0.5: 5 * 0.5 / (4 + 0.5) = 0.5556;  k=3: P=2/3, R=1: (10/3) / (8/3 + 1) = 10/11 = 0.9091
    curve = PRCurve(precision=np.array([1.0, 1.0, 2 / 3]), recall=np.array([0.5, 1.0, 1.0]),
                    thresholds=np.array([3.0, 2.0, 2.0]), n_true=2)
    threshold, f2 = fbeta_threshold(curve, 2.0)
    assert threshold == 2.0 and f2 == pytest.approx(10 / 11)
    empty = PRCurve(np.zeros(0), np.zeros(0), np.zeros(0), 3)
    assert fbeta_threshold(empty) == (math.inf, 0.0)


def test_one_truth_near_two_picks():
    truth = pd.DataFrame({"x": [0.0], "y": [0.0]})
    # The better-scored pick takes the particle even though the other one is nearer.
    picks = pd.DataFrame({"x": [1.0, 3.0], "y": [0.0, 0.0], "score": [0.5, 0.9]})
    assert match_picks(picks, truth, 5.0).tolist() == [False, True]
    # Without scores, table order ranks.
    assert match_picks(picks[["x", "y"]], truth, 5.0).tolist() == [True, False]


def test_nearest_unmatched_truth():
    truth = pd.DataFrame({"x": [2.0, 1.0], "y": [0.0, 0.0]})
    picks = pd.DataFrame({"x": [0.0, 0.0], "y": [0.0, 1.0], "score": [2.0, 1.0]})
    # Pick 0 takes the nearest particle (1, 0); pick 1 then takes (2, 0), sqrt(5) = 2.24 away (<= 3).
    assert match_picks(picks, truth, 3.0).tolist() == [True, True]
    # With radius 2, the second pick's only unmatched particle is too far.
    assert match_picks(picks, truth, 2.0).tolist() == [True, False]


def test_match_radius_inclusive_and_micrographs():
    truth = pd.DataFrame({"micrograph": ["a", "b"], "x": [0.0, 0.0], "y": [0.0, 0.0]})
    picks = pd.DataFrame({"micrograph": ["b", "c", "a"], "x": [3.0, 0.0, 0.0], "y": [4.0, 0.0, 0.0],
                          "score": [1.0, 3.0, 2.0]})
    # "b" at distance exactly 5 matches (inclusive); "c" has no truth rows: a false positive; "a" matches.
    assert match_picks(picks, truth, 5.0).tolist() == [True, False, True]
    assert match_picks(picks, truth, 4.999).tolist() == [False, False, True]
    # Without the micrograph column on one side, micrographs are ignored: the best pick (0, 0) takes the first of
    # the two particles at distance 0, the next one (0, 0) the second, and none is left for the pick at (3, 4).
    assert match_picks(picks.drop(columns="micrograph"), truth, 5.0).tolist() == [False, True, True]
    with pytest.raises(CoordinateError, match="lacks"):
        match_picks(picks.drop(columns="x"), truth, 5.0)


def test_evaluate_hand(hand):
    picks, truth = hand
    result = evaluate(picks, truth, 5.0)
    assert result["ap"] == pytest.approx(34 / 75)
    assert result["precision_at_90"] == 0.0
    assert result["recall_max"] == pytest.approx(0.6)
    assert result["threshold"] == 0.5 and result["fbeta"] == pytest.approx(0.6)
    assert (result["n_picks"], result["n_true"], result["n_matched"], result["beta"]) == (5, 5, 3, 2.0)


def test_evaluate_empty_cases():
    truth = pd.DataFrame({"x": [1.0], "y": [1.0]})
    none = pd.DataFrame({"x": [], "y": [], "score": []})
    result = evaluate(none, truth, 3.0)
    assert result["ap"] == 0.0 and result["n_picks"] == 0 and result["recall_max"] == 0.0
    no_truth = evaluate(pd.DataFrame({"x": [1.0], "y": [1.0], "score": [1.0]}), truth.iloc[:0], 3.0)
    assert math.isnan(no_truth["ap"]) and no_truth["n_true"] == 0


def test_synthetic_truth_against_itself_is_perfect():
    synth = make_synthetic(n_micrographs=3, shape=(256, 256), n_particles=25, radius=8, seed=7)
    truth = synth.particles[["micrograph", "x", "y"]]
    picks = truth.assign(score=np.random.default_rng(0).normal(size=len(truth)))
    result = evaluate(picks, truth, radius=synth.radius / 2)
    assert result["ap"] == pytest.approx(1.0)
    assert result["precision_at_90"] == 1.0 and result["recall_max"] == 1.0 and result["fbeta"] == 1.0
    # Shuffled micrograph names break every match; a false positive on an extra micrograph lowers precision.
    extra = pd.concat([picks, pd.DataFrame({"micrograph": ["other"], "x": [5.0], "y": [5.0], "score": [99.0]})])
    assert evaluate(extra, truth, synth.radius / 2)["ap"] < 1.0
