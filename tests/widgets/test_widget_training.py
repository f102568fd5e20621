"""The train widget: cancel keeps a model, errors become notifications, retrain uses the corrections, save/load."""

from __future__ import annotations

import numpy as np
import pytest
from widget_helpers import TINY, click, dock, notifications
from qtpy.QtCore import Qt


@pytest.fixture
def ready(sample_viewer, qtbot):
    """Sample viewer, preprocessed by the widget (binned by 2), positives layer adopted; the train widget."""
    pre = dock(sample_viewer, "1 Preprocess and label")
    pre.downsample.value = 2
    click(qtbot, pre.run_button, pre)
    click(qtbot, pre.label_button)
    pre.expected.value = 60
    train = dock(sample_viewer, "2 Train")
    train.extra_config = dict(TINY)
    train.threads.value = 1
    return sample_viewer, train


def test_cancel_midway_keeps_the_model(ready, qtbot):
    viewer, train = ready
    loop = train.loop
    train.epochs.value, train.steps.value, train.holdout.value = 50, 20, 0.0
    qtbot.mouseClick(train.train_button.native, Qt.MouseButton.LeftButton)
    job = train.job
    assert train.cancel_button.enabled and not train.train_button.enabled
    qtbot.waitUntil(lambda: sum(e.kind == "step" for e in loop.history) >= 3, timeout=60_000)
    qtbot.mouseClick(train.cancel_button.native, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: job.done, timeout=60_000)
    assert job.error is None
    assert loop.history[-1].kind == "stopped"
    steps = loop.history[-1].step
    assert 3 <= steps < 50 * 20
    ck = loop.checkpoint
    assert ck is not None and ck.config["epochs"] == 50
    # the kept model is the one trained so far, and it picks
    picks = loop.predict(planes=[0])
    assert "score" in picks and len(loop.picks_layer.data) > 0
    assert train.train_button.enabled and not train.cancel_button.enabled
    assert "conv3" in train.model_info.text()


def test_worker_error_becomes_a_notification(ready, qtbot):
    viewer, train = ready
    viewer.layers.remove("positives")  # no labels at all
    job = click(qtbot, train.train_button, train)
    assert job.error is not None and "no positive labels" in str(job.error)
    errors = notifications("error")
    assert errors and "no positive labels" in str(errors[-1].message)
    assert "failed" in train.status.text()
    assert train.loop.checkpoint is None
    assert train.train_button.enabled  # the widget is usable again


def test_retrain_uses_corrections_from_the_current_model(ready, qtbot, monkeypatch):
    viewer, train = ready
    loop = train.loop
    train.epochs.value, train.steps.value, train.holdout.value = 1, 3, 0.0
    click(qtbot, train.train_button, train)
    first = loop.checkpoint
    loop.predict(planes=[0, 1])
    picks = loop.picks_layer
    picks.selected_data = {0, 1, 2}
    picks.remove_selected()
    picks.add([1, 300.0, 300.0])

    import napari_pupick.training as training

    seen = {}
    original = training.Trainer.__init__

    def spy(self, images, names, positives, config=None, negatives=None, holdout=(), init=None, preprocess=None):
        seen.update(positives=positives, negatives=negatives, init=init)
        original(self, images, names, positives, config, negatives=negatives, holdout=holdout, init=init,
                 preprocess=preprocess)

    monkeypatch.setattr(training.Trainer, "__init__", spy)
    job = click(qtbot, train.retrain_button, train)
    assert job.error is None, job.error
    assert seen["init"] is first
    assert len(seen["negatives"]) == 3
    assert len(seen["positives"]) == len(loop.positives_layer.data)
    # positives and negatives were handed over on the binned grid (factor 2)
    assert seen["positives"]["x"].max() < 256
    assert loop.checkpoint is not first


def test_save_and_load_model(ready, qtbot, tmp_path):
    viewer, train = ready
    loop = train.loop
    train.epochs.value, train.steps.value, train.holdout.value = 1, 2, 0.0
    click(qtbot, train.train_button, train)
    path = train.save(tmp_path / "model.pt")
    assert path.is_file()
    before = loop.checkpoint
    loop.checkpoint = None
    ck = train.load(tmp_path / "model.pt")
    assert ck is loop.checkpoint and ck.model == before.model
    assert all(np.array_equal(ck.state_dict[k].numpy(), before.state_dict[k].numpy()) for k in ck.state_dict)
    # a model with other preprocessing re-normalizes the micrographs as it was trained
    ck.preprocess = {**ck.preprocess, "downsample": 4}
    ck.save(tmp_path / "model4.pt")
    train.load(tmp_path / "model4.pt")
    qtbot.waitUntil(lambda: train.job.done, timeout=60_000)
    assert loop.normalized_layer.data.shape == (4, 128, 128)
    assert tuple(loop.normalized_layer.scale) == (1.0, 4.0, 4.0)
    assert not train.load(tmp_path / "missing.pt")
    assert "no such checkpoint" in str(notifications("error")[-1].message)
