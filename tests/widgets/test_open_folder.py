"""Opening a folder of micrographs: napari's own open (no plugin named) and the panel's Open micrographs button."""

from __future__ import annotations

import pytest
from widget_helpers import dock


@pytest.fixture
def folder_preference(monkeypatch):
    """napari's reader preferences, restored after the test (they live in the user's settings)."""
    from napari.settings import get_settings

    plugins = get_settings().plugins
    monkeypatch.setattr(plugins, "extension2reader", dict(plugins.extension2reader))
    return plugins


def test_open_folder_without_naming_the_plugin(make_napari_viewer, pupick_plugin, synthetic_dir, folder_preference):
    from napari_pupick._reader import open_folders_with_pupick, opens_folders

    viewer = make_napari_viewer()
    pre = dock(viewer, "1 Preprocess and label")
    assert not opens_folders() and not pre.folders.value
    pre.folders.value = True  # the panel's checkbox stores napari's preference for folders
    assert opens_folders()
    # what File > Open Folder runs once the folder is chosen (no plugin named; a reader dialog would block here)
    viewer.window._qt_viewer._qt_open([str(synthetic_dir["folder"])], stack=False)
    images = [la for la in viewer.layers if type(la).__name__ == "Image"]
    assert len(viewer.layers) == 1 and len(images) == 1
    assert images[0].data.shape == (3, 128, 160)
    assert images[0].metadata["micrograph_names"] == ["synth_0", "synth_1", "synth_2"]
    # and from a script, with no plugin named
    layers = viewer.open(str(synthetic_dir["folder"]), plugin=None)
    assert len(layers) == 1 and layers[0].data.shape == (3, 128, 160)
    open_folders_with_pupick(False)
    assert not opens_folders()


def test_open_micrographs_button(sample_viewer, synthetic_dir):
    panel = dock(sample_viewer, "Picking panel")
    layer = panel.preprocess.open_micrographs(synthetic_dir["folder"])
    assert layer is not None and layer.data.shape == (3, 128, 160)
    assert panel.loop.micrograph_layer is layer and panel.loop.names == ["synth_0", "synth_1", "synth_2"]
    assert tuple(sample_viewer.dims.axis_labels) == ("micrograph", "y", "x")  # the slider says what it moves
    assert panel.micrographs.table.rowCount() == 3 or panel.micrographs.refresh() is None
    assert str(synthetic_dir["folder"]) in panel.preprocess.status.text().replace("\u200b", "")  # the whole path
