"""Helpers shared by the dock-widget tests (a module of its own: ``conftest`` is ambiguous across test folders)."""

from __future__ import annotations

import numpy as np

#: A tiny network and short steps so that training takes about a second on one CPU thread.
TINY = {"model_params": {"width": 0.25}, "batch_size": 4, "tile": 65}

WIDGETS = {
    "1 Preprocess and label": "PreprocessWidget",
    "2 Train": "TrainWidget",
    "3 Predict and inspect": "PredictWidget",
    "4 Export": "ExportWidget",
}


def dock(viewer, name: str):
    """Dock a widget through the manifest; returns the widget."""
    _, widget = viewer.window.add_plugin_dock_widget("napari-pupick", name)
    return widget


def click(qtbot, button, job_owner=None, timeout: int = 60_000):
    """Press a magicgui PushButton like a user; with ``job_owner``, wait for the job it starts to finish."""
    from qtpy.QtCore import Qt

    before = None if job_owner is None else job_owner.job
    qtbot.mouseClick(button.native, Qt.MouseButton.LeftButton)
    if job_owner is not None:
        qtbot.waitUntil(lambda: job_owner.job is not before and job_owner.job.done, timeout=timeout)
        return job_owner.job
    return None


def notifications(severity: str = "error") -> list:
    from napari.utils.notifications import notification_manager

    return [n for n in notification_manager.records if str(n.severity).lower().endswith(severity)]


def plane_points(layer, plane: int) -> np.ndarray:
    data = np.asarray(layer.data)
    return data[np.rint(data[:, 0]).astype(int) == plane]
