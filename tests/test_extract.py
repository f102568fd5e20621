"""Tests of extraction: exact greedy NMS (against a naive reference), margins, local-contrast filter, scaling."""

import numpy as np
import pandas as pd
import pytest

from napari_pupick.errors import MicrographError
from napari_pupick.extract import extract_picks, local_std, local_std_filter, nms, scale_picks


def naive_nms(score_map, radius, threshold=-6.0, margin=0.0):
    """The definition, pixel by pixel: best available pixel first (ties: row, then column), suppress <= radius."""
    m = np.asarray(score_map)
    h, w = m.shape
    rows, cols = np.divmod(np.arange(m.size), w)
    order = np.lexsort((cols, rows, -m.ravel().astype(np.float64)))
    suppressed = np.zeros(m.shape, bool)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for i in order:
        r, c = rows[i], cols[i]
        if not m[r, c] > threshold:
            break
        if c < margin or c > w - 1 - margin or r < margin or r > h - 1 - margin or suppressed[r, c]:
            continue
        out.append((float(c), float(r), float(m[r, c])))
        suppressed |= (yy - r) ** 2 + (xx - c) ** 2 <= radius**2
    return out


def as_tuples(df):
    return list(zip(df["x"].tolist(), df["y"].tolist(), df["score"].tolist()))


def test_nms_equals_naive_on_random_maps_with_ties():
    rng = np.random.default_rng(0)
    radii = [0.0, 0.5, 1.0, 1.5, 2.0, 2.9, 3.0, 4.2, 6.0, 9.5]
    for trial in range(160):
        h, w = (int(v) for v in rng.integers(4, 45, 2))
        kind = trial % 4
        if kind == 0:  # many ties: a handful of integer levels
            m = rng.integers(-3, 4, (h, w)).astype(np.float32)
        elif kind == 1:  # plateaus: blocky map
            m = np.kron(rng.integers(0, 3, (h // 3 + 1, w // 3 + 1)), np.ones((3, 3)))[:h, :w].astype(np.float32)
        elif kind == 2:  # continuous float64 values (general, rank-based path)
            m = rng.normal(size=(h, w))
        else:  # float64 holding float32 values with ties
            m = np.round(rng.normal(size=(h, w)), 1).astype(np.float32).astype(np.float64)
        radius = float(rng.choice(radii))
        margin = float(rng.choice([0.0, 0.0, 1.0, 2.5]))
        threshold = float(rng.choice([-6.0, -0.5, 0.5, 1.0]))
        expected = naive_nms(m, radius, threshold, margin)
        got = nms(m, radius, threshold=threshold, margin=margin)
        assert as_tuples(got) == expected, (trial, (h, w), radius, margin, threshold)


def test_nms_equals_naive_on_smooth_peaky_map():
    from scipy import ndimage

    rng = np.random.default_rng(1)
    m = (ndimage.gaussian_filter(rng.normal(size=(90, 110)), 2.0) * 20).astype(np.float32)
    for radius in (3.0, 5.5, 8.0):
        assert as_tuples(nms(m, radius, threshold=-1.0)) == naive_nms(m, radius, -1.0)


def test_nms_picks_a_pixel_that_is_not_a_local_maximum():
    # Along one row: A = 10 at x=2, B = 9 at x=5, C = 8 at x=8, radius 4. C is not the maximum of its disc (B is 3
    # away), yet greedy NMS picks it: A suppresses B (distance 3), and C (distance 6 from A) survives.
    m = np.full((5, 12), -10.0, np.float32)
    m[2, 2], m[2, 5], m[2, 8] = 10.0, 9.0, 8.0
    got = nms(m, 4.0)
    assert as_tuples(got) == [(2.0, 2.0, 10.0), (8.0, 2.0, 8.0)]


def test_nms_radius_is_inclusive_and_threshold_strict():
    m = np.full((20, 30), -10.0, np.float32)
    m[10, 10] = 5.0
    m[10, 15] = 4.0  # 5 pixels away
    m[3, 3] = -6.0  # equal to the threshold: not picked
    assert as_tuples(nms(m, 5.0)) == [(10.0, 10.0, 5.0)]
    assert as_tuples(nms(m, 4.99)) == [(10.0, 10.0, 5.0), (15.0, 10.0, 4.0)]
    assert as_tuples(nms(m, 4.99, threshold=4.0)) == [(10.0, 10.0, 5.0)]
    assert len(nms(m, 1.0, threshold=-6.0001)) == 3


def test_nms_margin_pixels_neither_picked_nor_suppress():
    m = np.full((20, 20), -10.0, np.float32)
    m[10, 2] = 9.0  # 2 pixels from the left border
    m[10, 5] = 3.0  # 3 pixels from it
    assert as_tuples(nms(m, 4.0)) == [(2.0, 10.0, 9.0)]
    assert as_tuples(nms(m, 4.0, margin=3.0)) == [(5.0, 10.0, 3.0)]
    assert len(nms(m, 4.0, margin=5.5)) == 0
    # Right and bottom borders: x > W - 1 - margin is out.
    m2 = np.full((20, 20), -10.0, np.float32)
    m2[16, 16] = 1.0
    assert len(nms(m2, 2.0, margin=3.0)) == 1
    assert len(nms(m2, 2.0, margin=3.5)) == 0
    # A margin larger than half the map leaves nothing.
    assert len(nms(m2, 2.0, margin=15.0)) == 0


def test_nms_ties_go_by_row_then_column():
    m = np.zeros((6, 6), np.float32)
    got = nms(m, 2.0)
    # (0, 0) first; (3, 0) is the first pixel more than 2 away; then (5, 1) (sqrt(5) from (3, 0)).
    assert as_tuples(got)[:3] == [(0.0, 0.0, 0.0), (3.0, 0.0, 0.0), (5.0, 1.0, 0.0)]
    assert as_tuples(got) == naive_nms(m, 2.0)
    # -0.0 and +0.0 are the same score.
    m[0, 0] = -0.0
    m[0, 1] = 0.0
    assert as_tuples(nms(m, 1.0))[0][:2] == (0.0, 0.0)


def test_nms_output_format_and_max_picks():
    rng = np.random.default_rng(2)
    m = rng.normal(size=(64, 64)).astype(np.float32)
    full = nms(m, 3.0)
    assert list(full.columns) == ["x", "y", "score"]
    assert all(full[c].dtype == np.float64 for c in full.columns)
    assert list(full.index) == list(range(len(full)))
    assert np.all(np.diff(full["score"].to_numpy()) <= 0)
    top = nms(m, 3.0, max_picks=10)
    pd.testing.assert_frame_equal(top, full.iloc[:10])
    # Picks are more than the radius apart.
    xy = full[["x", "y"]].to_numpy()
    d2 = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    assert d2.min() > 9.0


def test_nms_edge_cases():
    assert len(nms(np.full((10, 10), -7.0), 2.0)) == 0
    assert as_tuples(nms(np.array([[1.0]]), 3.0)) == [(0.0, 0.0, 1.0)]
    m = np.zeros((4, 4))
    m[1, 1] = -np.inf
    assert len(nms(m, 0.0)) == 15
    with pytest.raises(MicrographError, match="NaN"):
        nms(np.array([[np.nan, 1.0]]), 1.0)
    with pytest.raises(MicrographError, match="2-D"):
        nms(np.zeros(5), 1.0)
    with pytest.raises(ValueError):
        nms(np.zeros((3, 3)), -1.0)


def test_local_std():
    rng = np.random.default_rng(3)
    image = np.zeros((50, 50), np.float32)
    image[:, 25:] = rng.normal(0, 2.0, (50, 25))
    sd = local_std(image, [10, 40, 0], [10, 25, 0], radius=6)
    assert sd[0] == 0.0
    assert sd[1] == pytest.approx(2.0, rel=0.15)
    # Against a direct computation over the inclusive disc, clipped at the border.
    yy, xx = np.mgrid[0:50, 0:50]
    for x, y, s in zip([40, 0, 26], [25, 0, 49], local_std(image, [40, 0, 26], [25, 0, 49], 6)):
        disc = (xx - x) ** 2 + (yy - y) ** 2 <= 36
        assert s == pytest.approx(float(image[disc].astype(np.float64).std()), rel=1e-5)


def test_local_std_filter_drops_high_contrast_picks():
    rng = np.random.default_rng(4)
    image = rng.normal(0, 1.0, (200, 200)).astype(np.float32)
    image[150:190, 150:190] += np.where((np.add.outer(np.arange(40), np.arange(40)) // 4) % 2, 8.0, -8.0)
    xs = [20, 50, 80, 110, 20, 50, 80, 110, 20, 50, 170]
    ys = [20, 20, 20, 20, 60, 60, 60, 60, 100, 100, 170]
    picks = pd.DataFrame({"x": np.array(xs, float), "y": np.array(ys, float), "score": np.arange(11.0)[::-1]})
    kept = local_std_filter(image, picks, radius=8)
    assert len(kept) == 10 and 170.0 not in kept["x"].tolist()
    assert list(kept["score"]) == list(np.arange(11.0)[::-1][:10])
    # Limits off: nothing dropped; a very low limit drops the low-contrast ones instead.
    assert len(local_std_filter(image, picks, radius=8, max_z=None)) == 11
    assert len(local_std_filter(image, picks, radius=8, min_z=100.0, max_z=None)) == 0
    assert len(local_std_filter(image, picks.iloc[:0], radius=8)) == 0


def test_scale_picks_copies():
    picks = pd.DataFrame({"x": [1.0, 2.5], "y": [3.0, 4.0], "score": [0.1, 0.2]})
    out = scale_picks(picks, 4)
    assert out["x"].tolist() == [4.0, 10.0] and out["y"].tolist() == [12.0, 16.0]
    assert picks["x"].tolist() == [1.0, 2.5]


def test_extract_picks():
    m = np.full((40, 50), -10.0, np.float32)
    m[10, 12], m[30, 40], m[11, 13], m[1, 1] = 3.0, 2.0, 1.0, 5.0
    picks = extract_picks(m, 4.0, margin=2.0, factor=3, micrograph="mic_01")
    assert list(picks.columns) == ["micrograph", "x", "y", "score"]
    assert picks["micrograph"].tolist() == ["mic_01", "mic_01"]
    assert picks[["x", "y"]].to_numpy().tolist() == [[36.0, 30.0], [120.0, 90.0]]
    assert picks["score"].tolist() == [3.0, 2.0]
    assert len(extract_picks(m, 4.0, margin=2.0, max_picks=1)) == 1
    with pytest.raises(ValueError, match="image"):
        extract_picks(m, 4.0, std_filter=3.0)
    with pytest.raises(MicrographError, match="does not match"):
        extract_picks(m, 4.0, std_filter=3.0, image=np.zeros((10, 10)))


def test_extract_picks_with_std_filter():
    rng = np.random.default_rng(5)
    image = rng.normal(0, 1.0, (100, 100)).astype(np.float32)
    image[70:90, 70:90] *= 10.0
    m = np.full((100, 100), -10.0, np.float32)
    centres = [(15, 15), (15, 45), (45, 15), (45, 45), (15, 80), (80, 15), (80, 80)]
    for i, (y, x) in enumerate(centres):
        m[y, x] = 1.0 + i
    picks = extract_picks(m, 6.0, image=image, std_filter=3.0, factor=2, micrograph="m")
    assert len(picks) == 6
    assert (160.0, 160.0) not in list(zip(picks["x"], picks["y"]))
    both = extract_picks(m, 6.0, image=image, std_filter=(None, 3.0))
    assert len(both) == 6


def test_nms_rank_path_equals_bits_path(monkeypatch):
    # Maps over 2**21 pixels (and float64 maps) order scores through ranks instead of float32 bits: same result.
    import napari_pupick.extract as extract

    rng = np.random.default_rng(6)
    m = np.round(rng.normal(size=(200, 190)), 2).astype(np.float32)
    expected = nms(m, 6.5, threshold=-1.0, margin=2.0)
    monkeypatch.setattr(extract, "_BITS_PATH_MAX_PIXELS", 0)
    pd.testing.assert_frame_equal(nms(m, 6.5, threshold=-1.0, margin=2.0), expected)
    assert as_tuples(expected) == naive_nms(m, 6.5, -1.0, 2.0)
