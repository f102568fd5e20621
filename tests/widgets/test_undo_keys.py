"""Undo and redo of corrections, and the loop's keyboard shortcuts, pressed on the canvas and in the panel."""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import Qt
from widget_helpers import dock

from napari_pupick.loop.keys import SHORTCUTS, THRESHOLD_STEP

CTRL = Qt.KeyboardModifier.ControlModifier
SHIFT = Qt.KeyboardModifier.ShiftModifier


def _canvas(viewer):
    return viewer.window._qt_viewer.canvas.native


def _press(qtbot, widget, key, modifiers=Qt.KeyboardModifier.NoModifier):
    qtbot.keyClick(widget, key, modifiers)


def _shown_on_plane(loop, plane=0):
    data = np.asarray(loop.picks_layer.data)
    return np.flatnonzero(loop.picks_layer.shown & (np.rint(data[:, 0]).astype(int) == plane))


@pytest.fixture
def panel_viewer(picked, qtbot):
    viewer, loop = picked
    panel = dock(viewer, "Picking panel")
    window = viewer.window._qt_window
    window.resize(1600, 1000)
    window.show()
    qtbot.waitExposed(window)
    window.activateWindow()
    qtbot.waitUntil(window.isActiveWindow, timeout=5000)
    return viewer, loop, panel


def test_undo_restores_a_deleted_pick_and_redo_deletes_it_again(panel_viewer, qtbot):
    viewer, loop, panel = panel_viewer
    layer = loop.picks_layer
    i = int(_shown_on_plane(loop)[0])
    point, score = np.asarray(layer.data)[i].copy(), float(layer.features["score"][i])
    n_picks = len(layer.data)
    _, negatives = loop.labels()
    n_neg = len(negatives)
    viewer.layers.selection.active = layer
    layer.selected_data = {i}
    layer.remove_selected()  # the Delete key: the pick becomes a rejected pick
    assert len(layer.data) == n_picks - 1 and len(loop.labels()[1]) == n_neg + 1
    assert panel.micrographs.undo_button.isEnabled()

    # Ctrl+Z on the canvas: the pick is back with its score, the rejection is gone
    _press(qtbot, _canvas(viewer), Qt.Key.Key_Z, CTRL)
    data = np.asarray(layer.data)
    back = np.flatnonzero(np.abs(data - point).max(axis=1) < 1e-9)
    assert len(layer.data) == n_picks and len(back) == 1
    assert float(layer.features["score"][back[0]]) == score and bool(layer.shown[back[0]])
    assert len(loop.labels()[1]) == n_neg
    # Ctrl+Shift+Z with the keyboard focus in the panel: deleted and rejected again
    panel.micrographs.table.setFocus()
    _press(qtbot, panel.micrographs.table, Qt.Key.Key_Z, CTRL | SHIFT)
    assert len(layer.data) == n_picks - 1 and len(loop.labels()[1]) == n_neg + 1
    # and undo from the panel's focus too
    _press(qtbot, panel.micrographs.table, Qt.Key.Key_Z, CTRL)
    assert len(layer.data) == n_picks and len(loop.labels()[1]) == n_neg
    assert not loop.undo()  # nothing left to undo (the panel's Undo button says so)
    assert not panel.micrographs.undo_button.isEnabled()


def test_undo_added_and_moved_labels(panel_viewer):
    _, loop, _ = panel_viewer
    positives = loop.positives_layer
    before = np.asarray(positives.data).copy()
    positives.add([0, 200.0, 210.0])  # a click in add mode
    assert len(loop.labels()[0]) == len(before) + 1
    loop.undo()
    np.testing.assert_array_equal(np.asarray(positives.data), before)
    loop.redo()
    assert len(positives.data) == len(before) + 1
    # a moved label (select mode drag: napari reports "changing" before moving the points in place)
    from napari.layers.base._base_constants import ActionType

    positives.events.data(value=positives.data, action=ActionType.CHANGING, data_indices=(0,),
                          vertex_indices=((),))
    original = np.asarray(positives.data)[0].copy()
    positives.data[0, 1:] += 15.0  # napari drags the points in place
    positives.events.data(value=positives.data, action=ActionType.CHANGED, data_indices=(0,),
                          vertex_indices=((),))
    loop.undo()
    np.testing.assert_allclose(np.asarray(positives.data)[0], original)
    loop.redo()
    np.testing.assert_allclose(np.asarray(positives.data)[0], original + [0, 15.0, 15.0])
    # a point added to the picks layer becomes a label; one undo takes it back
    n_pos = len(positives.data)
    loop.picks_layer.add([0, 100.0, 300.0])
    assert len(positives.data) == n_pos + 1
    loop.undo()
    assert len(positives.data) == n_pos


def test_each_shortcut_does_what_the_guide_says(panel_viewer, qtbot):
    viewer, loop, panel = panel_viewer
    canvas = _canvas(viewer)
    keys = {name: key for key, name, _ in SHORTCUTS}
    assert keys == {"undo": "Ctrl+Z", "redo": "Ctrl+Shift+Z", "next_micrograph": "N",
                    "previous_micrograph": "Shift+N", "accept_key": "Y", "reject_key": "X",
                    "threshold_up": "=", "threshold_down": "-"}
    # listed in the panel
    for key, _, _ in SHORTCUTS:
        assert f"<b>{key}</b>" in panel.keys.text()
    # N / Shift+N: next and previous micrograph
    assert loop.current_plane() == 0
    _press(qtbot, canvas, Qt.Key.Key_N)
    assert loop.current_plane() == 1
    _press(qtbot, panel.micrographs.table, Qt.Key.Key_N, SHIFT)
    assert loop.current_plane() == 0
    # = and -: threshold up and down by one step
    t = loop.threshold
    _press(qtbot, canvas, Qt.Key.Key_Equal)
    assert loop.threshold == pytest.approx(t + THRESHOLD_STEP)
    _press(qtbot, canvas, Qt.Key.Key_Minus)
    _press(qtbot, canvas, Qt.Key.Key_Minus)
    assert loop.threshold == pytest.approx(t - THRESHOLD_STEP)
    assert panel.predict.threshold_box.value == pytest.approx(round(t - THRESHOLD_STEP, 2))
    # Y: the pick under the mouse becomes a labelled particle
    layer = loop.picks_layer
    viewer.layers.selection.active = layer
    i = int(_shown_on_plane(loop)[0])
    point = np.asarray(layer.data)[i].copy()
    n_pos, n_picks = len(loop.labels()[0]), len(layer.data)
    viewer.cursor.position = tuple(point + [0, 2.0, -2.0])
    _press(qtbot, canvas, Qt.Key.Key_Y)
    positives, _ = loop.labels()
    assert len(positives) == n_pos + 1 and len(layer.data) == n_picks - 1
    assert np.allclose(positives[["y", "x"]].to_numpy()[-1], point[1:])
    # X: the selected picks become rejected picks
    j = [int(k) for k in _shown_on_plane(loop)[:2]]
    layer.selected_data = set(j)
    n_neg = len(loop.labels()[1])
    _press(qtbot, canvas, Qt.Key.Key_X)
    assert len(loop.labels()[1]) == n_neg + 2 and len(layer.data) == n_picks - 3
    # each is one undo step
    loop.undo()
    assert len(loop.labels()[1]) == n_neg and len(layer.data) == n_picks - 1
    loop.undo()
    assert len(loop.labels()[0]) == n_pos and len(layer.data) == n_picks
    # un-reject: Y on the negatives layer takes a rejection back as a particle
    layer.selected_data = {int(_shown_on_plane(loop)[0])}
    _press(qtbot, canvas, Qt.Key.Key_X)
    negatives = loop.negatives_layer
    viewer.layers.selection.active = negatives
    negatives.selected_data = {len(negatives.data) - 1}
    _press(qtbot, canvas, Qt.Key.Key_Y)
    assert len(loop.labels()[1]) == n_neg and len(loop.labels()[0]) == n_pos + 1
