"""Issue 9's defaults in the viewer: automatic binning shown before preprocessing, the model's calibrated threshold
on the slider, a threshold set by hand kept over retraining, exports at the slider's threshold."""

from __future__ import annotations

import numpy as np
import starfile
from widget_helpers import TINY, click, dock


def test_particle_first_and_binning_shown(sample_viewer):
    pre = dock(sample_viewer, "1 Preprocess and label")
    body = pre.body
    order = [body.itemAt(i).widget() for i in range(body.count())]
    assert order.index(pre.particles.native) < order.index(pre.form.native)  # the radius is asked first
    assert pre.downsample.value == "auto"
    pre.loop.micrograph_layer.metadata["pixel_size"] = 0.0  # unknown
    pre.radius.value = 24
    assert "binning 2 (auto)" in pre.binning_info.text() and "12 binned px" in pre.binning_info.text()
    assert "pixel size unknown" in pre.particle_info.text()
    pre.loop.micrograph_layer.metadata["pixel_size"] = 1.5
    pre.radius.value = 60
    assert "binning 5 (auto)" in pre.binning_info.text() and "7.5 \u00c5 per binned pixel" in pre.binning_info.text()
    assert "= 90 \u00c5" in pre.particle_info.text()
    pre.downsample.value = 1
    assert "too large" in pre.binning_info.text()


def test_auto_binning_preprocess(sample_viewer, qtbot):
    pre = dock(sample_viewer, "1 Preprocess and label")
    pre.radius.value = 24  # auto: binning 2 (12 binned px)
    job = click(qtbot, pre.run_button, pre)
    assert job.error is None
    assert pre.loop.factor == 2 and pre.loop.normalized_layer.data.shape == (4, 256, 256)


def test_threshold_from_model_kept_by_hand_and_exported(picked, qtbot, tmp_path):
    viewer, loop = picked
    model_t = loop.checkpoint.metrics["threshold"]
    predict = dock(viewer, "3 Predict and inspect")
    export = dock(viewer, "4 Export")
    # the slider starts at the model's calibrated threshold
    assert loop.threshold == model_t and np.isclose(predict.threshold.value, model_t, atol=0.01)
    assert f"{model_t:.2f}" in predict.suggest_button.text
    # the margin is the model's
    assert predict.margin.value == loop.checkpoint.metrics["margin"]
    # moved by hand: kept when a retrained model (one round, calibration carried over) arrives
    scores = loop.all_scores()
    by_hand = float(np.quantile(scores, 0.7))
    predict.threshold.value = by_hand
    assert loop.threshold_by_hand
    before = loop.checkpoint
    loop.retrain(epochs=1, steps_per_epoch=2, **TINY)
    assert loop.checkpoint is not before
    assert not any(e.kind == "calibrated" for e in loop.history)  # no survey round on retraining
    assert "threshold" in loop.checkpoint.metrics
    assert np.isclose(loop.threshold, by_hand, atol=0.01) and np.isclose(predict.threshold.value, by_hand, atol=0.01)
    # exports write exactly the picks at or above the slider's threshold
    export.path.value = str(tmp_path / "picks.star")
    click(qtbot, export.export_button)
    table = starfile.read(tmp_path / "picks.star")
    expected = int((loop.picks_layer.features["score"].to_numpy() >= predict.threshold.value).sum())
    assert len(table) == expected > 0
    # back to the model's threshold
    predict.use_suggested()
    assert loop.threshold == loop.checkpoint.metrics["threshold"] and not loop.threshold_by_hand
