"""Dense, fully convolutional positive-unlabeled training, as a generator of progress events.

Every step takes ``batch_size`` square tiles from the training micrographs and runs ONE forward pass over them:
every output cell of every tile is a training example (labelled positive, explicitly negative, or unlabeled), so
a step sees thousands of regions instead of the few hundred single crops a region-by-region sampler gets.

Label maps (one per micrograph, on the model's output grid, computed once): output cell ``(i, j)`` sits on pixel
``(stride * i, stride * j)``; it is

- positive (1) when its centre is within ``label_radius`` of a labelled particle (the cell nearest to the
  particle always is, so no label is lost when the radius is below the grid step),
- negative (2) when within ``label_radius`` of a rejected pick (and not positive),
- unlabeled (0) otherwise.

Tiles: side ``T = stride * n + 1`` pixels at origins that are multiples of the stride, so a tile's output cells
are exactly a slice of the micrograph's label map, and a 90-degree rotation or a flip of the tile maps cell
centres onto cell centres (the label slice is rotated with it). Half of the tiles (``positive_tiles``) are
placed so that a randomly chosen labelled particle lies inside; the others are uniform.

Tile edges: a cell whose receptive field crosses a tile side that lies inside the micrograph sees zero padding
where whole-micrograph scoring shows it real pixels. ``tile_margin`` (a fraction of half the receptive field)
leaves ``ceil(tile_margin * (receptive_field // 2) / stride)`` cells along such sides out of the loss (sides on the
micrograph border are always kept: scoring sees the same padding there). The default, 0, keeps every cell: the
partly padded cells act as an occlusion augmentation and the extra examples per step win; measured on
apoferritin (100 labels, 100 steps) held-out AP 0.974 / 0.962 / 0.972 for margins 0 / 0.5 / 1, and on the
synthetic benchmark 0.76 / 0.70 / 0.67.

Class prior pi (the expected fraction of positive cells among the UNLABELED cells of micrograph m)::

    pi_m = max(n_expected - n_m, 0) * A / (C_m - n_m * A)

with ``n_expected`` the expected particles per micrograph, ``n_m`` the labelled particles on it, ``C_m`` its
number of output cells and ``A`` the mean number of positive cells per labelled particle (measured from the
label maps: about ``pi r^2 / stride^2`` cells, at least 1). It is a 2-D area count, clipped to [1e-4, 0.5].
Giving ``pi`` in the config overrides it for every micrograph. Objectives that need one prior get the mean over
the unlabeled cells of the step; GE-binomial uses the mean of each group.

Defaults, by measurement (one CPU thread, random start; details in the project notes): 5 epochs of 20 steps
of 8 tiles of 129 pixels, Adam at 2e-3 with a 10-step warm-up and cosine decay, the output bias initialised
to logit(pi). With the default conv3 a step takes about 0.2 s (44,000 output cells per second, against about 240
crops per second for a crop-by-crop sampler), so training takes 20-30 s. Held-out AP (match radius half the
particle radius): apoferritin, 100 labels on 5 micrographs, 14 held out: 0.96 after 100 steps (0.90-0.93 after 20);
synthetic, 50 labels, mean of 9 runs (3 data sets x 3 seeds), AP at the end of training: GE-binomial 0.87,
GE-KL 0.90, nnPU 0.85 (3 runs), PN 0.80. Longer schedules overfit 50 labels (AP fell by 0.05-0.15 between
epochs 5 and 10 on synthetic data), so the default stays short; a holdout keeps the best epoch.

Divergence: a step's forward pass checks the weights of the step before it (its logits must be finite and within
``max_logit``, its loss finite, at most ``max_loss`` and at most ``max_loss_growth`` times the first step's loss,
floored at 1), then its gradients and the new weights must be finite, and the new weights must score a fixed
probe tile (drawn once from its own random stream, scored in eval mode on a copy, as picking does; about 1 % of a
step's time) with logits that pass the same test. Only weights that passed are kept; when a step's forward pass
fails, the weights before it are dropped too (the weights of the step before them are kept). On a failed check
the run restores the last good weights into the model, yields an ``"error"`` event that says which step's
weights are kept, then raises ``TrainingError``; ``trainer.best`` and ``trainer.latest`` hold those weights
(None when no step was good: a retrain then keeps the model it started from).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from napari_pupick.errors import CoordinateError, ModelError, TrainingError
from napari_pupick.models import Decoder, PickerNet, build_model
from napari_pupick.objectives import OBJECTIVES, compute_loss

__all__ = ["Checkpoint", "TrainConfig", "TrainEvent", "Trainer", "label_map", "train"]

CHECKPOINT_FORMAT = "napari-pupick-checkpoint"
CHECKPOINT_VERSION = 1

UNLABELED, POSITIVE, NEGATIVE, EXCLUDED = 0, 1, 2, -1


@dataclass
class TrainConfig:
    """Training settings (lengths in binned pixels, i.e. pixels of the images given to the trainer).

    Attributes
    ----------
    model, model_params : architecture name and ``build_model`` keyword arguments.
    objective : ``"ge-binomial"`` (default), ``"ge-kl"``, ``"nnpu"`` or ``"pn"``.
    label_radius : r: output cells within r of a labelled particle are positive.
    particle_radius : particle radius: NMS radius for held-out evaluation (also stored for picking).
    expected_particles : expected particles per micrograph, which sets pi (see the module docstring).
    pi : the prior directly (overrides ``expected_particles``).
    epochs, steps_per_epoch : schedule; held-out AP is measured after every epoch.
    batch_size : tiles per step.
    tile : tile side in pixels (rounded to ``stride * n + 1``, shrunk to fit the smallest micrograph).
    lr, weight_decay : Adam settings; the learning rate follows a cosine decay to ``lr * lr_final`` after a
        linear warm-up of ``warmup`` steps.
    autoencoder : gamma of the reconstruction term (0: off).
    negative_weight : weight of the explicit-negative term.
    ge_lambda : lambda of the GE objectives (None: 1 for ge-binomial, 10 for ge-kl).
    ge_group : unlabeled cells per group for GE-binomial (the paper's minibatch, 256).
    nnpu_beta : beta of nnPU.
    positive_tiles : fraction of the tiles of a step placed over a labelled particle.
    tile_margin : fraction of half the receptive field left out of the loss along inner tile sides.
    match_fraction : held-out picks match a particle within ``match_fraction * particle_radius``.
    eval_threshold : logit threshold of the held-out NMS.
    eval_every : also evaluate every this many steps (0: at epoch ends only).
    max_loss : a loss above this counts as diverged.
    max_loss_growth : so does a loss above this many times the first step's loss (floored at 1).
    max_logit : and a logit above this in absolute value (a trained model's logits stay within about 30).
    seed, device, threads, augment : reproducibility, device (``predict.select_device``), torch CPU threads during
        training (None: 1), random 90-degree rotations and flips of the tiles.
    ema : decay of an exponential moving average of the weights (0: off); when on, the averaged weights are
        the ones evaluated and saved.
    """

    model: str = "conv3"
    model_params: dict = field(default_factory=dict)
    objective: str = "ge-binomial"
    label_radius: float = 3.0
    particle_radius: float = 8.0
    expected_particles: float | None = None
    pi: float | None = None
    epochs: int = 5
    steps_per_epoch: int = 20
    batch_size: int = 8
    tile: int = 129
    lr: float = 2e-3
    lr_final: float = 0.05
    warmup: int = 10
    weight_decay: float = 0.0
    autoencoder: float = 0.0
    negative_weight: float = 1.0
    ge_lambda: float | None = None
    ge_group: int = 256
    nnpu_beta: float = 0.0
    positive_tiles: float = 0.5
    tile_margin: float = 0.0
    match_fraction: float = 0.5
    eval_threshold: float = -8.0
    eval_every: int = 0
    max_loss: float = 1e6
    max_loss_growth: float = 100.0
    max_logit: float = 1e3
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    augment: bool = True
    ema: float = 0.0

    @property
    def total_steps(self) -> int:
        return int(self.epochs) * int(self.steps_per_epoch)

    def to_dict(self) -> dict:
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(d or {}).items() if k in names})


@dataclass
class TrainEvent:
    """One progress report of ``Trainer.run()``.

    ``kind`` is ``"start"``, ``"step"``, ``"epoch"`` (after an epoch's held-out evaluation), ``"done"``,
    ``"stopped"`` or ``"error"``. ``losses`` holds the step's loss terms as floats; ``heldout_ap`` the latest
    held-out average precision (None without a holdout or before the first evaluation); ``examples_per_s`` the
    output cells entering the loss per second of training so far. ``monitor`` is set by
    :class:`~napari_pupick.autotrain.AutoTrainer`: ``label_recall`` (recall of labels held out of training at the
    calibrated threshold), ``precision`` (estimated precision there), ``threshold`` (logit) and ``expected``
    (estimated particles per micrograph); None when not known.
    """

    kind: str
    step: int = 0
    epoch: int = 0
    total_steps: int = 0
    losses: dict = field(default_factory=dict)
    heldout_ap: float | None = None
    examples_per_s: float = 0.0
    message: str = ""
    monitor: dict | None = None


def _plain(obj):
    """Convert numpy scalars/arrays, tuples and paths to plain Python types (for weights_only loading)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj
    return str(obj)


@dataclass
class Checkpoint:
    """A trained model with everything needed to use it again.

    Attributes
    ----------
    model : str
        Architecture name (``build_model``).
    model_params : dict
        Its hyperparameters.
    state_dict : dict of str -> Tensor
        The weights (on the CPU).
    preprocess : dict
        ``Preprocessor.to_dict()`` of the normalization and downsampling it was trained with.
    config : dict
        The ``TrainConfig`` as a dict.
    history : list of dict
        ``step, epoch, losses, heldout_ap`` of every evaluation (and the last step).
    metrics : dict
        ``heldout_ap`` (best held-out AP), ``step``, ``epoch``, ``threshold_f2`` (F2-optimal logit threshold on the
        held-out micrographs), when known.
    created : str
        ISO time stamp.
    """

    model: str
    model_params: dict
    state_dict: dict
    preprocess: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    created: str = ""

    def build(self, device=None) -> PickerNet:
        """The model with these weights, in eval mode, on ``device`` (default: the CPU)."""
        try:
            net = build_model(self.model, **self.model_params)
            net.load_state_dict(self.state_dict)
        except (RuntimeError, KeyError, TypeError) as exc:
            raise ModelError(f"checkpoint weights do not fit model {self.model!r} {self.model_params}: {exc}") \
                from None
        if device is not None:
            from napari_pupick.predict import select_device

            net = net.to(device if isinstance(device, torch.device) else select_device(device))
        return net.eval()

    def to_dict(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": self.model,
                "model_params": _plain(self.model_params),
                "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()},
                "preprocess": _plain(self.preprocess or {}), "config": _plain(self.config or {}),
                "history": _plain(self.history or []), "metrics": _plain(self.metrics or {}),
                "created": str(self.created)}

    def save(self, path) -> Path:
        """Write the checkpoint atomically (``io.atomic``: mode from the umask; a failure leaves ``path`` as it was)."""
        from napari_pupick.io.atomic import atomic_write

        path = Path(path)
        if not path.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
        d = self.to_dict()

        def write(tmp):
            with open(tmp, "wb") as fh:  # our own handle: closed whatever torch.save does on a failure
                torch.save(d, fh)

        return atomic_write([(path, write)])[0]

    @classmethod
    def load(cls, path) -> Checkpoint:
        """Read a checkpoint written by ``save`` (with ``torch.load(weights_only=True)``, onto the CPU).

        Raises
        ------
        ModelError
            If the file is missing, not a torch file, or not a napari-pupick checkpoint.
        """
        path = Path(path)
        if path.is_dir():
            raise ModelError(f"{path}: is a folder, not a checkpoint file")
        if not path.is_file():
            raise ModelError(f"{path}: no such checkpoint file")
        looks = checkpoint_problem(path)
        if looks:
            raise ModelError(f"{path}: not a napari-pupick checkpoint ({looks}; pupick train writes one, a .pt file)")
        try:
            d = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:  # torch raises many kinds (UnpicklingError, RuntimeError, EOFError...)
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise ModelError(f"{path}: not a readable napari-pupick checkpoint ({type(exc).__name__}: {first})") \
                from None
        if not isinstance(d, dict) or d.get("format") != CHECKPOINT_FORMAT:
            raise ModelError(f"{path}: not a napari-pupick checkpoint (no '{CHECKPOINT_FORMAT}' format tag)")
        if int(d.get("version", 0)) > CHECKPOINT_VERSION:
            raise ModelError(f"{path}: checkpoint version {d.get('version')} is newer than this napari-pupick "
                             f"reads ({CHECKPOINT_VERSION}); upgrade napari-pupick")
        try:
            ckpt = cls(model=d["model"], model_params=dict(d["model_params"]), state_dict=dict(d["state_dict"]),
                       preprocess=dict(d.get("preprocess") or {}), config=dict(d.get("config") or {}),
                       history=list(d.get("history") or []), metrics=dict(d.get("metrics") or {}),
                       created=str(d.get("created", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{path}: incomplete napari-pupick checkpoint (missing {exc})") from None
        bad = [k for k, v in ckpt.state_dict.items()
               if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise ModelError(f"{path}: the checkpoint's weights hold NaN or infinite values ({len(bad)} of "
                             f"{len(ckpt.state_dict)} tensors, e.g. {bad[0]}); it cannot score micrographs")
        return ckpt


def checkpoint_problem(path) -> str:
    """Why the file cannot be a checkpoint from its first bytes ('' when it may be one): torch writes zip files."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):  # torch's zip format, or a legacy pickle
        return ""
    if not head:
        return "the file is empty"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "not a torch file"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"a text file starting {first!r}" + (": coordinates?" if text.lstrip().startswith(("data_", "#", "_rln"))
                                                  or "," in first else "")


# ----------------------------------------------------------------------------------------------------------------
# Label maps and tiles


def _disc_cells(x: float, y: float, radius: float, stride: int, shape: tuple) -> tuple:
    """Row and column indices of the output cells within ``radius`` of (x, y), plus the nearest cell."""
    h, w = shape
    r = max(float(radius), 0.0)
    i0, i1 = max(int(math.floor((y - r) / stride)), 0), min(int(math.ceil((y + r) / stride)), h - 1)
    j0, j1 = max(int(math.floor((x - r) / stride)), 0), min(int(math.ceil((x + r) / stride)), w - 1)
    ii, jj = np.mgrid[i0 : i1 + 1, j0 : j1 + 1]
    inside = (stride * ii - y) ** 2 + (stride * jj - x) ** 2 <= r * r
    ni = min(max(int(round(y / stride)), 0), h - 1)
    nj = min(max(int(round(x / stride)), 0), w - 1)
    rows = np.append(ii[inside], ni)
    cols = np.append(jj[inside], nj)
    return rows, cols


def label_map(shape: tuple, stride: int, positives: np.ndarray, radius: float,
              negatives: np.ndarray | None = None) -> np.ndarray:
    """Labels of the output cells of one micrograph.

    Parameters
    ----------
    shape : (H, W) of the micrograph (binned pixels).
    stride : the model's stride (output cell (i, j) sits on pixel (stride*i, stride*j)).
    positives, negatives : arrays of shape (n, 2) of (x, y) in pixels.
    radius : label radius r in pixels.

    Returns
    -------
    ndarray of shape (ceil(H / stride), ceil(W / stride)), int8
        0 unlabeled, 1 positive, 2 negative.
    """
    h, w = -(-int(shape[0]) // stride), -(-int(shape[1]) // stride)
    labels = np.zeros((h, w), np.int8)
    if negatives is not None:
        for x, y in np.asarray(negatives, float).reshape(-1, 2):
            labels[_disc_cells(x, y, radius, stride, (h, w))] = NEGATIVE
    for x, y in np.asarray(positives, float).reshape(-1, 2):
        labels[_disc_cells(x, y, radius, stride, (h, w))] = POSITIVE
    return labels


def _points(table: pd.DataFrame | None, name: str) -> np.ndarray:
    if table is None or len(table) == 0:
        return np.zeros((0, 2))
    sel = table[table["micrograph"] == name]
    return sel[["x", "y"]].to_numpy(dtype=float).reshape(-1, 2)


def _check_table(table, what: str) -> pd.DataFrame | None:
    if table is None:
        return None
    missing = {"micrograph", "x", "y"} - set(table.columns)
    if missing:
        raise CoordinateError(f"{what} table lacks column(s) {sorted(missing)} (needs micrograph, x, y)")
    out = table[["micrograph", "x", "y"]].copy()
    out["micrograph"] = out["micrograph"].astype(str)
    xy = out[["x", "y"]].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        row = out.iloc[i]
        raise CoordinateError(f"{what}: {int(bad.sum())} row(s) without finite coordinates, e.g. row {i + 1} "
                              f"(micrograph {row['micrograph']}, x={row['x']}, y={row['y']}); remove them before "
                              f"training")
    out[["x", "y"]] = xy
    return out


class _Mic:
    """One training micrograph: its image, label map and prior."""

    def __init__(self, name, image, labels, pi, n_pos):
        self.name, self.image, self.labels, self.pi, self.n_pos = name, image, labels, pi, n_pos
        self.pos_cells = np.argwhere(labels == POSITIVE)


# ----------------------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Dense PU training as a generator of ``TrainEvent`` (see the module docstring).

    Parameters
    ----------
    images : list of (H, W) float arrays
        Normalized, already binned micrographs.
    names : list of str
        One name per image (the ``micrograph`` values of the tables).
    positives : DataFrame
        Labelled particles: ``micrograph, x, y`` in these images' pixels.
    config : TrainConfig
    negatives : DataFrame, optional
        Rejected picks (same format): regions the model must score low.
    holdout : sequence of str
        Micrographs held out of training; their positives are the truth of the held-out AP.
    init : Checkpoint, optional
        Start from these weights (retraining); its architecture is used.
    preprocess : dict, optional
        ``Preprocessor.to_dict()``, stored in the checkpoints.

    Raises
    ------
    TrainingError
        No positive labels to train on, no prior (neither ``expected_particles`` nor ``pi``), bad settings.
    CoordinateError
        Tables without the needed columns, naming unknown micrographs, or with points outside their image.
    """

    def __init__(self, images: Sequence, names: Sequence[str], positives: pd.DataFrame,
                 config: TrainConfig | None = None, negatives: pd.DataFrame | None = None,
                 holdout: Sequence[str] = (), init: Checkpoint | None = None, preprocess: dict | None = None):
        self.config = cfg = copy.deepcopy(config) if config is not None else TrainConfig()
        self.preprocess = dict(preprocess or {})
        self.init = init
        names = [str(n) for n in names]
        if len(images) != len(names):
            raise TrainingError(f"{len(images)} images but {len(names)} names")
        if len(set(names)) != len(names):
            raise TrainingError("micrograph names are not unique")
        if cfg.objective not in OBJECTIVES:
            raise TrainingError(f"unknown objective {cfg.objective!r}: choose one of {sorted(OBJECTIVES)}")
        positives = _check_table(positives, "positive labels")
        negatives = _check_table(negatives, "negative labels")
        if positives is None or len(positives) == 0:
            raise TrainingError("no positive labels: mark a few particles before training")
        holdout = [str(h) for h in holdout]
        for what, table in (("positive labels", positives), ("negative labels", negatives)):
            if table is None:
                continue
            unknown = sorted(set(table["micrograph"]) - set(names))
            if unknown:
                raise CoordinateError(f"{what} name micrographs that are not among the images: {unknown[:5]}")
        unknown = sorted(set(holdout) - set(names))
        if unknown:
            raise TrainingError(f"held-out micrographs are not among the images: {unknown[:5]}")
        unlabeled_holdout = sorted(set(holdout) - set(positives["micrograph"]))
        if unlabeled_holdout:
            raise TrainingError(f"held-out micrographs without labels (no truth to measure AP against): "
                                f"{unlabeled_holdout[:5]}")
        train_names = [n for n in names if n not in set(holdout)]
        if not (positives["micrograph"].isin(train_names)).any():
            raise TrainingError("no positive labels on the training micrographs (all labelled micrographs are held "
                                "out)")
        if cfg.pi is None and cfg.expected_particles is None:
            raise TrainingError("set expected_particles (per micrograph) or pi: the prior cannot be guessed")
        if cfg.total_steps < 1:
            raise TrainingError(f"nothing to train: epochs={cfg.epochs}, steps_per_epoch={cfg.steps_per_epoch}")

        self.device = None
        self._images = {n: np.ascontiguousarray(np.asarray(im, dtype=np.float32)) for n, im in zip(names, images)}
        for n, im in self._images.items():
            if im.ndim != 2:
                raise TrainingError(f"micrograph {n}: expected a 2-D image, got shape {im.shape}")
            if not np.isfinite(im).all():
                raise TrainingError(f"micrograph {n}: contains NaN or infinite pixels")
            for what, table in (("positive label", positives), ("negative label", negatives)):
                pts = _points(table, n)
                if len(pts):
                    h, w = im.shape
                    bad = (pts[:, 0] < -1) | (pts[:, 0] > w) | (pts[:, 1] < -1) | (pts[:, 1] > h)  # 1 px of slack
                    if bad.any():
                        x, y = pts[bad][0]
                        raise CoordinateError(
                            f"micrograph {n}: {int(bad.sum())} {what}(s) outside the {w} x {h} image, e.g. "
                            f"x={x:g}, y={y:g} (coordinates must be in the binned image's pixels)")
        self.names = names
        self.train_names = train_names
        self.holdout = holdout
        self.positives = positives
        self.negatives = negatives
        self._stop = False
        self._best: Checkpoint | None = None
        self._best_ap: float | None = None
        self._good: list = []  # (state, step, epoch) of the two newest weights known to be good, oldest first
        self._initial_state: dict | None = None
        self._probe = None  # fixed tile that checks weights before they are kept
        self._probe_net: PickerNet | None = None
        self._loss_start: float | None = None
        self.step = 0  # steps taken
        self.history: list = []
        self.metrics: dict = {}
        self.model: PickerNet | None = None
        self.decoder: Decoder | None = None
        self._channels_last = False
        self.pi_by_micrograph: dict = {}

    # -- public state ------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask ``run()`` to stop before its next step (it then yields a ``"stopped"`` event)."""
        self._stop = True

    @property
    def best(self) -> Checkpoint | None:
        """Best checkpoint so far: highest held-out AP, or the latest good weights without a holdout."""
        if self._best is not None:
            return self._best
        return self.latest

    @property
    def latest(self) -> Checkpoint | None:
        """The latest weights known to be good (None before the first step, or when no step's weights were)."""
        if not self._good:
            return None
        return self._checkpoint(self._latest_state)

    @property
    def _latest_state(self) -> dict | None:
        return self._good[-1][0] if self._good else None

    @property
    def _latest_step(self) -> int:
        return self._good[-1][1] if self._good else 0

    def _probe_problem(self, state: dict) -> str | None:
        """What is wrong with the logits these weights give on the probe tile (eval mode, on a copy), or None."""
        if self._probe_net is None:
            self._probe_net = build_model(self.config.model, **self.config.model_params).eval()
        net = self._probe_net
        with torch.no_grad():
            net.load_state_dict(state)
            logits = net.classify(net.encode(self._probe))
        return self._bad_logits(logits)

    # -- setup -------------------------------------------------------------------------------------------------

    def _build(self):
        cfg = self.config
        if self.init is not None:
            name, params = self.init.model, dict(self.init.model_params)
        else:
            name, params = cfg.model, dict(cfg.model_params)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = build_model(name, **params)
            decoder = Decoder(model.features, model.stride) if cfg.autoencoder > 0 else None
        if self.init is not None:
            try:
                model.load_state_dict(self.init.state_dict)
            except RuntimeError as exc:
                raise TrainingError(f"initial checkpoint does not fit model {name!r}: {exc}") from None
        cfg.model, cfg.model_params = model.name, dict(model.hparams)
        return model, decoder

    def _prepare(self, model: PickerNet):
        cfg = self.config
        s, rf = model.stride, model.receptive_field
        mics = []
        counts = []
        for n in self.train_names:
            img = self._images[n]
            pos, neg = _points(self.positives, n), _points(self.negatives, n)
            labels = label_map(img.shape, s, pos, cfg.label_radius, neg)
            mics.append(_Mic(n, img, labels, 0.0, len(pos)))
            if len(pos):
                counts.append(int((labels == POSITIVE).sum()) / len(pos))
        area = float(np.mean(counts)) if counts else 1.0  # A: positive cells per labelled particle
        for m in mics:
            if cfg.pi is not None:
                m.pi = float(cfg.pi)
            else:
                cells = m.labels.size
                pi = max(float(cfg.expected_particles) - m.n_pos, 0.0) * area / max(cells - m.n_pos * area, 1.0)
                m.pi = float(min(max(pi, 1e-4), 0.5))
            self.pi_by_micrograph[m.name] = m.pi
        self.cells_per_particle = area
        # Tile side stride * n + 1, no larger than the smallest training micrograph.
        smallest = min(min(m.image.shape) for m in mics)
        if smallest < 2 * s + 1:
            small = next(m.name for m in mics if min(m.image.shape) == smallest)
            raise TrainingError(f"micrograph {small} is too small to train on ({smallest} pixels across; at least "
                                f"{2 * s + 1} needed)")
        n_cells = max(1, (min(int(cfg.tile), smallest) - 1) // s)
        self.tile = s * n_cells + 1
        margin = float(cfg.tile_margin) * (rf // 2)
        self.margin_cells = min(int(math.ceil(margin / s)), n_cells // 2)
        self._mics = mics
        pos_weights = np.array([len(m.pos_cells) for m in mics], float)
        self._pos_p = pos_weights / pos_weights.sum()
        area_w = np.array([m.image.size for m in mics], float)
        self._area_p = area_w / area_w.sum()

    def _tile(self, rng: np.random.Generator, anchored: bool):
        s, T = self.model.stride, self.tile
        n = (T - 1) // s  # tile cells per side: n + 1
        if anchored:
            m = self._mics[rng.choice(len(self._mics), p=self._pos_p)]
        else:
            m = self._mics[rng.choice(len(self._mics), p=self._area_p)]
        H, W = m.image.shape
        max_oy, max_ox = (H - T) // s, (W - T) // s  # origins in cells
        if anchored:
            ci, cj = m.pos_cells[rng.integers(len(m.pos_cells))]
            oy, ox = self._anchor(rng, ci, n, max_oy), self._anchor(rng, cj, n, max_ox)
        else:
            oy, ox = int(rng.integers(0, max_oy + 1)), int(rng.integers(0, max_ox + 1))
        y0, x0 = oy * s, ox * s
        image = m.image[y0 : y0 + T, x0 : x0 + T]
        labels = m.labels[oy : oy + n + 1, ox : ox + n + 1].copy()
        k = self.margin_cells
        if k:
            if y0 > 0:
                labels[:k] = EXCLUDED
            if y0 + T < H - (s - 1):
                labels[n + 1 - k :] = EXCLUDED
            if x0 > 0:
                labels[:, :k] = EXCLUDED
            if x0 + T < W - (s - 1):
                labels[:, n + 1 - k :] = EXCLUDED
        if self.config.augment:
            rot = int(rng.integers(4))
            image, labels = np.rot90(image, rot), np.rot90(labels, rot)
            if rng.integers(2):
                image, labels = image[:, ::-1], labels[:, ::-1]
        return np.ascontiguousarray(image), np.ascontiguousarray(labels), m.pi

    def _anchor(self, rng, c: int, n: int, max_o: int) -> int:
        """A tile origin (in cells) placing cell ``c`` inside the tile's loss region."""
        lo, hi = self.margin_cells, n - self.margin_cells
        a, b = max(c - hi, 0), min(c - lo, max_o)
        if a > b:  # near the micrograph border: the tile sits on the border, where no margin is dropped
            return int(min(max(c - n // 2, 0), max_o))
        return int(rng.integers(a, b + 1))

    def _batch(self, rng):
        cfg = self.config
        b = int(cfg.batch_size)
        n_anchor = int(round(cfg.positive_tiles * b))
        tiles = [self._tile(rng, i < n_anchor) for i in range(b)]
        x = torch.from_numpy(np.stack([t[0] for t in tiles]))[:, None]
        y = torch.from_numpy(np.stack([t[1] for t in tiles]))
        pi = torch.tensor([t[2] for t in tiles], dtype=torch.float32)[:, None, None].expand(y.shape)
        return x, y, pi

    def _checkpoint(self, state: dict, metrics: dict | None = None) -> Checkpoint:
        return Checkpoint(model=self.config.model, model_params=dict(self.config.model_params),
                          state_dict={k: v.clone() for k, v in state.items()}, preprocess=dict(self.preprocess),
                          config=self.config.to_dict(), history=copy.deepcopy(self.history),
                          metrics=dict(self.metrics if metrics is None else metrics),
                          created=datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def _snapshot(self) -> dict:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    # -- evaluation ----------------------------------------------------------------------------------------------

    def evaluate(self, model: PickerNet | None = None) -> dict:
        """Held-out average precision (and the F2-optimal threshold) of ``model`` (default: the current one).

        The held-out micrographs are scored whole (``predict.score_micrograph``), picked by NMS with radius
        ``particle_radius`` above ``eval_threshold``, and matched to their labelled particles within
        ``match_fraction * particle_radius``. Returns {} without a holdout.
        """
        from napari_pupick.extract import nms
        from napari_pupick.metrics import evaluate
        from napari_pupick.predict import score_micrograph

        if not self.holdout:
            return {}
        model = self.model if model is None else model
        cfg = self.config
        tables = []
        for n in self.holdout:
            scores = score_micrograph(model, self._images[n], device=self.device)
            picks = nms(scores, cfg.particle_radius, threshold=cfg.eval_threshold)
            picks.insert(0, "micrograph", n)
            tables.append(picks)
        picks = pd.concat(tables, ignore_index=True)
        truth = self.positives[self.positives["micrograph"].isin(self.holdout)]
        radius = cfg.match_fraction * cfg.particle_radius
        result = evaluate(picks, truth, radius, beta=2.0)
        out = {"heldout_ap": float(result["ap"]), "precision_at_90": float(result["precision_at_90"]),
               "match_radius": float(radius)}
        if np.isfinite(result["threshold"]):
            out["threshold_f2"] = float(result["threshold"])
            out["f2"] = float(result["fbeta"])
        return out

    # -- the loop ------------------------------------------------------------------------------------------------

    def run(self) -> Iterator[TrainEvent]:
        """Train, yielding a ``TrainEvent`` at the start, after every step, after every epoch and at the end.

        Stops early (event ``"stopped"``) after ``stop()``; closing the generator also ends it. On a non-finite
        or diverging loss yields an ``"error"`` event, then raises ``TrainingError``.
        """
        from napari_pupick.predict import set_threads

        previous_threads = set_threads(self.config.threads or 1)
        try:
            yield from self._run()
        finally:
            set_threads(previous_threads)

    def _setup(self):
        from napari_pupick.predict import select_device

        cfg = self.config
        self.device = select_device(cfg.device)
        model, decoder = self._build()
        self._channels_last = self.device.type == "cpu"  # oneDNN: about 30% faster steps in this layout
        self.model = model.to(self.device)
        if self._channels_last:
            self.model = model.to(memory_format=torch.channels_last)
        self._prepare(model)
        if self.init is None or (self.init.metrics or {}).get("general"):
            # Start at the prior (also from a general starting model, whose bias fits its synthetic data): every region scores logit(pi), where the GE objectives are near their minimum,
            # so the first steps learn to separate particles instead of driving all scores down.
            prior = float(np.mean([m.pi for m in self._mics]))
            with torch.no_grad():
                model.head.bias.fill_(math.log(prior / (1 - prior)))
        self.decoder = decoder.to(self.device) if decoder is not None else None
        self._params = list(model.parameters()) + (list(decoder.parameters()) if decoder is not None else [])
        self.optimizer = torch.optim.Adam(self._params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        total, warmup = cfg.total_steps, max(int(cfg.warmup), 0)

        def lr_factor(step):  # step counts from 0: linear warm-up, then cosine decay to lr_final
            if step < warmup:
                return (step + 1) / warmup
            t = (step - warmup) / max(total - warmup, 1)
            return cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * t))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        self._rng = np.random.default_rng(cfg.seed)
        lam = cfg.ge_lambda if cfg.ge_lambda is not None else (10.0 if cfg.objective == "ge-kl" else 1.0)
        self._loss_kw = dict(lam=lam, group=cfg.ge_group, generator=torch.Generator().manual_seed(cfg.seed),
                             beta=cfg.nnpu_beta)
        self._ema = self._snapshot() if cfg.ema > 0 else None
        self._initial_state = self._snapshot()
        probe_rng = np.random.default_rng([int(cfg.seed), 7])  # its own stream: the training batches do not change
        side = min(self.tile, 16 * self.model.stride + 1)  # one small tile: about 1 % of a step's time
        self._probe = self._batch(probe_rng)[0][:1, :, :side, :side].float()

    def _step(self) -> tuple:
        """One optimisation step: returns (loss terms, examples in the loss, None or what went wrong)."""
        cfg, model, decoder = self.config, self.model, self.decoder
        x, y, pi = self._batch(self._rng)
        x, y, pi = x.to(self.device), y.to(self.device), pi.to(self.device)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = model.encode(x)
        logits = model.classify(feats)[:, 0]
        pos, unl, neg = y == POSITIVE, y == UNLABELED, y == NEGATIVE
        loss, terms = compute_loss(cfg.objective, logits[pos], logits[unl], pi[unl],
                                   logit_n=logits[neg] if bool(neg.any()) else None,
                                   negative_weight=cfg.negative_weight, **self._loss_kw)
        if decoder is not None:
            rec = ((decoder(feats, x.shape[-2:]) - x) ** 2).mean()
            loss = loss + cfg.autoencoder * rec
            terms["reconstruction"] = float(rec.detach())
            terms["loss"] = float(loss.detach())
        n = int(pos.sum() + unl.sum() + neg.sum())
        bad = self._bad_logits(logits.detach()) or self._exploded(loss)
        if bad is not None and self._good:  # these logits are the previous weights': they are not good
            self._good.pop()
        if bad is None:
            bad = self._diverged(loss)
        if bad is None:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            bad = self._bad_gradients(self._params)
        if bad is None:
            self.optimizer.step()
            self.scheduler.step()
            bad = self._bad_weights(self._params)
        return terms, n, bad

    def _update_average(self, step: int) -> None:
        """Exponential moving average of the weights (decay ramped up as min(ema, (1 + t) / (10 + t)))."""
        decay = min(float(self.config.ema), (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                avg = self._ema[k]
                if avg.is_floating_point():
                    avg.mul_(decay).add_(v.detach().to(avg.device), alpha=1 - decay)
                else:
                    avg.copy_(v)

    def _run(self) -> Iterator[TrainEvent]:
        cfg = self.config
        self._setup()
        total = cfg.total_steps
        ap = None
        terms: dict = {}
        msg = (f"training {self.model.name} on {len(self._mics)} micrograph(s), "
               f"{int(sum(m.n_pos for m in self._mics))} labels, pi ~ {np.mean([m.pi for m in self._mics]):.4g}, "
               f"tile {self.tile}, {self.device}")
        yield TrainEvent("start", 0, 0, total, message=msg)
        examples, t_train, step = 0, 0.0, 0
        for epoch in range(1, int(cfg.epochs) + 1):
            self.model.train()
            for _ in range(int(cfg.steps_per_epoch)):
                if self._stop:
                    yield TrainEvent("stopped", step, epoch, total, terms, ap, examples / max(t_train, 1e-9),
                                     message=f"stopped after {step} steps")
                    return
                t0 = time.perf_counter()
                terms, n, bad = self._step()
                step += 1
                self.step = step
                if bad is not None:
                    yield from self._fail(step, epoch, bad, terms, ap)
                if self._ema is not None:
                    self._update_average(step)
                    state = {k: v.clone() for k, v in self._ema.items()}
                else:
                    state = self._snapshot()
                bad = self._probe_problem(state)
                if bad is not None:
                    yield from self._fail(step, epoch, f"scoring with its weights: {bad}", terms, ap)
                self._good = self._good[-1:] + [(state, step, epoch)]
                t_train += time.perf_counter() - t0
                examples += n
                if cfg.eval_every and step % cfg.eval_every == 0 and step % cfg.steps_per_epoch:
                    ap = self._evaluate_and_record(step, epoch, terms, ap)
                yield TrainEvent("step", step, epoch, total, terms, ap, examples / max(t_train, 1e-9))
            ap = self._evaluate_and_record(step, epoch, terms, ap)
            yield TrainEvent("epoch", step, epoch, total, terms, ap, examples / max(t_train, 1e-9),
                             message=f"epoch {epoch}/{cfg.epochs}" + (f": held-out AP {ap:.3f}"
                                                                      if ap is not None else ""))
        if not self.holdout:
            self._best = self.latest
        yield TrainEvent("done", step, int(cfg.epochs), total, terms, ap, examples / max(t_train, 1e-9),
                         message=f"done: {step} steps" + (f", best held-out AP {self._best_ap:.3f}"
                                                           if self._best_ap is not None else ""))

    def _fail(self, step: int, epoch: int, problem: str, terms: dict, ap) -> Iterator[TrainEvent]:
        """Restore the last good weights, yield the ``"error"`` event that says so, raise ``TrainingError``."""
        good = self._latest_state if self._latest_state is not None else self._initial_state
        self.model.load_state_dict(good)
        if self._latest_state is not None:
            kept = f"keeping the weights of step {self._latest_step}"
        elif self.init is not None:
            kept = "no step's weights were good: keeping the weights it started from"
        else:
            kept = "no step's weights were good: no model to keep"
        message = (f"training stopped at step {step} (epoch {epoch}): {problem}; {kept}. Try a lower learning rate "
                   f"(lr={self.config.lr:g}).")
        yield TrainEvent("error", step, epoch, self.config.total_steps, terms, ap, message=message)
        raise TrainingError(message)

    def _evaluate_and_record(self, step, epoch, terms, ap):
        result = {}
        if self.holdout:
            net = build_model(self.config.model, **self.config.model_params)
            net.load_state_dict(self._latest_state)
            result = self.evaluate(net.to(self.device).eval())
            ap = result.get("heldout_ap")
        self.history.append({"step": step, "epoch": epoch, "losses": dict(terms), "heldout_ap": ap})
        if self.holdout and ap is not None and (self._best_ap is None or ap > self._best_ap):
            self._best_ap = ap
            self.metrics = {**result, "step": step, "epoch": epoch}
            self._best = self._checkpoint(self._latest_state, self.metrics)
        elif not self.holdout:
            self.metrics = {"step": step, "epoch": epoch}
        return ap

    def _bad_logits(self, logits) -> str | None:
        if not bool(torch.isfinite(logits).all()):
            return "the logits are not finite"
        peak = float(logits.abs().max()) if logits.numel() else 0.0
        if peak > self.config.max_logit:
            return f"the logits exploded (|logit| up to {peak:.3g} > {self.config.max_logit:g})"
        return None

    def _exploded(self, loss) -> str | None:
        """A finite loss far above the run's scale (then the weights that gave it are not good either)."""
        value = float(loss.detach())
        if not math.isfinite(value):
            return None
        if value > self.config.max_loss:
            return f"the loss diverged ({value:.3g} > {self.config.max_loss:g})"
        if self._loss_start is None:
            self._loss_start = value
            return None
        limit = float(self.config.max_loss_growth) * max(abs(self._loss_start), 1.0)
        if value > limit:
            return f"the loss diverged ({value:.3g}, more than {self.config.max_loss_growth:g} x its start " \
                   f"{self._loss_start:.3g})"
        return None

    @staticmethod
    def _diverged(loss) -> str | None:
        value = float(loss.detach())
        if not math.isfinite(value):
            return f"the loss is {value}"
        return None

    @staticmethod
    def _bad_gradients(params) -> str | None:
        for p in params:
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return "a gradient is not finite"
        return None

    def _bad_weights(self, params) -> str | None:
        tensors = list(params) + [b for b in self.model.buffers() if b.is_floating_point()]
        for t in tensors:
            if not torch.isfinite(t).all():
                return "a weight became non-finite"
        return None


def train(images, names, positives, config: TrainConfig | None = None, **kwargs) -> Checkpoint:
    """Run a ``Trainer`` to completion and return its best checkpoint (arguments as ``Trainer``)."""
    trainer = Trainer(images, names, positives, config, **kwargs)
    for _ in trainer.run():
        pass
    return trainer.best
