"""The Qt-free state of one picking session: micrographs, particle, labels as tables, model, threshold,
exports, and the driving of job events (see :mod:`napari_pupick.loop`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_pupick.errors import MicrographError, ModelError, PupickError

__all__ = ["DEFAULT_THRESHOLD", "LoopEvent", "NEGATIVES", "NMS_THRESHOLD", "PICKS", "POSITIVES", "SCORES", "Session"]

#: Picks are extracted down to this logit; the threshold slider filters them afterwards (exports never use it).
NMS_THRESHOLD = -6.0
#: Threshold shown before a model offers its calibrated one (a checkpoint without ``metrics["threshold"]``).
DEFAULT_THRESHOLD = 0.0

POSITIVES, NEGATIVES, PICKS, SCORES = "positives", "negatives", "picks", "scores"


@dataclass
class LoopEvent:
    """One progress report of a loop job.

    Attributes
    ----------
    kind : str
        ``"progress"`` (a message), ``"preprocessed"``, ``"train"`` (``data`` is a
        :class:`~napari_pupick.training.TrainEvent`), ``"trained"`` (``data`` is the kept Checkpoint), ``"scored"``
        (one plane: ``data`` is a dict ``plane, logits, picks, prepared``) or ``"predicted"``.
    step, total : int
        Progress of the job (``total = 0``: unknown).
    message : str
    data : any
    """

    kind: str
    step: int = 0
    total: int = 0
    message: str = ""
    data: Any = None



_ATTRIBUTE = "_pupick_loop"


class Session:
    """State of one picking session (the base of :class:`~napari_pupick.loop.PickLoop`)."""

    def __init__(self, viewer, micrographs=None):
        self.viewer = getattr(viewer, "__wrapped__", viewer)
        self.micrograph_layer = None
        self.names: list[str] = []
        self.preprocessor = None
        self.prepared: dict[int, np.ndarray] = {}
        self.normalized_layer = None
        self.mixture = None  # (centres, density, pdf0, pdf1) of the last fit, for plotting
        self.radius = 12.0
        self.expected_particles: float | None = None  # None: estimated by training (AutoTrainer)
        self.downsample: int | str = "auto"  # binning: 'auto' (calibration.choose_downsample) or a factor
        self.positives_layer = None
        self.negatives_layer = None
        self.picks_layer = None
        self.scores_layer = None
        self.checkpoint = None
        self.scores: dict[int, np.ndarray] = {}
        self.threshold = DEFAULT_THRESHOLD
        self.threshold_by_hand = False  # set by the user: kept when a retrained model arrives
        self.nms_radius: float | None = None
        self.margin: float | None = None  # None: the model's margin (one particle radius before a model)
        self.device = "auto"
        self.show_boxes = False  # picks drawn as boxes of the extraction box (2 x radius) instead of circles
        self.reviewed: set[str] = set()  # micrographs marked reviewed (exports can keep only these)
        self.history: list = []  # TrainEvents of the current/last training run
        self._trainer = None
        self._quiet = 0
        self._pending_add = 0
        self._pending_picks: dict = {}  # scored planes whose picks are not in the layer yet (flush_picks)
        self._picks_flushed = 0.0
        self._undo: list[dict] = []  # undo steps: snapshots of the layers a correction changed
        self._redo: list[dict] = []
        self._open_step: dict | None = None
        self._no_record = 0
        self._watched: set[int] = set()
        self._callbacks: dict[str, list] = {}
        if micrographs is not None:
            self.set_micrographs(micrographs)

    @classmethod
    def for_viewer(cls, viewer) -> Session:
        """The viewer's session, created on first use (all widgets of one viewer share it).

        The session is stored on the viewer (attribute ``_pupick_loop``), so it lives exactly as long as the viewer.
        """
        # napari hands plugin widgets a proxy of the viewer: the session belongs to the viewer itself
        viewer = getattr(viewer, "__wrapped__", viewer)
        loop = getattr(viewer, _ATTRIBUTE, None)
        if not isinstance(loop, cls):
            loop = cls(viewer)
            object.__setattr__(viewer, _ATTRIBUTE, loop)  # napari viewers are pydantic models: no plain setattr
        return loop

    def connect(self, what: str, callback) -> None:
        """Call ``callback(loop)`` after ``what`` changes: 'micrographs', 'particle', 'preprocessed', 'labels',
        'model', 'picks', 'threshold', 'history', 'review' or 'undo' (the widgets use this to stay in sync)."""
        self._callbacks.setdefault(what, []).append(callback)

    def disconnect(self, callback) -> None:
        for callbacks in self._callbacks.values():
            while callback in callbacks:
                callbacks.remove(callback)

    def _emit(self, what: str) -> None:
        for cb in list(self._callbacks.get(what, ())):
            cb(self)

    def _layer(self, layer_or_name):
        if isinstance(layer_or_name, str):
            try:
                return self.viewer.layers[layer_or_name]
            except KeyError:
                raise PupickError(f"no layer named {layer_or_name!r} in the viewer") from None
        return layer_or_name

    def _alive(self, layer) -> bool:
        return layer is not None and layer in self.viewer.layers

    @property
    def stacked(self) -> bool:
        """True when the micrographs are an (N, H, W) stack (points are (plane, y, x))."""
        return self.micrograph_layer is not None and self.micrograph_layer.data.ndim == 3

    @property
    def n_planes(self) -> int:
        return len(self.names)

    @property
    def pixel_size(self) -> float | None:
        """Angstrom per original pixel from the micrograph layer's metadata (None when unknown)."""
        px = ((self.micrograph_layer.metadata or {}).get("pixel_size") if self.micrograph_layer is not None
              else None)
        return float(px) if px and np.isfinite(float(px)) and float(px) > 0 else None

    def binning(self, downsample=None):
        """The :class:`~napari_pupick.calibration.Binning` that preprocessing uses for the session's particle
        radius (``downsample``: 'auto' or a factor; default the session's ``downsample``)."""
        from napari_pupick.calibration import choose_downsample

        return choose_downsample(self.radius, self.pixel_size, self.downsample if downsample is None else downsample)

    def in_angstrom(self, pixels: float) -> str:
        """``"12 px"``, or ``"12 px = 18 Å"`` when the pixel size is known."""
        px = self.pixel_size if self.micrograph_layer is not None else None
        return f"{pixels:g} px" + (f" = {pixels * px:.3g} \u00c5" if px else "")

    def effective_margin(self) -> float:
        """The edge margin in original pixels: set by hand, else the model's, else one particle radius."""
        from napari_pupick.calibration import model_margin

        if self.margin is not None:
            return float(self.margin)
        return model_margin(self.checkpoint.metrics if self.checkpoint is not None else None, self.radius)

    @property
    def factor(self) -> int:
        """The downsampling factor of the current preprocessing (1 before preprocessing)."""
        return int(self.preprocessor.downsample) if self.preprocessor is not None else 1

    def set_micrographs(self, layer) -> None:
        """Use ``layer`` (an Image layer or its name) as the micrographs; resets preprocessing and scores."""
        layer = self._layer(layer)
        data = layer.data
        if getattr(layer, "rgb", False) or data.ndim not in (2, 3):
            raise MicrographError(f"layer {layer.name!r}: expected one (H, W) micrograph or an (N, H, W) stack, got "
                                  f"shape {tuple(data.shape)}")
        n = data.shape[0] if data.ndim == 3 else 1
        names = list((layer.metadata or {}).get("micrograph_names") or [])
        if len(names) != n:
            names = [layer.name] if n == 1 else [f"{layer.name}_{i:0{len(str(n - 1))}d}" for i in range(n)]
        new = self.micrograph_layer is not layer
        if new:
            self.prepared, self.scores, self.preprocessor, self.mixture = {}, {}, None, None
            self._pending_picks = {}
            if self.micrograph_layer is not None:  # the old micrographs' layers stay, no longer the session's
                self.positives_layer = self.negatives_layer = self.picks_layer = self.scores_layer = None
                self.normalized_layer = None
                self._undo.clear()
                self._redo.clear()
        self.micrograph_layer = layer
        self.names = [str(x) for x in names]
        radius = (layer.metadata or {}).get("radius")
        if radius:
            self.radius = float(radius)
        if new and n > 1:
            self._label_axes()
        if new and hasattr(self, "set_plane"):
            self.set_plane(0)  # a stack opens on its first micrograph (napari shows the middle one)
        self._emit("micrographs")

    def _label_axes(self) -> None:
        """Name the stack's axes (micrograph, y, x) where napari's own numbered labels are still in place."""
        dims = getattr(self.viewer, "dims", None)
        if dims is None:
            return
        labels = [str(a) for a in dims.axis_labels]
        if dims.ndim == 3 and all(a.lstrip("-").isdigit() for a in labels):
            dims.axis_labels = ("micrograph", "y", "x")

    def _require_micrographs(self):
        if self.micrograph_layer is None:
            layers = [la for la in self.viewer.layers if type(la).__name__ == "Image"
                      and (la.metadata or {}).get("micrograph_names")]
            if not layers:
                raise PupickError("no micrograph layer: open micrographs (File > Open) or pick a layer first")
            self.set_micrographs(layers[0])
        return self.micrograph_layer

    def current_plane(self) -> int:
        """The micrograph (plane index) the viewer shows now."""
        if not self.stacked:
            return 0
        layer = self.micrograph_layer
        axis = self.viewer.dims.ndim - layer.ndim  # world axis of the layer's plane axis
        world = self.viewer.dims.point[axis]
        plane = (world - layer.translate[0]) / layer.scale[0]
        return int(np.clip(round(plane), 0, self.n_planes - 1))


    def set_particle(self, radius: float | None = None, expected_particles: float | None = None) -> None:
        """Set the particle radius (original pixels) and expected particles per micrograph, resizing points."""
        if radius is not None:
            if not radius > 0:
                raise ValueError(f"particle radius must be > 0 pixels, got {radius!r}")
            self.radius = float(radius)
            for layer in (self.positives_layer, self.negatives_layer, self.picks_layer):
                if not self._alive(layer):
                    continue
                size = self.radius if layer is self.negatives_layer else 2 * self.radius
                if len(layer.data):
                    layer.size = size
                layer.current_size = size
                layer.metadata = {**layer.metadata, "radius": self.radius}
        if expected_particles is not None:
            if not expected_particles >= 0:
                raise ValueError(f"expected particles per micrograph must be >= 0 (0: estimate), got "
                                 f"{expected_particles!r}")
            self.expected_particles = float(expected_particles) or None
        self._emit("particle")

    def _table(self, layer) -> pd.DataFrame:
        """A Points layer as a pick table in original micrograph pixels (scale/translate taken into account)."""
        if not self._alive(layer) or len(layer.data) == 0:
            return pd.DataFrame({"micrograph": pd.Series(dtype=str), "x": pd.Series(dtype=float),
                                 "y": pd.Series(dtype=float), "score": pd.Series(dtype=float)})
        m = self.micrograph_layer
        world = np.asarray(layer.data, float) * np.asarray(layer.scale) + np.asarray(layer.translate)
        k = min(world.shape[1], m.ndim)
        pix = (world[:, -k:] - np.asarray(m.translate)[-k:]) / np.asarray(m.scale)[-k:]
        if self.stacked:
            if pix.shape[1] < 3:
                raise PupickError(f"layer {layer.name!r} holds 2-D points but the micrographs are a stack")
            plane = np.rint(pix[:, 0]).astype(int)
            if ((plane < 0) | (plane >= self.n_planes)).any():
                raise PupickError(f"layer {layer.name!r} has points outside planes 0..{self.n_planes - 1}")
            names = np.asarray(self.names, dtype=object)[plane]
        else:
            names = np.full(len(pix), self.names[0], dtype=object)
        score = (layer.features["score"].to_numpy(float) if "score" in layer.features
                 else np.full(len(pix), np.nan))
        return pd.DataFrame({"micrograph": names.astype(str), "x": pix[:, -1], "y": pix[:, -2], "score": score})

    def labels(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(positives, negatives)`` pick tables in original pixels."""
        self._require_micrographs()
        pos = self.positives_layer if self._alive(self.positives_layer) else self._find_points(POSITIVES)
        neg = self.negatives_layer if self._alive(self.negatives_layer) else self._find_points(NEGATIVES)
        self.positives_layer, self.negatives_layer = pos, neg
        if hasattr(self, "_watch_labels"):
            self._watch_labels()
        return self._table(pos), self._table(neg)


    def set_model(self, checkpoint, keep_threshold: bool = False) -> None:
        """Make ``checkpoint`` the current model and show its calibrated threshold.

        With ``keep_threshold`` (a retrained model) a threshold the user set by hand stays.
        """
        self.checkpoint = checkpoint
        self._emit("model")
        t = self.suggested_threshold
        if keep_threshold and self.threshold_by_hand:
            return
        self.set_threshold(t if t is not None else DEFAULT_THRESHOLD, by_hand=False)

    @property
    def suggested_threshold(self) -> float | None:
        """The current model's threshold: the calibrated one (``metrics["threshold"]``, as
        :attr:`napari_pupick.pipeline.Picker.threshold`), else the F2-optimal one on held-out micrographs."""
        metrics = (self.checkpoint.metrics or {}) if self.checkpoint is not None else {}
        for key in ("threshold", "threshold_f2"):
            t = metrics.get(key)
            if t is not None and np.isfinite(float(t)):
                return float(t)
        return None

    def save_model(self, path):
        """Save the current model (a checkpoint file, atomically)."""
        if self.checkpoint is None:
            raise ModelError("no model to save: train one first")
        return self.checkpoint.save(path)

    def load_model(self, path):
        """Load a checkpoint as the current model. If its preprocessing differs from the session's, the session
        takes the model's (re-run :meth:`preprocess` with ``preprocessor=loop.model_preprocessor()`` to see it)."""
        from napari_pupick.training import Checkpoint

        ckpt = Checkpoint.load(path)
        self.set_model(ckpt)  # another model: its own threshold
        return ckpt

    def model_preprocessor(self):
        """The current model's Preprocessor (None without a model)."""
        from napari_pupick.preprocess import Preprocessor

        if self.checkpoint is None:
            return None
        return Preprocessor.from_dict(self.checkpoint.preprocess or {})

    def set_threshold(self, threshold: float, by_hand: bool = True) -> None:
        """Show only the picks scoring at least ``threshold`` (a logit); no re-scoring. Exports write these picks.

        ``by_hand`` (the default, what the slider does): the threshold stays when a retrained model arrives.
        """
        self.threshold = float(threshold)
        self.threshold_by_hand = bool(by_hand)
        self._apply_threshold()
        self._emit("threshold")

    def _apply_threshold(self) -> None:
        layer = self.picks_layer
        if not self._alive(layer):
            return
        if len(layer.data):
            layer.shown = layer.features["score"].to_numpy() >= self.threshold

    def all_scores(self) -> np.ndarray:
        """Scores of every pick in the picks layer (above the NMS threshold), for the histogram."""
        if not self._alive(self.picks_layer) or not len(self.picks_layer.data):
            return np.zeros(0)
        return self.picks_layer.features["score"].to_numpy(float)

    def picks_table(self, all_picks: bool = False) -> pd.DataFrame:
        """The picks in original pixels: those at or above the threshold (all of them with ``all_picks``)."""
        table = self._table(self.picks_layer)
        if not all_picks and len(table):
            table = table[table["score"].to_numpy() >= self.threshold].reset_index(drop=True)
        return table

    def _plane_scores(self):
        """(plane index, score) of every candidate in the picks layer."""
        layer = self.picks_layer
        if not self._alive(layer) or not len(layer.data):
            return np.zeros(0, int), np.zeros(0)
        data = np.asarray(layer.data)
        plane = np.rint(data[:, 0]).astype(int) if self.stacked else np.zeros(len(data), int)
        return plane, layer.features["score"].to_numpy(float)

    def picks_per_micrograph(self) -> pd.Series:
        """Number of picks at or above the threshold on each micrograph (all micrographs, 0 included).

        Counted from the layer's plane column and scores (no pick table: the Export tab asks on every threshold
        move, and a table of 100,000 picks took 20 ms to build)."""
        n = len(self.names)
        plane, score = self._plane_scores()
        plane = plane[(score >= self.threshold) & (plane >= 0) & (plane < n)]
        counts = np.bincount(plane, minlength=n)[:n]
        return pd.Series(counts.astype(int), index=list(self.names), name="picks")

    def export(self, path, format: str | None = None, per_micrograph: bool = False, suffix: str = "",
               reviewed_only: bool = False):
        """Write the picks at or above the threshold (original pixels) through the plugin's writers.

        Parameters
        ----------
        path : str or Path
            A file, or a folder with ``per_micrograph=True``.
        format : {'star', 'csv', 'topaz', 'box'}, optional
            Default: from the extension (STAR for a folder).
        per_micrograph : bool
            One file per micrograph (RELION's coordinate import).
        suffix : str
            Per-micrograph file name suffix, e.g. ``"_autopick"``.
        reviewed_only : bool
            Leave out the micrographs not marked reviewed (:meth:`set_reviewed`).

        Returns
        -------
        Path or list of Path
        """
        from napari_pupick import _writer
        from napari_pupick.io import guess_format

        if not self._alive(self.picks_layer) or not len(self.picks_layer.data):
            raise PupickError("no picks to export: run Predict first")
        layer = self.picks_layer
        score = layer.features["score"].to_numpy(float)
        mask = score >= self.threshold  # the shown picks: never the candidates below the threshold
        if reviewed_only:
            keep = np.array([n in self.reviewed for n in self.names], bool)
            plane = np.rint(np.asarray(layer.data)[:, 0]).astype(int) if self.stacked else np.zeros(len(mask), int)
            mask &= keep[plane]
        # The picks layer holds original micrograph pixels (metadata downsample = 1): the writers need no scaling.
        meta = {"name": layer.name, "metadata": self._points_meta(),
                "features": layer.features[mask].reset_index(drop=True)}
        data = np.asarray(layer.data)[mask]
        if per_micrograph:
            return [Path(p) for p in _writer.write_points_per_micrograph(path, data, meta, suffix=suffix,
                                                                         format=format or "star")]
        writers = {"star": _writer.write_star, "csv": _writer.write_csv, "topaz": _writer.write_topaz,
                   "box": _writer.write_box}
        fmt = format or guess_format(path)
        if fmt not in writers:
            raise PupickError(f"unknown export format {fmt!r}: choose one of {sorted(writers)}")
        return Path(writers[fmt](str(path), data, meta)[0])

    def handle(self, event: LoopEvent) -> None:
        """Apply one event of a job to the layers (call on the main thread, e.g. from ``worker.yielded``)."""
        apply = getattr(self, f"_apply_{event.kind}", None)
        if apply is not None:
            apply(event)

    def _drive(self, events) -> None:
        for event in events:
            self.handle(event)
