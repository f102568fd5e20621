"""Reviewing micrographs: per-micrograph counts, the reviewed set, moving between planes, and which micrograph to
label next (no Qt)."""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["NEAR_THRESHOLD", "ReviewMixin"]

#: Candidates within this many logits of the threshold count as uncertain (the model cannot tell them apart).
NEAR_THRESHOLD = 1.0


class ReviewMixin:
    """Micrograph table and "label next" of a :class:`~napari_pupick.loop.PickLoop`."""

    def set_plane(self, plane: int) -> None:
        """Show micrograph ``plane`` (index into ``names``)."""
        if not self.stacked:
            return
        plane = int(np.clip(plane, 0, self.n_planes - 1))
        layer = self.micrograph_layer
        axis = self.viewer.dims.ndim - layer.ndim
        self.viewer.dims.set_point(axis, layer.translate[0] + plane * layer.scale[0])

    def step_plane(self, step: int) -> None:
        """Show the next (``step = 1``) or previous (``-1``) micrograph."""
        self.set_plane(self.current_plane() + int(step))

    def set_reviewed(self, name: str, reviewed: bool = True) -> None:
        """Mark a micrograph (by name) as reviewed or not; exports can leave out the others."""
        if reviewed:
            self.reviewed.add(str(name))
        else:
            self.reviewed.discard(str(name))
        self._emit("review")

    def micrograph_table(self) -> pd.DataFrame:
        """One row per micrograph: ``micrograph, plane, labels, rejected, picks`` (at the threshold), ``scored``,
        ``uncertainty`` (share of the candidates at or above ``threshold - 1`` that lie within 1 logit of the
        threshold; NaN until scored), ``priority`` (for "label next": uncertainty / (1 + labels); reviewed
        micrographs rank last) and ``reviewed``."""
        n = self.n_planes
        names = list(self.names)
        index = {m: i for i, m in enumerate(names)}
        positives, negatives = self.labels() if self.micrograph_layer is not None else (None, None)

        def count(table):
            if table is None or not len(table):
                return np.zeros(n, int)
            return np.bincount(table["micrograph"].map(index).dropna().astype(int), minlength=n)[:n]

        plane, score = self._plane_scores()
        t = float(self.threshold)
        picks = np.bincount(plane[score >= t], minlength=n)[:n]
        near = np.bincount(plane[np.abs(score - t) < NEAR_THRESHOLD], minlength=n)[:n]
        upper = np.bincount(plane[score >= t - NEAR_THRESHOLD], minlength=n)[:n]
        scored = np.zeros(n, bool)
        scored[[p for p in getattr(self, "scores", {}) if 0 <= p < n]] = True
        uncertainty = np.where(scored, near / np.maximum(upper, 1), np.nan)
        labels = count(positives)
        reviewed = np.array([m in self.reviewed for m in names], bool)
        priority = uncertainty / (1.0 + labels)
        priority = np.where(reviewed, -1.0, priority)
        return pd.DataFrame({"micrograph": names, "plane": np.arange(n), "labels": labels,
                             "rejected": count(negatives), "picks": picks, "scored": scored,
                             "uncertainty": uncertainty, "priority": priority, "reviewed": reviewed})

    def label_next(self) -> list[str]:
        """Micrographs in the order to label them next: most uncertain scores with fewest labels first (the
        scored, unreviewed ones; see :meth:`micrograph_table`)."""
        table = self.micrograph_table()
        table = table[table["scored"] & ~table["reviewed"]]
        table = table.sort_values(["priority", "labels"], ascending=[False, True], kind="stable")
        return list(table["micrograph"])
