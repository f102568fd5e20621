"""Layer bookkeeping of a session: where layers sit on the micrograph grid, the normalized stack, the label
layers, the score heatmap and the picks layer (no Qt)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pandas as pd

from napari_pupick.loop.session import NEGATIVES, NMS_THRESHOLD, PICKS, POSITIVES, SCORES, LoopEvent

__all__ = ["LayersMixin", "NEGATIVES", "PICKS", "POSITIVES", "SCORES"]

_POSITIVE_STYLE = dict(face_color="transparent", border_color="#33ff66", border_width=0.12,
                       border_width_is_relative=True, symbol="o")
_NEGATIVE_STYLE = dict(face_color="transparent", border_color="#ff4040", border_width=0.15,
                       border_width_is_relative=True, symbol="x", opacity=0.8)
_PICK_STYLE = dict(face_color="transparent", border_color="#ffd200", border_width=0.12,
                   border_width_is_relative=True, symbol="o")


class LayersMixin:
    """The layers of a :class:`~napari_pupick.loop.PickLoop`."""

    def _grid(self, factor: int = 1) -> dict:
        """scale/translate keywords that put a layer binned by ``factor`` on the micrograph layer's grid."""
        layer = self.micrograph_layer
        scale = np.array(layer.scale, float)
        scale[-2:] *= factor
        return {"scale": tuple(scale), "translate": tuple(layer.translate)}

    def _insert_above(self, layer, below):
        """Add ``layer`` to the viewer just above ``below`` (so labels and picks stay on top)."""
        index = self.viewer.layers.index(below) + 1 if self._alive(below) else len(self.viewer.layers)
        self.viewer.layers.insert(index, layer)
        return layer

    def _points_meta(self) -> dict:
        return {"micrograph_names": list(self.names), "downsample": 1, "radius": float(self.radius)}

    @contextmanager
    def _programmatic(self):
        """Layer edits made by the loop itself (not recorded as corrections)."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def _new_points(self, name: str, style: dict, data=None, features=None, visible: bool = True):
        ndim = 3 if self.stacked else 2
        data = np.zeros((0, ndim)) if data is None else np.asarray(data, float).reshape(-1, ndim)
        kwargs = dict(name=name, ndim=ndim, size=2 * self.radius, metadata=self._points_meta(), visible=visible,
                      **self._grid(), **style)
        if features is not None:
            kwargs["features"] = features
        return self.viewer.add_points(data, **kwargs)

    def _apply_preprocessed(self, event: LoopEvent) -> None:
        pre, planes = event.data["preprocessor"], event.data["planes"]
        self.preprocessor = pre
        self.mixture = event.data.get("mixture")
        self.prepared = {i: p for i, p in enumerate(planes)}
        self.scores = {}
        stack = event.data["stack"]  # made in the worker
        name = f"{self.micrograph_layer.name} (normalized)"
        meta = {"normalized_from": self.micrograph_layer.name, "downsample": int(pre.downsample),
                "preprocess": pre.to_dict()}
        if self._alive(self.normalized_layer):
            self.normalized_layer.data = stack
            self.normalized_layer.metadata = meta
            for key, value in self._grid(pre.downsample).items():
                setattr(self.normalized_layer, key, value)
        else:
            from napari.layers import Image

            layer = Image(stack, name=name, colormap="gray", metadata=meta, contrast_limits=(-3.0, 3.0),
                          **self._grid(pre.downsample))
            self.normalized_layer = self._insert_above(layer, self.micrograph_layer)
        self.micrograph_layer.visible = False
        self.normalized_layer.contrast_limits = (-3.0, 3.0)
        # a smooth display of the binned image (labels are clicked on it): not napari's blocky nearest pixels
        self.normalized_layer.interpolation2d = "linear"
        if self._alive(self.scores_layer):
            self.viewer.layers.remove(self.scores_layer)
            self.scores_layer = None
        self._emit("preprocessed")

    def add_positives_layer(self, radius: float | None = None, expected_particles: float | None = None):
        """The "positives" Points layer on the micrographs, created if needed, selected, in add mode.

        Parameters
        ----------
        radius : float, optional
            Particle radius in original pixels (sets the point size, 2 x radius); kept for the session.
        expected_particles : float, optional
            Expected particles per micrograph (0: estimated by training); kept for the session.
        """
        self._require_micrographs()
        self.set_particle(radius, expected_particles)
        layer = self.positives_layer if self._alive(self.positives_layer) else None
        if layer is None:
            layer = self._find_points(POSITIVES)
        if layer is None:
            layer = self._new_points(POSITIVES, _POSITIVE_STYLE)
        self.positives_layer = layer
        self._watch_labels()
        layer.size = 2 * self.radius
        layer.current_size = 2 * self.radius
        self.viewer.layers.selection.active = layer
        layer.mode = "add"
        self._emit("labels")
        return layer

    def add_positives(self, table: pd.DataFrame):
        """Add labelled particles from a pick table (``micrograph, x, y`` in original pixels, e.g. from
        :func:`napari_pupick.io.read_coordinates`) to the positives layer. Rows naming other micrographs are
        left out. Returns the number of points added."""
        from napari_pupick.io import match_micrographs

        self._require_micrographs()
        plane = match_micrographs(table, self.names, allow_partial=True)
        keep = plane >= 0
        yx = table.loc[keep, ["y", "x"]].to_numpy(float)
        points = np.column_stack([plane[keep].astype(float), yx]) if self.stacked else yx
        layer = self.positives_layer if self._alive(self.positives_layer) else self.add_positives_layer()
        layer.add(points.reshape(-1, 3 if self.stacked else 2))  # recorded for undo (the layer's own event)
        layer.selected_data = set()
        self._emit("labels")
        return int(keep.sum())

    def _find_points(self, name: str):
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            names = (layer.metadata or {}).get("micrograph_names")
            if names and [str(n) for n in names] != list(self.names):
                return None  # labels of other micrographs (another stack opened since)
            if type(layer).__name__ == "Points" and layer.ndim == (3 if self.stacked else 2):
                return layer
        return None

    def _show_scores(self, plane: int, logits: np.ndarray, factor: int) -> None:
        """The translucent heatmap layer: sigmoid(logit) per binned pixel, additive over the micrographs."""
        prob = (1.0 / (1.0 + np.exp(-np.clip(logits, -30, 30)))).astype(np.float32)
        shape = (self.n_planes, *prob.shape) if self.stacked else prob.shape
        layer = self.scores_layer if self._alive(self.scores_layer) else None
        if layer is not None and (layer.data.shape != shape or layer.metadata.get("downsample") != factor):
            self.viewer.layers.remove(layer)
            layer = None
        if layer is None:
            from napari.layers import Image

            layer = Image(np.zeros(shape, np.float32), name=SCORES, colormap="inferno", blending="additive",
                          opacity=0.6, contrast_limits=(0.0, 1.0), metadata={"downsample": factor},
                          **self._grid(factor))
            below = self.normalized_layer if self._alive(self.normalized_layer) else self.micrograph_layer
            self.scores_layer = self._insert_above(layer, below)
        if self.stacked:
            layer.data[plane] = prob
        else:
            layer.data[...] = prob
        if not self.stacked or plane == self.current_plane():
            layer.refresh()  # other planes are read from the array when shown

    def _picks_layer(self):
        if self._alive(self.picks_layer):
            return self.picks_layer
        with self._programmatic():
            layer = self._new_points(PICKS, _PICK_STYLE, features=pd.DataFrame({"score": np.zeros(0)}))
        if self.show_boxes:
            layer.symbol = "square"
            layer.current_symbol = "square"
        layer.events.data.connect(self._on_picks_data)
        layer.events.features.connect(self._on_picks_features)
        self.picks_layer = layer
        return layer

    def set_boxes(self, boxes: bool = True) -> None:
        """Draw the picks as boxes of the extraction box size (2 x radius, as the exports' box files) instead
        of circles."""
        self.show_boxes = bool(boxes)
        layer = self.picks_layer
        if self._alive(layer):
            symbol = "square" if self.show_boxes else "o"
            with self._programmatic():
                if len(layer.data):
                    layer.symbol = symbol
                layer.current_symbol = symbol

    def _set_plane_picks(self, plane: int, picks: pd.DataFrame) -> None:
        """Replace the picks of one plane (picks within half a radius of a rejected pick stay rejected)."""
        self._set_planes_picks({plane: picks})

    def _set_planes_picks(self, tables: dict) -> None:
        """Replace the picks of several planes (``{plane: picks}``) in one layer update: a Points layer's data
        setter costs tens of ms whatever the number of planes changed."""
        if not tables:
            return
        layer = self._picks_layer()
        ndim = 3 if self.stacked else 2
        data = np.asarray(layer.data, float).reshape(-1, ndim)
        score = layer.features["score"].to_numpy(float) if len(data) else np.zeros(0)
        if self.stacked:
            keep = ~np.isin(np.rint(data[:, 0]).astype(int), np.fromiter(tables, int, len(tables)))
        else:
            keep = np.zeros(len(data), bool)
        _, negatives = self.labels()
        parts, scores = [data[keep]], [score[keep]]
        for plane, picks in sorted(tables.items()):
            new = picks[["y", "x"]].to_numpy(float)
            new_score = picks["score"].to_numpy(float)
            neg = negatives[negatives["micrograph"] == self.names[plane]][["y", "x"]].to_numpy(float)
            if len(neg) and len(new):
                from scipy.spatial import cKDTree

                distance, _ = cKDTree(neg).query(new, k=1)
                ok = distance > 0.5 * self.radius
                new, new_score = new[ok], new_score[ok]
            if self.stacked:
                new = np.column_stack([np.full(len(new), float(plane)), new])
            parts.append(new.reshape(-1, ndim))
            scores.append(new_score)
        self._replace_picks(np.concatenate(parts), np.concatenate(scores))

    def _replace_picks(self, data: np.ndarray, score: np.ndarray) -> None:
        layer = self._picks_layer()
        ndim = 3 if self.stacked else 2
        with self._programmatic():
            layer.selected_data = set()
            layer.data = np.asarray(data, float).reshape(-1, ndim)
            layer.features = pd.DataFrame({"score": np.asarray(score, float)})
            if len(layer.data) and not np.all(np.asarray(layer.size) == 2 * self.radius):
                layer.size = 2 * self.radius
            if self.show_boxes and len(layer.data):
                layer.symbol = "square"
        self._apply_threshold()

    def reextract(self, radius: float | None = None, margin: float | None = None) -> None:
        """Extract the picks again from the cached score maps with a new NMS radius and/or edge margin
        (original pixels), without scoring again."""
        self._drive(self.iter_reextract(radius, margin))

    def iter_reextract(self, radius: float | None = None, margin: float | None = None):
        """:meth:`reextract` as a generator for a thread worker: the extraction runs there, the picks layer is
        updated once on the main thread (``"reextracted"``, ``data``: ``{plane: picks}``)."""
        if radius is not None:
            self.nms_radius = float(radius)
        if margin is not None:
            self.margin = float(margin)
        s = int(self.scores_layer.metadata.get("downsample", self.factor)) if self._alive(self.scores_layer) \
            else self.factor
        return self._reextract_gen(dict(sorted(self.scores.items())), s, self._nms_radius() / s,
                                   self.effective_margin() / s, list(self.names))

    @staticmethod
    def _reextract_gen(scores: dict, s: int, radius: float, margin: float, names: list):
        from napari_pupick.extract import extract_picks

        n = len(scores)
        tables = {}
        for k, (plane, logits) in enumerate(scores.items()):
            tables[plane] = extract_picks(logits, radius, threshold=NMS_THRESHOLD, margin=margin, factor=s,
                                          micrograph=names[plane])
            yield LoopEvent("progress", k + 1, n, f"re-extracted {k + 1}/{n}")
        yield LoopEvent("reextracted", n, n, f"re-extracted the picks of {n} micrograph(s)", tables)

    def _apply_reextracted(self, event: LoopEvent) -> None:
        if event.data:
            self._set_planes_picks(event.data)  # one layer update for every plane
            self._emit("picks")
