"""Every widget docks through the manifest and they share one session."""

from __future__ import annotations

from widget_helpers import WIDGETS, dock

from napari_pupick.loop import PickLoop


def test_manifest_docks_every_widget(make_napari_viewer, pupick_plugin):
    sample_viewer = make_napari_viewer()
    sample_viewer.open_sample("napari-pupick", "synthetic")
    widgets = {cls: dock(sample_viewer, name) for name, cls in WIDGETS.items()}
    assert [type(w).__name__ for w in widgets.values()] == list(WIDGETS.values())
    loop = PickLoop.for_viewer(sample_viewer)
    assert all(w.loop is loop for w in widgets.values())
    assert len(sample_viewer.window.dock_widgets) >= 4
    # the preprocess widget offers the sample's micrograph stack and took it as the session's micrographs
    pre = widgets["PreprocessWidget"]
    assert pre.layer.value is sample_viewer.layers["synthetic micrographs"]
    assert loop.micrograph_layer is sample_viewer.layers["synthetic micrographs"]
    assert loop.names == ["synth_0", "synth_1", "synth_2", "synth_3"]
    # the particle radius comes from the sample's metadata
    assert pre.radius.value == 12.0


def test_layer_choices_follow_the_viewer(sample_viewer):
    import numpy as np

    pre = dock(sample_viewer, "1 Preprocess and label")
    sample_viewer.add_image(np.zeros((2, 64, 64), np.float32), name="other stack")
    assert sample_viewer.layers["other stack"] in pre.layer.choices
    sample_viewer.layers.remove("other stack")
    assert sample_viewer.layers["synthetic micrographs"] in pre.layer.choices
    assert len(pre.layer.choices) == 1
