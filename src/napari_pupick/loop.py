"""The label-train-inspect loop on a napari viewer, as a Python API.

:class:`PickLoop` holds one picking session on one viewer: the micrograph layer, the fitted preprocessor, the
normalized micrographs, the labels, the current model, the cached score maps and the picks. Every dock widget is a
thin shell over one of its methods, and the same methods drive the loop from the napari console or a script:

>>> loop = PickLoop.for_viewer(viewer)                                   # doctest: +SKIP
>>> loop.set_micrographs("synthetic micrographs")                        # doctest: +SKIP
>>> loop.set_particle(radius=12)                                          # doctest: +SKIP
>>> loop.preprocess(method="gmm")                 # binning 'auto'        # doctest: +SKIP
>>> loop.add_positives_layer()                                           # doctest: +SKIP
>>> loop.train(epochs=4, steps_per_epoch=20)      # AutoTrainer          # doctest: +SKIP
>>> loop.predict()                                # at the model's threshold  # doctest: +SKIP
>>> loop.set_threshold(0.5)                       # by hand: kept on retrain  # doctest: +SKIP
>>> loop.export("picks.star")                                            # doctest: +SKIP

Long jobs come in two forms: ``iter_preprocess``, ``iter_train`` and ``iter_predict`` return generators of
:class:`LoopEvent` that touch no layer (a napari thread worker runs them; the widgets pass each event to
:meth:`PickLoop.handle` on the main thread, which updates the layers), and ``preprocess``, ``train`` and
``predict`` run the same generators to completion in the calling thread.

Coordinates: every layer the loop makes lies on the ORIGINAL micrograph grid. The normalized micrographs and the
score heatmap are binned by the downsampling factor ``s`` and shown with ``scale = s`` times the micrograph
layer's scale, so binned pixel ``(i, j)`` sits at original pixel ``(s i, s j)`` (the package's convention). Points
layers (positives, negatives, picks) carry the micrograph layer's scale, hold ``(plane, y, x)`` (or ``(y, x)`` for a
single micrograph) in original pixels, and have ``downsample = 1`` in their metadata, so the plugin's writers and
the exports need no scaling. Radii and margins are in original pixels too.

Corrections: deleting points from the picks layer records them as negative labels (the "negatives" layer), and a
point added to the picks layer moves to the "positives" layer. Retraining uses positives, negatives and the
unlabeled rest, starting from the current model.

Nothing here imports Qt; torch and the heavy core modules are imported when first needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from napari_pupick.errors import MicrographError, ModelError, PupickError, TrainingError

__all__ = ["LoopEvent", "PickLoop", "DEFAULT_THRESHOLD", "NMS_THRESHOLD"]

#: Picks are extracted down to this logit; the threshold slider filters them afterwards (exports never use it).
NMS_THRESHOLD = -6.0
#: Threshold shown before a model offers its calibrated one (a checkpoint without ``metrics["threshold"]``).
DEFAULT_THRESHOLD = 0.0

POSITIVES, NEGATIVES, PICKS, SCORES = "positives", "negatives", "picks", "scores"
_POSITIVE_STYLE = dict(face_color="transparent", border_color="#33ff66", border_width=0.12,
                       border_width_is_relative=True, symbol="o")
_NEGATIVE_STYLE = dict(face_color="transparent", border_color="#ff4040", border_width=0.15,
                       border_width_is_relative=True, symbol="x", opacity=0.8)
_PICK_STYLE = dict(face_color="transparent", border_color="#ffd200", border_width=0.12,
                   border_width_is_relative=True, symbol="o")


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


class PickLoop:
    """One picking session on a napari viewer (see the module docstring).

    Parameters
    ----------
    viewer : napari.Viewer or napari.components.ViewerModel
    micrographs : Image layer or layer name, optional
        The micrographs: one (H, W) image or an (N, H, W) stack, in pixels, ideally with ``micrograph_names``
        metadata (as the plugin's reader and sample data give).

    Attributes
    ----------
    viewer : the viewer
    micrograph_layer, normalized_layer, positives_layer, negatives_layer, picks_layer, scores_layer : layers
        The layers of the session (None until made); ``names`` holds the micrograph name of each plane.
    preprocessor : Preprocessor or None
        The fitted downsampling and normalization; ``prepared`` caches the normalized planes (binned grid).
    radius : float
        Particle radius in original pixels (points are drawn with diameter ``2 * radius``; NMS radius default).
    expected_particles : float or None
        Expected particles per micrograph (sets the class prior of training); None: estimated by training.
    downsample : int or 'auto'
        Binning of :meth:`preprocess` ('auto': :func:`~napari_pupick.calibration.choose_downsample`).
    threshold : float
        Logit threshold of the shown (and exported) picks: the model's calibrated one unless set by hand
        (``threshold_by_hand``).
    nms_radius : float or None
        Non-maximum-suppression radius in original pixels (None: ``radius``).
    margin : float or None
        Picks closer than this to the micrograph border (original pixels) are dropped; None: the model's
        (:meth:`effective_margin`).
    checkpoint : Checkpoint or None
        The current model.
    scores : dict of int -> ndarray
        Cached logit maps (binned grid) per plane.
    """

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
        self.history: list = []  # TrainEvents of the current/last training run
        self._trainer = None
        self._quiet = 0
        self._pending_add = 0
        self._callbacks: dict[str, list] = {}
        if micrographs is not None:
            self.set_micrographs(micrographs)

    # ------------------------------------------------------------------------------------------------------------
    # Session and layers

    @classmethod
    def for_viewer(cls, viewer) -> PickLoop:
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
        'model', 'picks', 'threshold' or 'history' (the widgets use this to stay in sync)."""
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
        if self.micrograph_layer is not layer:
            self.prepared, self.scores, self.preprocessor, self.mixture = {}, {}, None, None
        self.micrograph_layer = layer
        self.names = [str(x) for x in names]
        radius = (layer.metadata or {}).get("radius")
        if radius:
            self.radius = float(radius)
        self._emit("micrographs")

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

    # ------------------------------------------------------------------------------------------------------------
    # 1. Preprocess

    def iter_preprocess(self, layer=None, downsample: int | str | None = None, method: str = "gmm",
                        preprocessor=None) -> Iterator[LoopEvent]:
        """Downsample and normalize every plane (a generator for a thread worker; layers are not touched).

        Parameters
        ----------
        layer : Image layer or name, optional
            The micrographs (default: the current ones).
        downsample : int or 'auto'
            Binning factor; 'auto' (the session's default) chooses it from the particle radius
            (:func:`~napari_pupick.calibration.choose_downsample`).
        method : {'gmm', 'affine', 'none'}
        preprocessor : Preprocessor, optional
            Use this (already fitted) preprocessor instead of fitting one, e.g. a loaded model's.

        Yields
        ------
        LoopEvent
            ``"progress"`` per plane read and normalized, then ``"preprocessed"`` with ``data = {"preprocessor",
            "planes" (list of (h, w) float32), "mixture"}``.
        """
        from napari_pupick.preprocess import Preprocessor

        if layer is not None:
            self.set_micrographs(layer)
        self._require_micrographs()
        n = self.n_planes
        data = self.micrograph_layer.data
        fitted = preprocessor is not None
        if downsample is not None:
            self.downsample = downsample
        pre = preprocessor if fitted else Preprocessor(downsample=self.binning().factor, method=method)
        return self._preprocess_gen(data, n, pre, fitted)

    def _preprocess_gen(self, data, n, pre, fitted):
        from napari_pupick.preprocess import affine_normalize, downsample, fit_gmm, gmm_normalize, mixture_curve

        total = 2 * n + (0 if fitted else 1)
        binned = []
        for i in range(n):
            raw = np.asarray(data[i] if data.ndim == 3 else data, dtype=np.float32)
            if not np.isfinite(raw).all():
                raise MicrographError(f"micrograph {self.names[i]} (plane {i}) has NaN or infinite pixels")
            binned.append(downsample(raw, pre.downsample))
            yield LoopEvent("progress", i + 1, total, f"read and binned {i + 1}/{n}")
        scales = [None] * n
        if pre.method == "gmm":
            if not fitted:
                fit = fit_gmm(binned)
                pre.gmm, pre.scales_ = fit.gmm, fit.scales
                scales = [float(a) for a in fit.scales]
                yield LoopEvent("progress", n + 1, total, "fitted the pixel mixture")
        planes = []
        for i, b in enumerate(binned):
            if pre.method == "gmm":
                planes.append(gmm_normalize(b, pre.gmm, scales[i]))
            elif pre.method == "affine":
                planes.append(affine_normalize(b))
            else:
                planes.append(b.astype(np.float32, copy=False))
            yield LoopEvent("progress", total - n + i + 1, total, f"normalized {i + 1}/{n}")
        if pre.method == "gmm":
            sample = binned[:: max(1, n // 8)]
            sample_scales = None if scales[0] is None else scales[:: max(1, n // 8)]
            mixture = mixture_curve(sample, pre.gmm, sample_scales)
        else:
            sample = np.concatenate([p.ravel() for p in planes[:: max(1, n // 8)]])
            lo, hi = np.percentile(sample, [0.1, 99.9])
            counts, edges = np.histogram(sample, bins=256, range=(lo, hi), density=True)
            mixture = ((edges[:-1] + edges[1:]) / 2, counts, None, None)
        yield LoopEvent("preprocessed", total, total, f"normalized {n} micrograph(s) ({pre.method}, binned by "
                        f"{pre.downsample})", {"preprocessor": pre, "planes": planes, "mixture": mixture})

    def _apply_preprocessed(self, event: LoopEvent) -> None:
        pre, planes = event.data["preprocessor"], event.data["planes"]
        self.preprocessor = pre
        self.mixture = event.data.get("mixture")
        self.prepared = {i: p for i, p in enumerate(planes)}
        self.scores = {}
        stack = np.stack(planes) if self.stacked else planes[0]
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
        if self._alive(self.scores_layer):
            self.viewer.layers.remove(self.scores_layer)
            self.scores_layer = None
        self._emit("preprocessed")

    def preprocess(self, layer=None, downsample: int | str | None = None, method: str = "gmm", preprocessor=None):
        """Run :meth:`iter_preprocess` to completion here; returns the normalized Image layer."""
        self._drive(self.iter_preprocess(layer, downsample, method, preprocessor))
        return self.normalized_layer

    # ------------------------------------------------------------------------------------------------------------
    # 2. Labels

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
        layer.add(points.reshape(-1, 3 if self.stacked else 2))
        layer.selected_data = set()
        self._emit("labels")
        return int(keep.sum())

    def _find_points(self, name: str):
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            if type(layer).__name__ == "Points" and layer.ndim == (3 if self.stacked else 2):
                return layer
        return None

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
        return self._table(pos), self._table(neg)

    # ------------------------------------------------------------------------------------------------------------
    # 3. Train

    def iter_train(self, *, holdout_fraction: float = 0.0, init=None, seed: int = 0, **config
                   ) -> Iterator[LoopEvent]:
        """Train a model on the labels (a generator for a thread worker; layers are not touched).

        Training goes through the core's :func:`~napari_pupick.pipeline.training_run` with its defaults: the
        two-round :class:`~napari_pupick.autotrain.AutoTrainer` estimates the particle count (unless the session
        has ``expected_particles``) and calibrates the threshold, which the session then shows. Retraining
        (``init`` a Checkpoint) carries the model's calibration over, so it runs one round.

        The labels and normalized planes are taken now (on the calling thread); the trainer is built and run when
        the generator runs, so errors such as missing labels surface in the worker.

        Parameters
        ----------
        holdout_fraction : float
            0 (default): the AutoTrainer. Above 0: hold out this fraction of the labelled micrographs to measure
            average precision per epoch (a single round with an F2-optimal threshold, no count estimate).
        init : Checkpoint, optional
            Start from these weights (see :meth:`retrain`).
        seed : int
        **config
            :class:`~napari_pupick.training.TrainConfig` fields (``model``, ``model_params``, ``objective``,
            ``epochs``, ``steps_per_epoch``, ``device``, ``threads``...), and ``tta`` of training_run.

        Yields
        ------
        LoopEvent
            ``"train"`` per training event, then ``"trained"`` with the kept Checkpoint.
        """
        positives, negatives = self.labels()
        planes = dict(self.prepared)
        data = self.micrograph_layer.data
        args = dict(pre=self.preprocessor, names=list(self.names), radius=self.radius,
                    expected=self.expected_particles, margin=self.margin, pixel_size=self.pixel_size)
        return self._train_gen(positives, negatives, planes, data, holdout_fraction, init, seed, config, **args)

    def _train_gen(self, positives, negatives, planes, data, holdout_fraction, init, seed, config, *, pre, names,
                   radius, expected, margin, pixel_size):
        from napari_pupick.pipeline import split_holdout, training_run

        if len(positives) == 0:
            raise TrainingError("no positive labels: add the positives layer and click a few particles first")
        if pre is None or not planes:
            raise TrainingError("the micrographs are not preprocessed yet: run Preprocess first")
        labelled = [n for n in names if n in set(positives["micrograph"]) | set(negatives["micrograph"])]
        index = {n: i for i, n in enumerate(names)}
        raw = [data[index[n]] if data.ndim == 3 else data for n in labelled]
        holdout = split_holdout(labelled, positives, holdout_fraction, seed=seed) if holdout_fraction > 0 else []
        config = dict(config)
        config.setdefault("threads", 1)
        config.setdefault("device", self.device)
        calibration = (init.metrics or {}).get("calibration") if init is not None and init.metrics else None
        trainer = training_run(raw, labelled, positives, radius=float(radius), pixel_size=pixel_size,
                               expected_particles=expected, negatives=negatives if len(negatives) else None,
                               holdout=holdout, init=init if init is not None else "default", preprocessor=pre,
                               prepared=[planes[index[n]] for n in labelled], calibration=calibration,
                               margin=margin, seed=seed, **config)
        self._trainer = trainer
        total = 0
        try:
            for ev in trainer.run():
                total = ev.total_steps or total
                yield LoopEvent("train", ev.step, ev.total_steps, ev.message, ev)
        finally:
            self._trainer = None
        best = trainer.best
        if best is None:
            raise TrainingError("training stopped before the first step: no model to keep")
        metrics = best.metrics or {}
        if "threshold" in metrics:
            message = metrics.get("kept", "kept the model") + f"; threshold {metrics['threshold']:.2f}"
        else:
            message = "kept the model" + (f" (held-out AP {metrics['heldout_ap']:.3f})" if "heldout_ap" in metrics
                                          else "")
        yield LoopEvent("trained", total, total, message, best)

    def _apply_train(self, event: LoopEvent) -> None:
        if event.data.kind == "start":
            self.history = []
        self.history.append(event.data)
        self._emit("history")

    def _apply_trained(self, event: LoopEvent) -> None:
        self.set_model(event.data, keep_threshold=True)

    def stop(self) -> None:
        """Stop a running training at its next step; the best model so far is kept."""
        if self._trainer is not None:
            self._trainer.stop()

    def train(self, **kwargs):
        """Run :meth:`iter_train` to completion here; returns the kept Checkpoint (also ``self.checkpoint``)."""
        self._drive(self.iter_train(**kwargs))
        return self.checkpoint

    def retrain(self, **kwargs):
        """Train again from the current model with the corrected labels (positives, negatives, unlabeled)."""
        if self.checkpoint is None:
            raise TrainingError("no model to retrain: train one first (or load one)")
        return self.train(init=self.checkpoint, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # Models

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

    # ------------------------------------------------------------------------------------------------------------
    # 4. Predict and inspect

    def _planes(self, planes) -> list[int]:
        if planes is None or planes == "all":
            return list(range(self.n_planes))
        if planes == "current":
            return [self.current_plane()]
        if np.ndim(planes) == 0:
            planes = [planes]
        out = [int(p) for p in planes]
        bad = [p for p in out if not 0 <= p < self.n_planes]
        if bad:
            raise PupickError(f"planes {bad} are not among the {self.n_planes} micrographs")
        return out

    def iter_predict(self, planes=None, device: str | None = None, tile: int | None = None,
                     tta: bool | None = None) -> Iterator[LoopEvent]:
        """Score planes with the current model and extract picks (a generator for a thread worker).

        Parameters
        ----------
        planes : 'all' (default), 'current', an int or a list of ints
        device : 'auto', 'cpu', 'cuda', 'mps' (default: ``loop.device``)
        tile, tta : see :func:`napari_pupick.predict.score_micrograph` (``tta`` None: as the model was calibrated).

        Yields
        ------
        LoopEvent
            ``"scored"`` per plane (``data``: plane, logits, picks in original pixels, prepared image), then
            ``"predicted"``.
        """
        if self.checkpoint is None:
            raise ModelError("no model: train one (or load one) first")
        self._require_micrographs()
        planes = self._planes(planes)
        same = self.preprocessor is not None and self.preprocessor.to_dict() == dict(self.checkpoint.preprocess)
        cache = dict(self.prepared) if same else {}
        return self._predict_gen(self.checkpoint, planes, cache, self.micrograph_layer.data, list(self.names),
                                 self._nms_radius(), self.effective_margin(), device or self.device, tile, tta)

    def _nms_radius(self) -> float:
        return float(self.nms_radius) if self.nms_radius else float(self.radius)

    def _predict_gen(self, checkpoint, planes, cache, data, names, radius, margin, device, tile, tta):
        from napari_pupick.pipeline import Picker

        picker = Picker(checkpoint, device=device, tile=tile, tta=tta)
        n = len(planes)
        yield LoopEvent("progress", 0, n, f"scoring {n} micrograph(s) on {picker.device}")
        for k, plane in enumerate(planes):
            prepared = cache.get(plane)
            if prepared is None:
                prepared = picker.prepare(np.asarray(data[plane] if data.ndim == 3 else data))
            logits = picker.score(prepared, prepared=True)
            picks = picker.extract(logits, names[plane], radius=radius, threshold=NMS_THRESHOLD, margin=margin)
            yield LoopEvent("scored", k + 1, n, f"scored {names[plane]} ({k + 1}/{n}): {len(picks)} candidates",
                            {"plane": plane, "logits": logits, "picks": picks, "factor": picker.factor,
                             "prepared": prepared if plane not in cache else None})
        yield LoopEvent("predicted", n, n, f"scored {n} micrograph(s)")

    def _apply_scored(self, event: LoopEvent) -> None:
        d = event.data
        plane, logits, factor = d["plane"], d["logits"], d["factor"]
        self.scores[plane] = logits
        self._show_scores(plane, logits, factor)
        self._set_plane_picks(plane, d["picks"])

    def _apply_predicted(self, event: LoopEvent) -> None:
        self._emit("picks")

    def predict(self, planes=None, **kwargs) -> pd.DataFrame:
        """Run :meth:`iter_predict` to completion here; returns the picks above the threshold."""
        self._drive(self.iter_predict(planes, **kwargs))
        return self.picks_table()

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
        layer.refresh()

    def _picks_layer(self):
        if self._alive(self.picks_layer):
            return self.picks_layer
        with self._programmatic():
            layer = self._new_points(PICKS, _PICK_STYLE, features=pd.DataFrame({"score": np.zeros(0)}))
        layer.events.data.connect(self._on_picks_data)
        layer.events.features.connect(self._on_picks_features)
        self.picks_layer = layer
        return layer

    def _set_plane_picks(self, plane: int, picks: pd.DataFrame) -> None:
        """Replace the picks of one plane (picks within half a radius of a rejected pick stay rejected)."""
        layer = self._picks_layer()
        ndim = 3 if self.stacked else 2
        data = np.asarray(layer.data, float).reshape(-1, ndim)
        score = layer.features["score"].to_numpy(float) if len(data) else np.zeros(0)
        keep = np.rint(data[:, 0]).astype(int) != plane if self.stacked else np.zeros(len(data), bool)
        new = picks[["y", "x"]].to_numpy(float)
        new_score = picks["score"].to_numpy(float)
        _, negatives = self.labels()
        neg = negatives[negatives["micrograph"] == self.names[plane]][["y", "x"]].to_numpy(float)
        if len(neg) and len(new):
            from scipy.spatial import cKDTree

            distance, _ = cKDTree(neg).query(new, k=1)
            ok = distance > 0.5 * self.radius
            new, new_score = new[ok], new_score[ok]
        if self.stacked:
            new = np.column_stack([np.full(len(new), float(plane)), new])
        self._replace_picks(np.concatenate([data[keep], new.reshape(-1, ndim)]),
                            np.concatenate([score[keep], new_score]))

    def _replace_picks(self, data: np.ndarray, score: np.ndarray) -> None:
        layer = self._picks_layer()
        ndim = 3 if self.stacked else 2
        with self._programmatic():
            layer.selected_data = set()
            layer.data = np.asarray(data, float).reshape(-1, ndim)
            layer.features = pd.DataFrame({"score": np.asarray(score, float)})
            layer.size = 2 * self.radius
        self._apply_threshold()

    def reextract(self, radius: float | None = None, margin: float | None = None) -> None:
        """Extract the picks again from the cached score maps with a new NMS radius and/or edge margin
        (original pixels), without scoring again."""
        if radius is not None:
            self.nms_radius = float(radius)
        if margin is not None:
            self.margin = float(margin)
        if not self.scores:
            return
        from napari_pupick.extract import extract_picks

        s = int(self.scores_layer.metadata.get("downsample", self.factor)) if self._alive(self.scores_layer) \
            else self.factor
        for plane, logits in sorted(self.scores.items()):
            picks = extract_picks(logits, self._nms_radius() / s, threshold=NMS_THRESHOLD,
                                  margin=self.effective_margin() / s,
                                  factor=s, micrograph=self.names[plane])
            self._set_plane_picks(plane, picks)
        self._emit("picks")

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

    def picks_per_micrograph(self) -> pd.Series:
        """Number of picks at or above the threshold on each micrograph (all micrographs, 0 included)."""
        counts = self.picks_table()["micrograph"].value_counts()
        return pd.Series([int(counts.get(n, 0)) for n in self.names], index=self.names, name="picks")

    # -- corrections -------------------------------------------------------------------------------------------

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

    # ------------------------------------------------------------------------------------------------------------
    # 6. Export

    def export(self, path, format: str | None = None, per_micrograph: bool = False, suffix: str = ""):
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

    # ------------------------------------------------------------------------------------------------------------
    # Driving generators

    def handle(self, event: LoopEvent) -> None:
        """Apply one event of a job to the layers (call on the main thread, e.g. from ``worker.yielded``)."""
        apply = getattr(self, f"_apply_{event.kind}", None)
        if apply is not None:
            apply(event)

    def _drive(self, events) -> None:
        for event in events:
            self.handle(event)

