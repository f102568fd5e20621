"""Defaults derived from the data: the binning rule, the edge margin, the count estimate and the threshold."""

import math

import numpy as np
import pandas as pd
import pytest

from napari_pupick.calibration import (
    BINNED_RADIUS_RANGE,
    TARGET_BINNED_RADIUS,
    binning_warning,
    calibrate,
    choose_downsample,
    default_margin,
    initial_expected,
    label_scores,
    max_particles,
    parse_downsample,
    threshold_for_count,
)


@pytest.mark.parametrize("radius", [3.0, 8.0, 12.0, 17.0, 20.0, 29.0, 30.0, 45.0, 60.0, 120.0, 250.0])
def test_auto_binning_puts_the_radius_in_range(radius):
    b = choose_downsample(radius)
    assert b.auto and b.factor >= 1
    assert b.binned_radius == pytest.approx(radius / b.factor)
    lo, hi = BINNED_RADIUS_RANGE
    if radius >= lo:  # a particle smaller than the range cannot be helped by binning
        assert lo <= b.binned_radius <= hi, b
        assert b.warning is None
    else:
        assert b.factor == 1 and b.warning and "too small" in b.warning
    # no other factor comes closer to the target radius (on a log scale)
    others = [abs(math.log(radius / (f * TARGET_BINNED_RADIUS))) for f in range(1, 17)]
    assert abs(math.log(b.binned_radius / TARGET_BINNED_RADIUS)) <= min(others) + 1e-9


def test_given_factor_is_kept_and_warned_when_out_of_range():
    r = 30.0
    b = choose_downsample(r, factor=1)
    assert b.factor == 1 and not b.auto
    assert b.warning and "too large" in b.warning and "binning 1" in b.warning
    good = choose_downsample(r).factor
    assert choose_downsample(r, factor=good).warning is None
    tiny = choose_downsample(r, factor=5)
    assert tiny.warning and "too small" in tiny.warning
    assert binning_warning(good, r) is None


def test_pixel_size_is_reported_in_angstrom():
    b = choose_downsample(30.0, pixel_size=1.06)
    text = b.describe()
    assert f"binning {b.factor} (auto)" in text and "32 A" in text
    assert b.binned_pixel_size == pytest.approx(1.06 * b.factor)
    assert choose_downsample(30.0, pixel_size=0.0).pixel_size is None  # 0 in a header means unknown


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("AUTO", "auto"), ("4", 4), (2, 2), (3.0, 3)])
def test_parse_downsample(value, expected):
    assert parse_downsample(value) == expected


@pytest.mark.parametrize("value", ["0", "-2", "2.5", "four", float("nan"), None])
def test_parse_downsample_refuses(value):
    with pytest.raises(ValueError, match="binning"):
        parse_downsample(value)


@pytest.mark.parametrize("radius", [0, -5, float("nan"), float("inf")])
def test_bad_radius_is_refused(radius):
    with pytest.raises(ValueError, match="radius"):
        choose_downsample(radius)


def test_margin_and_first_guess():
    assert default_margin(30.0) == 30.0
    # a quarter of a 1000 x 1000 micrograph covered by discs of radius 10
    assert initial_expected(10.0, (1000, 1000)) == pytest.approx(0.25 * 1e6 / (math.pi * 100))
    assert max_particles(10.0, (1000, 1000)) > initial_expected(10.0, (1000, 1000))


def _mixture(rng, n_mics=5, particles=150, junk=1200, labels=60, separation=1.0, size=1000.0):
    """Candidates shaped like a trained model's (see docs/method.md): the background's logits decay from the NMS
    floor (-6 + gamma), the particles' sit higher with a tail toward the background; one candidate per particle.
    Labels are a random subset of the particles: 40 trained, the rest held out."""
    rows, truth = [], []
    for m in range(n_mics):
        name = f"m{m}"
        for x, y in rng.uniform(0, size, (particles, 2)):
            truth.append((name, x, y))
            score = separation + 1.2 * rng.standard_normal() - rng.exponential(0.7)
            rows.append((name, x + rng.normal(0, 0.5), y + rng.normal(0, 0.5), max(score, -5.99)))
        for x, y in rng.uniform(0, size, (junk, 2)):
            rows.append((name, x, y, -6.0 + rng.gamma(1.3, 1.4)))
    cands = pd.DataFrame(rows, columns=["micrograph", "x", "y", "score"])
    truth = pd.DataFrame(truth, columns=["micrograph", "x", "y"])
    lab = truth.iloc[rng.choice(len(truth), labels, replace=False)].reset_index(drop=True)
    return cands, truth, lab.iloc[:40].reset_index(drop=True), lab.iloc[40:].reset_index(drop=True)


def test_count_estimate_recovers_a_known_prior():
    """150 particles per micrograph among 1,350 candidates: the estimate is within 15 % in the median of 10
    draws of the labels and within 40 % in each."""
    estimates = []
    for seed in range(10):
        cands, truth, trained, held = _mixture(np.random.default_rng(seed))
        cal = calibrate(cands, held, trained, radius=3.0, n_micrographs=5)
        estimates.append(cal.expected_particles)
        assert cal.n_heldout == len(held) == 20
        assert 0 < cal.mixture_weight < 1
    assert np.median(estimates) == pytest.approx(150, rel=0.15)
    assert min(estimates) > 150 * 0.6 and max(estimates) < 150 * 1.4


def test_count_estimate_is_capped():
    cands, truth, trained, held = _mixture(np.random.default_rng(0))
    cal = calibrate(cands, held, trained, radius=3.0, n_micrographs=5, max_expected=50.0)
    assert cal.expected_particles == 50.0


@pytest.mark.parametrize("separation", [1.0, 0.0])
def test_calibrated_threshold_is_close_to_the_f1_optimum(separation):
    """The calibrated threshold's true F1 is within 0.03 of the best F1 in the median of 10 label draws."""
    from napari_pupick.metrics import evaluate, match_picks

    gaps = []
    for seed in range(10):
        cands, truth, trained, held = _mixture(np.random.default_rng(100 + seed), separation=separation)
        cal = calibrate(cands, held, trained, radius=3.0, n_micrographs=5)
        best = evaluate(cands, truth, 3.0, beta=1.0)["fbeta"]
        kept = cands[cands["score"] >= cal.threshold]
        tp = match_picks(kept, truth, 3.0).sum()
        p, r = tp / len(kept), tp / len(truth)
        gaps.append(best - 2 * p * r / (p + r))
        assert cal.picks_per_micrograph == pytest.approx(len(kept) / 5)
    assert np.median(gaps) < 0.03 and max(gaps) < 0.25


def test_label_scores_takes_the_best_candidate_nearby_on_the_same_micrograph():
    cands = pd.DataFrame({"micrograph": ["a", "a", "b"], "x": [10.0, 12.0, 10.0], "y": [10.0, 10.0, 10.0],
                          "score": [1.0, 2.0, 5.0]})
    labels = pd.DataFrame({"micrograph": ["a", "a", "c"], "x": [11.0, 50.0, 10.0], "y": [10.0, 50.0, 10.0]})
    s = label_scores(cands, labels, radius=2.0)
    assert s[0] == 2.0 and s[1] == -np.inf and s[2] == -np.inf


def test_no_heldout_label_found_keeps_every_candidate():
    cands = pd.DataFrame({"micrograph": ["a"] * 3, "x": [0.0, 50.0, 100.0], "y": [0.0] * 3, "score": [3., 2., 1.]})
    held = pd.DataFrame({"micrograph": ["a"], "x": [500.0], "y": [500.0]})
    cal = calibrate(cands, held, None, radius=3.0, n_micrographs=1)
    assert cal.threshold == 1.0 and cal.label_recall == 0.0
    with pytest.raises(ValueError, match="held-out"):
        calibrate(cands, held.iloc[:0], None, radius=3.0, n_micrographs=1)


def test_threshold_for_count():
    scores = [5.0, 4.0, 3.0, 2.0, 1.0]
    t = threshold_for_count(scores, 3)
    assert sum(s >= t for s in scores) == 3 and 2.0 < t < 3.0
    assert sum(s >= threshold_for_count(scores, 0) for s in scores) == 0
    assert threshold_for_count(scores, 10) == 1.0


def test_label_margin_shrinks_to_the_label_nearest_the_border():
    from napari_pupick.calibration import label_margin

    shapes = {"a": (100, 200), "b": (100, 200)}
    inside = pd.DataFrame({"micrograph": ["a", "b"], "x": [50.0, 100.0], "y": [50.0, 40.0]})
    assert label_margin(inside, shapes, 12.0) == 12.0
    near = pd.concat([inside, pd.DataFrame({"micrograph": ["b"], "x": [194.0], "y": [50.0]})])
    assert label_margin(near, shapes, 12.0) == pytest.approx(5.0)  # 199 - 194
    edge = pd.concat([inside, pd.DataFrame({"micrograph": ["a"], "x": [-0.4], "y": [3.0]})])
    assert label_margin(edge, shapes, 12.0) == 0.0
    assert label_margin(inside, {}, 12.0) == 12.0  # labels of unknown micrographs are ignored
