"""Fixtures for the dock-widget tests: a real napari viewer (pytest-qt, Xvfb) with the plugin's sample data."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
from widget_helpers import TINY, WIDGETS, dock


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def sample_layers():
    """The plugin's sample data as LayerData (made once: 4 synthetic 512 x 512 micrographs)."""
    from napari_pupick._sample_data import make_sample_data

    return make_sample_data()


@pytest.fixture
def sample_viewer(make_napari_viewer, pupick_plugin, sample_layers):
    """A viewer holding the sample data (synthetic micrographs, sparse positives, hidden ground truth), as
    File > Open Sample gives it."""
    viewer = make_napari_viewer()
    for data, kwargs, kind in sample_layers:
        getattr(viewer, f"add_{kind}")(data.copy(), **copy.deepcopy(kwargs))
    return viewer


@pytest.fixture
def docked(sample_viewer):
    """The four widgets docked on the sample viewer (dict by class name)."""
    return {cls: dock(sample_viewer, name) for name, cls in WIDGETS.items()}


@pytest.fixture(scope="session")
def tiny_checkpoint(sample_layers):
    """A tiny model trained once on the sample data (binned by 2, GMM), shared by the inspection tests."""
    from napari_pupick.pipeline import training_run

    (stack, meta, _), (labels, pmeta, _), _ = sample_layers
    names = meta["metadata"]["micrograph_names"]
    table = pd.DataFrame({"micrograph": [names[int(p)] for p in labels[:, 0]], "x": labels[:, 2],
                          "y": labels[:, 1]})
    trainer = training_run(list(stack), names, table, radius=12.0, downsample=2, expected_particles=60,
                           epochs=1, steps_per_epoch=6, threads=1, **TINY)
    for _ in trainer.run():
        pass
    return trainer.best


@pytest.fixture
def picked(sample_viewer, tiny_checkpoint):
    """The sample viewer after a scripted loop: preprocessed (binned by 2), a tiny model, every plane scored."""
    from napari_pupick.loop import PickLoop

    loop = PickLoop.for_viewer(sample_viewer)
    loop.set_micrographs("synthetic micrographs")
    loop.preprocess(downsample=2)
    loop.add_positives_layer(radius=12, expected_particles=60)
    loop.set_model(copy.deepcopy(tiny_checkpoint))
    loop.predict()
    assert len(loop.picks_layer.data) > 0
    return sample_viewer, loop
