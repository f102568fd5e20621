"""Corrections: deleted picks become negative labels, points added to the picks layer become positives; accept and
reject by key; undo and redo of every correction (no Qt)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from napari_pupick.loop.layers import _NEGATIVE_STYLE, _POSITIVE_STYLE, NEGATIVES, PICKS, POSITIVES

__all__ = ["UNDO_LIMIT", "CorrectionsMixin"]

#: Corrections kept for undo.
UNDO_LIMIT = 100


class CorrectionsMixin:
    """The corrections of a :class:`~napari_pupick.loop.PickLoop`, with undo and redo.

    Undo works on snapshots: before a correction changes the picks, positives or negatives layer, the layers it
    touches are copied (points and, for picks, their scores); :meth:`undo` puts them back, :meth:`redo` replays.
    One user action (deleting picks, which also adds negatives) is one undo step.
    """

    # -- recording -----------------------------------------------------------------------------------------------

    def _label_layer(self, key: str):
        layer = {PICKS: self.picks_layer, POSITIVES: self.positives_layer, NEGATIVES: self.negatives_layer}[key]
        return layer if self._alive(layer) else None

    def _snapshot(self, keys) -> dict:
        ndim = 3 if self.stacked else 2
        snap = {}
        for key in keys:
            layer = self._label_layer(key)
            data = np.zeros((0, ndim)) if layer is None else np.array(layer.data, float, copy=True)
            score = None
            if key == PICKS:
                score = (layer.features["score"].to_numpy(float).copy() if layer is not None and len(data)
                         else np.zeros(0))
            snap[key] = (data.reshape(-1, ndim), score)
        return snap

    def _record(self, *keys: str) -> None:
        """Keep the current state of these layers as one undo step (merged into the action under way)."""
        if self._no_record:
            return
        if self._open_step is not None:
            missing = [k for k in keys if k not in self._open_step]
            self._open_step.update(self._snapshot(missing))
            return
        self._undo.append(self._snapshot(keys))
        del self._undo[:-UNDO_LIMIT]
        self._redo.clear()
        self._emit("undo")

    @contextmanager
    def _action(self, *keys: str):
        """One user action: the layers ``keys`` (and any recorded inside) form one undo step."""
        if self._open_step is not None or self._no_record:
            yield
            return
        self._open_step = self._snapshot(keys)
        try:
            yield
        finally:
            step, self._open_step = self._open_step, None
            self._undo.append(step)
            del self._undo[:-UNDO_LIMIT]
            self._redo.clear()
            self._emit("undo")

    @contextmanager
    def _not_recorded(self):
        self._no_record += 1
        try:
            yield
        finally:
            self._no_record -= 1

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def undo(self) -> bool:
        """Undo the last correction (added, deleted or moved picks and labels, accept, reject). Returns False when
        there is nothing to undo."""
        return self._swap(self._undo, self._redo)

    def redo(self) -> bool:
        """Redo the last undone correction. Returns False when there is nothing to redo."""
        return self._swap(self._redo, self._undo)

    def _swap(self, source: list, target: list) -> bool:
        if not source:
            return False
        step = source.pop()
        target.append(self._snapshot(step))
        self._restore(step)
        self._emit("undo")
        return True

    def _restore(self, step: dict) -> None:
        with self._not_recorded():
            for key, (data, score) in step.items():
                if key == PICKS:
                    if self._alive(self.picks_layer) or len(data):
                        self._replace_picks(data, score)
                    continue
                layer = self._label_layer(key)
                if layer is None:
                    if not len(data):
                        continue
                    layer = self._label_layer_or_new(key)
                with self._programmatic():
                    layer.selected_data = set()
                    layer.data = data
                    layer.size = self.radius if key == NEGATIVES else 2 * self.radius
        if PICKS in step:
            self._emit("picks")
        if step.keys() - {PICKS}:
            self._emit("labels")

    def _label_layer_or_new(self, key: str):
        if key == NEGATIVES:
            if not self._alive(self.negatives_layer):
                active = self.viewer.layers.selection.active
                self.negatives_layer = self._find_points(NEGATIVES) or self._new_points(NEGATIVES, _NEGATIVE_STYLE)
                self.negatives_layer.current_size = self.radius  # a smaller mark than the pick circles
                if active is not None and active in self.viewer.layers:
                    self.viewer.layers.selection.active = active
            self._watch_labels()
            return self.negatives_layer
        if not self._alive(self.positives_layer):
            self.positives_layer = self._find_points(POSITIVES) or self._new_points(POSITIVES, _POSITIVE_STYLE)
        self._watch_labels()
        return self.positives_layer

    def _watch_labels(self) -> None:
        """Record the user's own edits of the positives and negatives layers (clicks, deletes, moves)."""
        for key in (POSITIVES, NEGATIVES):
            layer = self._label_layer(key)
            if layer is not None and id(layer) not in self._watched:
                self._watched.add(id(layer))
                layer.events.data.connect(lambda event, key=key: self._on_label_data(key, event))

    def _on_label_data(self, key: str, event) -> None:
        if self._quiet:
            return
        action = str(getattr(event, "action", ""))
        if action.endswith(("adding", "removing", "changing")):
            self._record(key)
        elif action.endswith(("added", "removed", "changed")) and not self._open_step:
            self._emit("labels")

    # -- the picks layer -----------------------------------------------------------------------------------------

    def _on_picks_data(self, event) -> None:
        if self._quiet:
            return
        action = str(getattr(event, "action", ""))
        if action.endswith("removing"):
            idx = [int(i) for i in event.data_indices if int(i) >= 0]
            if idx:
                self._record(PICKS, NEGATIVES)
                with self._not_recorded():
                    self.reject(np.asarray(self.picks_layer.data)[idx])
        elif action.endswith("removed"):
            self._emit("picks")
        elif action.endswith("adding"):
            self._record(PICKS, POSITIVES)
        elif action.endswith("changing"):
            self._record(PICKS)
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
        with self._not_recorded():
            self.accept(rows)
        self._emit("picks")

    # -- labels --------------------------------------------------------------------------------------------------

    def reject(self, points) -> None:
        """Record points (picks layer data coordinates) as negative labels."""
        points = np.asarray(points, float).reshape(-1, 3 if self.stacked else 2)
        if not len(points):
            return
        self._record(NEGATIVES)
        layer = self._label_layer_or_new(NEGATIVES)
        if self._alive(self.picks_layer) and self.viewer.layers.selection.active is layer:
            self.viewer.layers.selection.active = self.picks_layer
        with self._programmatic():
            layer.add(points)
            layer.selected_data = set()
        self._emit("labels")

    def accept(self, points) -> None:
        """Record points (picks layer data coordinates) as positive labels."""
        points = np.asarray(points, float).reshape(-1, 3 if self.stacked else 2)
        if not len(points):
            return
        self._record(POSITIVES)
        active = self.viewer.layers.selection.active
        layer = self._label_layer_or_new(POSITIVES)
        with self._programmatic():
            layer.add(points)
            layer.selected_data = set()
        if active is not None and active in self.viewer.layers:
            self.viewer.layers.selection.active = active
        self._emit("labels")

    def _target_rows(self, layer, position=None) -> list[int]:
        """The selected points of ``layer``, else the one under ``position`` (world coordinates; within a particle
        radius, on the micrograph shown)."""
        selected = sorted(int(i) for i in layer.selected_data)
        if selected or position is None or not len(layer.data):
            return selected
        data = np.asarray(layer.data, float)
        world = data * np.asarray(layer.scale) + np.asarray(layer.translate)
        pos = np.asarray(position, float)[-world.shape[1]:]
        d = np.hypot(*(world[:, -2:] - pos[-2:]).T) / float(np.asarray(layer.scale)[-1])
        if self.stacked:
            d = np.where(np.rint(data[:, 0]).astype(int) == self.current_plane(), d, np.inf)
        if layer is self.picks_layer:
            d = np.where(layer.shown, d, np.inf)
        i = int(np.argmin(d))
        return [i] if d[i] <= self.radius else []

    def _move_points(self, source: str, target: str, position=None) -> int:
        """Move the selected points (or the one under ``position``) of layer ``source`` to layer ``target`` as one
        undoable step; returns how many moved."""
        layer = self._label_layer(source)
        if layer is None:
            return 0
        rows = self._target_rows(layer, position)
        if not rows:
            return 0
        with self._action(source, target):
            data = np.asarray(layer.data, float)
            keep = np.ones(len(data), bool)
            keep[rows] = False
            moved = data[rows]
            if source == PICKS:
                score = layer.features["score"].to_numpy(float)
                self._replace_picks(data[keep], score[keep])
            else:
                with self._programmatic():
                    layer.selected_data = set()
                    layer.data = data[keep]
            with self._not_recorded():
                (self.accept if target == POSITIVES else self.reject)(moved)
        if source == PICKS:
            self._emit("picks")
        return len(rows)

    def accept_selected(self, position=None) -> int:
        """Accept: the selected picks (or the pick under ``position``, world coordinates) become positive labels;
        on the negatives layer, the selected rejections become positives (un-reject). Returns the number moved."""
        source = NEGATIVES if self.viewer.layers.selection.active is self._label_layer(NEGATIVES) else PICKS
        return self._move_points(source, POSITIVES, position)

    def reject_selected(self, position=None) -> int:
        """Reject: the selected picks (or the pick under ``position``) become negative labels; on the positives
        layer, the selected labels become negatives. Returns the number moved."""
        source = POSITIVES if self.viewer.layers.selection.active is self._label_layer(POSITIVES) else PICKS
        return self._move_points(source, NEGATIVES, position)

    def unreject(self, points=None) -> int:
        """Take rejections back: the given negative points (data coordinates; default the selected ones) are
        removed from the negatives layer, as one undoable step. Returns the number removed."""
        layer = self._label_layer(NEGATIVES)
        if layer is None:
            return 0
        data = np.asarray(layer.data, float)
        if points is None:
            rows = sorted(int(i) for i in layer.selected_data)
        else:
            pts = np.asarray(points, float).reshape(-1, data.shape[1])
            rows = [i for i in range(len(data)) if (np.abs(pts - data[i]).max(axis=1) < 1e-6).any()]
        if not rows:
            return 0
        with self._action(NEGATIVES), self._programmatic():
            layer.selected_data = set()
            layer.data = np.delete(data, rows, axis=0)
        self._emit("labels")
        return len(rows)
