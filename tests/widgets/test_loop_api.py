"""The scripting API without Qt: PickLoop on a napari ViewerModel (what the napari console and scripts use)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from widget_helpers import TINY

from napari_pupick.errors import PupickError, TrainingError
from napari_pupick.loop import PickLoop


@pytest.fixture
def model_viewer(sample_layers):
    from napari.components import ViewerModel

    viewer = ViewerModel()
    for data, kwargs, kind in sample_layers:
        getattr(viewer, f"add_{kind}")(data.copy(), **copy.deepcopy(kwargs))
    return viewer


def test_scripted_loop_on_a_viewer_model(model_viewer, tmp_path):
    import starfile

    loop = PickLoop.for_viewer(model_viewer)
    assert PickLoop.for_viewer(model_viewer) is loop
    loop.set_micrographs("synthetic micrographs")
    norm = loop.preprocess(downsample=2, method="affine")
    assert norm.data.shape == (4, 256, 256) and np.allclose(norm.data[0].mean(), 0, atol=1e-3)
    assert loop.mixture is not None and loop.mixture[2] is None  # affine: a histogram, no components
    loop.add_positives_layer(radius=12, expected_particles=60)
    ck = loop.train(epochs=1, steps_per_epoch=3, holdout_fraction=0.25, **TINY)
    assert ck is loop.checkpoint and ck.preprocess["method"] == "affine"
    assert ck.config["particle_radius"] == 6.0 and ck.config["expected_particles"] == 60
    assert "heldout_ap" in ck.metrics  # evaluated on the held-out micrograph
    model_viewer.dims.set_current_step(0, 2)
    assert loop.current_plane() == 2
    picks = loop.predict(planes="current")
    assert set(loop.scores) == {2}
    assert set(picks["micrograph"]) <= {"synth_2"}
    loop.predict()
    loop.set_threshold(float(np.median(loop.all_scores())))
    per = loop.picks_per_micrograph()
    assert list(per.index) == loop.names and per.sum() == len(loop.picks_table())
    out = loop.export(tmp_path / "picks.star")
    assert len(starfile.read(out)) == per.sum()
    # retraining continues from the current model
    before = loop.checkpoint
    loop.retrain(epochs=1, steps_per_epoch=2, **TINY)
    assert loop.checkpoint is not before
    # a retrain cancelled before its first step keeps the current model (not untrained weights)
    current = loop.checkpoint
    events = []
    for event in loop.iter_train(init=current, epochs=1, steps_per_epoch=2, **TINY):
        events.append(event)
        if event.kind == "train" and event.data.kind in ("start", "round"):
            loop.stop()
        loop.handle(event)
    assert events[-1].kind == "untrained" and "current model is kept" in events[-1].message
    assert loop.checkpoint is current

    # scoring: the micrographs not shown reach the picks layer in batches, every one of them by the end
    loop.picks_flush_interval = 1e9
    model_viewer.dims.set_current_step(0, 0)
    before = {p: int((np.rint(loop.picks_layer.data[:, 0]) == p).sum()) for p in range(4)}
    scored = []
    for event in loop.iter_predict():
        loop.handle(event)
        if event.kind == "scored":
            scored.append(event.data["plane"])
            if event.data["plane"] == 0:  # the micrograph shown: at once
                assert loop._pending_picks == {}
            elif event.data["plane"] in (1, 2):
                assert set(loop._pending_picks) >= {event.data["plane"]}
        if event.kind == "scored" and event.data["plane"] == 2:
            break  # cancelled after three micrographs, before the closing event
    assert scored == [0, 1, 2] and set(loop._pending_picks) == {1, 2}
    loop.flush_picks()  # what the widget's job does when it ends, however it ends
    planes = np.rint(loop.picks_layer.data[:, 0]).astype(int)
    assert loop._pending_picks == {} and {0, 1, 2} <= set(planes)
    assert int((planes == 3).sum()) == before[3]  # not rescored: its earlier picks stay
    assert len(loop.picks_layer.features) == len(loop.picks_layer.data)
    # re-extraction from the cached scores (headless: the same generator the Pick tab runs in a worker)
    n = len(loop.picks_layer.data)
    loop.reextract(margin=60.0)
    yx = np.asarray(loop.picks_layer.data)[:, 1:]
    assert 0 < len(yx) < n and yx.min() >= 60.0 - 2 and yx.max() <= 511 - 60.0 + 2


def test_single_micrograph_layer(tiny_checkpoint):
    from napari.components import ViewerModel

    from napari_pupick.synthetic import make_synthetic

    syn = make_synthetic(n_micrographs=1, shape=(256, 256), n_particles=20, seed=3)
    viewer = ViewerModel()
    layer = viewer.add_image(syn.micrographs[0], name="one", metadata={"micrograph_names": ["one"]})
    loop = PickLoop(viewer, layer)
    assert not loop.stacked and loop.names == ["one"] and loop.current_plane() == 0
    loop.preprocess(downsample=2)
    pos = loop.add_positives_layer(radius=12, expected_particles=20)
    assert pos.ndim == 2
    pos.add(syn.particles[["y", "x"]].to_numpy()[:5])
    loop.set_model(copy.deepcopy(tiny_checkpoint))
    table = loop.predict()
    assert set(table["micrograph"]) <= {"one"}
    assert loop.picks_layer.data.shape[1] == 2
    assert loop.scores_layer.data.shape == (128, 128)
    positives, _ = loop.labels()
    assert len(positives) == 5 and set(positives["micrograph"]) == {"one"}


def test_clear_errors(model_viewer):
    loop = PickLoop(model_viewer)
    with pytest.raises(PupickError, match="no picks to export"):
        loop.export("x.star")
    with pytest.raises(PupickError, match="no model"):
        loop.iter_predict()
    loop.set_micrographs("synthetic micrographs")
    with pytest.raises(TrainingError, match="not preprocessed"):
        loop.train(epochs=1, steps_per_epoch=1)
    with pytest.raises(PupickError, match="no layer named"):
        loop.set_micrographs("nope")
    with pytest.raises(ValueError, match="radius"):
        loop.set_particle(radius=0)
