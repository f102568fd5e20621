"""Corrections: deleted picks become negative labels, points added to the picks layer become positives."""

from __future__ import annotations

import numpy as np

from napari_pupick.loop.layers import _NEGATIVE_STYLE, _POSITIVE_STYLE, NEGATIVES, POSITIVES

__all__ = ["CorrectionsMixin"]


class CorrectionsMixin:
    """The corrections of a :class:`~napari_pupick.loop.PickLoop`."""

    def _on_picks_data(self, event) -> None:
        if self._quiet:
            return
        action = str(getattr(event, "action", ""))
        if action.endswith("removing"):
            idx = [int(i) for i in event.data_indices if int(i) >= 0]
            if idx:
                self.reject(np.asarray(self.picks_layer.data)[idx])
        elif action.endswith("removed"):
            self._emit("picks")
        elif action.endswith("added"):
            self._pending_add = len([i for i in event.data_indices if int(i) < 0]) or len(event.data_indices)

    def _on_picks_features(self, event=None) -> None:
        # Runs after napari has finished adding a point (features are resized and the selection is set), so the
        # new rows can move to the positives layer safely.
        if self._quiet or not self._pending_add:
            return
        k, self._pending_add = self._pending_add, 0
        layer = self.picks_layer
        n = len(layer.data)
        rows = np.asarray(layer.data)[n - k:]
        with self._programmatic():
            layer.selected_data = set()
            layer.data = np.asarray(layer.data)[: n - k]
            layer.features = layer.features.iloc[: n - k].reset_index(drop=True)
        self._apply_threshold()
        self.accept(rows)
        self._emit("picks")

    def reject(self, points) -> None:
        """Record points (picks layer data coordinates) as negative labels."""
        points = np.asarray(points, float).reshape(-1, 3 if self.stacked else 2)
        if not len(points):
            return
        if not self._alive(self.negatives_layer):
            self.negatives_layer = self._find_points(NEGATIVES) or self._new_points(NEGATIVES, _NEGATIVE_STYLE)
            self.negatives_layer.current_size = self.radius  # a smaller mark than the pick circles
            if self._alive(self.picks_layer):
                self.viewer.layers.selection.active = self.picks_layer
        with self._programmatic():
            self.negatives_layer.add(points)
            self.negatives_layer.selected_data = set()
        self._emit("labels")

    def accept(self, points) -> None:
        """Record points (picks layer data coordinates) as positive labels."""
        points = np.asarray(points, float).reshape(-1, 3 if self.stacked else 2)
        if not len(points):
            return
        active = self.viewer.layers.selection.active
        if not self._alive(self.positives_layer):
            self.positives_layer = self._find_points(POSITIVES) or self._new_points(POSITIVES, _POSITIVE_STYLE)
        self.positives_layer.add(points)
        self.positives_layer.selected_data = set()
        if active is not None and active in self.viewer.layers:
            self.viewer.layers.selection.active = active
        self._emit("labels")
