"""Inspecting and correcting picks: the threshold slider, deleted picks as negatives, added points as positives,
re-extraction from cached scores, and exports."""

from __future__ import annotations

import numpy as np
import pandas as pd
import starfile
from widget_helpers import click, dock, plane_points


def test_threshold_slider_changes_shown_picks(picked, qtbot):
    viewer, loop = picked
    predict = dock(viewer, "3 Predict and inspect")
    layer = loop.picks_layer
    scores = layer.features["score"].to_numpy()
    n_scored = len(loop.scores)
    lo, hi = np.quantile(scores, [0.25, 0.75])
    predict.threshold.value = float(lo)
    shown_lo = layer.shown.copy()
    assert shown_lo.sum() == (scores >= predict.threshold.value).sum()
    predict.threshold.value = float(hi)
    shown_hi = layer.shown.copy()
    assert shown_hi.sum() == (scores >= predict.threshold.value).sum()
    assert 0 < shown_hi.sum() < shown_lo.sum() < len(scores)
    assert not (shown_hi & ~shown_lo).any()  # raising the threshold only hides picks
    # no scoring happened: the picks and cached maps are the same objects' contents
    assert len(layer.data) == len(scores) and len(loop.scores) == n_scored
    # the histogram's threshold line follows the slider
    assert np.isclose(predict.plot._line.get_xdata()[0], predict.threshold.value)
    assert f"{int(shown_hi.sum())} of {len(scores)}" in predict.counts.text()
    # the exported table follows the threshold too
    assert len(loop.picks_table()) == int(shown_hi.sum())


def test_model_threshold_is_offered(picked):
    viewer, loop = picked
    loop.checkpoint.metrics["threshold"] = 1.25
    loop.set_model(loop.checkpoint)
    predict = dock(viewer, "3 Predict and inspect")
    assert predict.suggest_button.enabled and "1.25" in predict.suggest_button.text
    assert loop.threshold == 1.25  # offered as the default
    predict.set_threshold(-1.0)
    predict.use_suggested()
    assert loop.threshold == 1.25 and np.isclose(predict.threshold.value, 1.25)


def test_deleted_pick_becomes_negative(picked):
    viewer, loop = picked
    layer = loop.picks_layer
    loop.set_threshold(float(np.quantile(layer.features["score"], 0.5)))
    shown = np.flatnonzero(layer.shown)
    victims = shown[:2]
    coords = np.asarray(layer.data)[victims].copy()
    n = len(layer.data)
    viewer.layers.selection.active = layer
    layer.selected_data = set(victims.tolist())
    layer.remove_selected()  # what the Delete key does
    assert len(layer.data) == n - 2
    assert len(layer.features) == n - 2
    neg = viewer.layers["negatives"]
    assert neg is loop.negatives_layer
    assert np.allclose(np.asarray(neg.data), coords)
    _, negatives = loop.labels()
    assert len(negatives) == 2
    assert list(negatives["micrograph"]) == [loop.names[int(p)] for p in coords[:, 0]]
    assert np.allclose(negatives[["y", "x"]].to_numpy(), coords[:, 1:])
    # the remaining picks keep their own scores (features stayed aligned with the points)
    assert (layer.features["score"].to_numpy() >= -6).all()


def test_added_pick_becomes_positive(picked):
    viewer, loop = picked
    layer = loop.picks_layer
    n_picks, n_pos = len(layer.data), len(loop.positives_layer.data)
    layer.add([1, 100.0, 200.0])  # what a click in add mode does
    assert len(layer.data) == n_picks
    assert len(loop.positives_layer.data) == n_pos + 1
    assert np.allclose(loop.positives_layer.data[-1], [1, 100.0, 200.0])
    positives, _ = loop.labels()
    assert ((positives["micrograph"] == loop.names[1]) & np.isclose(positives["x"], 200.0)).any()


def test_rejected_picks_stay_rejected_after_rescoring(picked):
    viewer, loop = picked
    layer = loop.picks_layer
    on0 = plane_points(layer, 0)
    target = on0[0].copy()
    idx = int(np.flatnonzero((np.asarray(layer.data) == target).all(axis=1))[0])
    layer.selected_data = {idx}
    layer.remove_selected()
    loop.predict(planes=[0])
    again = plane_points(layer, 0)
    d = np.sqrt(((again[:, 1:] - target[1:]) ** 2).sum(axis=1))
    assert d.min() > 0.5 * loop.radius


def test_nms_radius_and_margin_reextract_without_scoring(picked, qtbot):
    viewer, loop = picked
    predict = dock(viewer, "3 Predict and inspect")
    maps = {k: v.copy() for k, v in loop.scores.items()}
    n0 = len(loop.picks_layer.data)
    predict.margin.value = 60.0
    qtbot.waitUntil(lambda: predict.job is not None and predict.job.done, timeout=30000)  # a worker re-extracts
    assert predict.job.error is None and predict.job.description == "Re-extract picks"
    data = np.asarray(loop.picks_layer.data)
    assert len(data) < n0
    assert data[:, 1:].min() >= 60.0 - 2 and data[:, 1:].max() <= 511 - 60.0 + 2
    job = predict.job
    predict.nms_radius.value = 30.0
    qtbot.waitUntil(lambda: predict.job is not job and predict.job.done, timeout=30000)
    assert len(loop.picks_layer.data) < len(data)
    assert all(np.array_equal(maps[k], loop.scores[k]) for k in maps)


def test_export_star_per_micrograph_and_csv(picked, tmp_path, qtbot):
    viewer, loop = picked
    export = dock(viewer, "4 Export")
    loop.set_threshold(float(np.quantile(loop.all_scores(), 0.8)))
    expected = loop.picks_table()
    assert "picks with score >=" in export.summary.text()
    # one STAR file per micrograph into a folder (RELION's coordinate import)
    export.per_micrograph.value = True
    export.suffix.value = "_autopick"
    export.path.value = str(tmp_path / "relion")
    click(qtbot, export.export_button)
    files = sorted((tmp_path / "relion").glob("*_autopick.star"))
    assert [f.name for f in files] == [f"{n}_autopick.star" for n in sorted(expected["micrograph"].unique())]
    total = sum(len(starfile.read(f)) for f in files)
    assert total == len(expected)
    # CSV through the plugin's writer, original pixels
    export.per_micrograph.value = False
    export.format.value = "csv"
    assert str(export.path.value).endswith(".csv")
    export.path.value = str(tmp_path / "picks.csv")
    click(qtbot, export.export_button)
    table = pd.read_csv(tmp_path / "picks.csv")
    assert list(table.columns) == ["micrograph", "x", "y", "score"]
    assert len(table) == len(expected)
    assert np.allclose(np.sort(table["x"]), np.sort(expected["x"]))
