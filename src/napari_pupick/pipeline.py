"""The whole picking job as plain functions over the core: prepare, train, pick, evaluate.

This is the one entry point that the command line, the napari loop and scripts share:

>>> from napari_pupick.pipeline import Picker, train_picker
>>> ckpt = train_picker(paths, labels, radius=30, downsample=4, expected_particles=150)   # doctest: +SKIP
>>> picks = Picker(ckpt).pick_files(paths)                                               # doctest: +SKIP

Coordinates in and out of this module are in ORIGINAL micrograph pixels (x = column, y = row); the binned grid
the network sees stays inside.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from napari_pupick.errors import CoordinateError, TrainingError

#: The NMS floor: extracting down to this logit keeps every candidate (to filter by score later).
ALL_CANDIDATES = -6.0
#: Threshold of a checkpoint trained before thresholds were calibrated (it has no ``metrics["threshold"]``).
FALLBACK_THRESHOLD = 0.0

__all__ = [
    "ALL_CANDIDATES",
    "DEFAULT_INIT",
    "FALLBACK_THRESHOLD",
    "Picker",
    "prepare_images",
    "labels_to_binned",
    "train_picker",
    "training_run",
    "pick_distributed",
    "resolve_init",
    "split_holdout",
]


def prepare_images(raw_images: Sequence[np.ndarray], preprocessor, fit: bool = True) -> list[np.ndarray]:
    """Downsample and normalize raw micrographs (fitting the preprocessor on them first when ``fit``)."""
    if fit:
        return preprocessor.fit_transform(raw_images)
    return [preprocessor.transform(im) for im in raw_images]


def labels_to_binned(labels: pd.DataFrame, factor: int, names: Sequence[str] | None = None) -> pd.DataFrame:
    """Scale a pick table from original to binned pixels (x / factor, y / factor), keeping known micrographs."""
    table = labels.copy()
    if names is not None:
        table = table[table["micrograph"].isin(list(names))]
    table["x"] = table["x"].astype(float) / factor
    table["y"] = table["y"].astype(float) / factor
    return table.reset_index(drop=True)


#: Where training starts by default (see :func:`resolve_init`).
DEFAULT_INIT = "general"


def resolve_init(init, model: str | None = None):
    """The Checkpoint training starts from, or None for a random start.

    ``init`` is a Checkpoint, a path, ``"general"``, ``"none"``/None or ``"default"`` (:data:`DEFAULT_INIT`). The
    general model is used only for its own architecture: asking for another ``model`` (e.g. resnet8) with the
    default starts from scratch, asking for it explicitly is an error.
    """
    from napari_pupick.errors import ModelError
    from napari_pupick.training import Checkpoint

    explicit = not (isinstance(init, str) and init == "default")
    if not explicit:
        init = DEFAULT_INIT
    if init is None or (isinstance(init, str) and init.lower() == "none"):
        return None
    if isinstance(init, Checkpoint):
        return init
    if isinstance(init, str) and init.lower() == "general":
        from napari_pupick.pretrain import general_model_path, load_general

        general = load_general()
        if general is None:
            raise ModelError(f"the general starting model is missing from this installation ({general_model_path()})")
        if model is not None and model != general.model:
            if explicit:
                raise ModelError(f"the general starting model is a {general.model} network; it cannot start a "
                                 f"{model} (use --init none)")
            return None
        return general
    return Checkpoint.load(init)


def _check_inside(table: pd.DataFrame, shapes: dict, what: str) -> None:
    """CoordinateError naming the micrograph when a point lies outside its (original) image."""
    for name, rows in table.groupby("micrograph"):
        if name not in shapes:
            continue
        h, w = shapes[name]
        x, y = rows["x"].to_numpy(float), rows["y"].to_numpy(float)
        bad = ~((x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise CoordinateError(f"micrograph {name}: {int(bad.sum())} {what}(s) outside the {w} x {h} image, e.g. "
                                  f"x={x[i]:g}, y={y[i]:g} (original pixels)")


def _clip_to(table: pd.DataFrame, shapes: dict) -> pd.DataFrame:
    """Clip binned coordinates into their binned image: binning crops the last ``W % factor`` columns (and rows),
    so a particle clicked there lies just outside the binned image."""
    if len(table) == 0:
        return table
    h = table["micrograph"].map(lambda n: shapes[n][0]).to_numpy(float)
    w = table["micrograph"].map(lambda n: shapes[n][1]).to_numpy(float)
    out = table.copy()
    out["x"] = np.clip(out["x"].to_numpy(float), 0.0, w - 1)
    out["y"] = np.clip(out["y"].to_numpy(float), 0.0, h - 1)
    return out


def split_holdout(names: Sequence[str], labels: pd.DataFrame, fraction: float, seed: int = 0) -> list[str]:
    """Choose labelled micrographs to hold out for per-epoch average precision.

    Takes ``round(fraction * n_labelled)`` of the micrographs that have labels (at least one when ``fraction > 0``
    and at least two micrographs are labelled, so one always remains to train on).
    """
    labelled = [n for n in names if n in set(labels["micrograph"])]
    if fraction <= 0 or len(labelled) < 2:
        return []
    k = min(max(1, int(round(fraction * len(labelled)))), len(labelled) - 1)
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(labelled, size=k, replace=False).tolist())


def training_run(
    raw_images: Sequence[np.ndarray],
    names: Sequence[str],
    labels: pd.DataFrame,
    *,
    radius: float,
    downsample: int | str = "auto",
    pixel_size: float | None = None,
    normalization: str = "gmm",
    expected_particles: float | None = None,
    negatives: pd.DataFrame | None = None,
    holdout: Sequence[str] = (),
    init="default",
    preprocessor=None,
    prepared: Sequence[np.ndarray] | None = None,
    calibration=None,
    margin: float | None = None,
    tta: bool = True,
    **config,
):
    """Build the trainer for raw micrographs and labels in original pixels.

    By default an :class:`~napari_pupick.autotrain.AutoTrainer`: two rounds that estimate the particle count (when
    ``expected_particles`` is None) and calibrate the threshold from labels held out of the first round. With
    ``holdout`` (micrographs held out to measure a held-out AP per epoch) a single-round
    :class:`~napari_pupick.training.Trainer` as before.

    Parameters
    ----------
    raw_images : list of (H, W) arrays, as read from the files.
    names : micrograph names, one per image (the ``micrograph`` values of ``labels``).
    labels : DataFrame with micrograph, x, y in original pixels.
    radius : particle radius in ORIGINAL pixels (divided by ``downsample`` for the network).
    downsample : integer binning factor, or ``'auto'`` (default): chosen from the radius by
        :func:`~napari_pupick.calibration.choose_downsample` (the choice is in ``trainer.binning``).
    pixel_size : Angstrom per original pixel, when known (reported with the binning).
    normalization : 'gmm', 'affine' or 'none' (ignored when ``preprocessor`` is given, e.g. a fitted one).
    prepared : the images already binned and normalized by ``preprocessor`` (the napari session's cache): not
        transformed again.
    expected_particles : expected particles per micrograph (sets the class prior pi); None: estimated.
    negatives : rejected picks (micrograph, x, y) in original pixels, or None.
    holdout : names of labelled micrographs held out for average precision per epoch (single round).
    init : where training starts: a Checkpoint or checkpoint file (retraining), ``"general"`` (the general starting
        model shipped with the package, :mod:`~napari_pupick.pretrain`), ``"none"`` or None (a random start), or
        ``"default"``: :data:`DEFAULT_INIT`.
    calibration : a previous model's ``metrics["calibration"]`` (retraining after corrections: one round, the count
        and the number of picks carry over).
    margin : edge margin, ORIGINAL pixels (default: :func:`~napari_pupick.calibration.label_margin`).
    tta : score with four rotations averaged when calibrating (and, through the checkpoint, when picking):
        EMPIAR-10947 AP 0.18 -> 0.24, apoferritin 0.939 -> 0.943, ribosome equal (4x the scoring time).
    **config : any other :class:`~napari_pupick.training.TrainConfig` field.

    Returns
    -------
    AutoTrainer or Trainer
        Iterate ``trainer.run()`` for progress events; ``trainer.best`` is the model to keep;
        ``trainer.binning`` the binning used.
    """
    from napari_pupick.autotrain import AutoTrainer
    from napari_pupick.preprocess import Preprocessor
    from napari_pupick.training import TrainConfig, Trainer

    if labels is None or len(labels) == 0:
        raise TrainingError("no positive labels: mark a few particles first")
    unknown = sorted(set(labels["micrograph"]) - set(names))
    if unknown:
        raise CoordinateError(
            f"labels name micrographs that are not open: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )
    from napari_pupick.calibration import choose_downsample

    init = resolve_init(init, config.get("model"))
    if preprocessor is None:
        binning = choose_downsample(radius, pixel_size, downsample)
        preprocessor = Preprocessor(downsample=binning.factor, method=normalization)
        images = prepare_images(raw_images, preprocessor, fit=True)
    else:
        binning = choose_downsample(radius, pixel_size, int(preprocessor.downsample))
        images = list(prepared) if prepared is not None else [preprocessor.transform(im) for im in raw_images]
    factor = int(preprocessor.downsample)
    cfg = TrainConfig(particle_radius=float(radius) / factor, expected_particles=expected_particles, **config)
    raw_shapes = {n: np.shape(im)[-2:] for n, im in zip(names, raw_images)}
    shapes = dict(zip(names, (im.shape for im in images)))
    _check_inside(labels, raw_shapes, "label")
    positives = _clip_to(labels_to_binned(labels, factor, names), shapes)
    neg = None
    if negatives is not None and len(negatives):
        _check_inside(negatives, raw_shapes, "negative label")
        neg = _clip_to(labels_to_binned(negatives, factor, names), shapes)
    if margin is None:
        from napari_pupick.calibration import label_margin

        margin = label_margin(labels[labels["micrograph"].isin(list(names))], raw_shapes, float(radius))
    if holdout:
        if cfg.expected_particles is None and cfg.pi is None:
            from napari_pupick.calibration import initial_expected

            cfg.expected_particles = float(np.mean([initial_expected(cfg.particle_radius, im.shape) for im in images]))
        trainer = Trainer(images, list(names), positives, cfg, negatives=neg, holdout=list(holdout), init=init,
                          preprocess=preprocessor.to_dict())
    else:
        trainer = AutoTrainer(images, list(names), positives, cfg, negatives=neg, init=init,
                              preprocess=preprocessor.to_dict(), calibration=calibration,
                              margin=float(margin) / factor, tta=tta)
    trainer.binning = binning
    trainer.margin_original = float(margin)
    return trainer


def train_picker(raw_images, names, labels, *, progress: bool = False, log=None, **kwargs):
    """Train to completion and return the kept :class:`~napari_pupick.training.Checkpoint`.

    Same arguments as :func:`training_run`; ``progress=True`` shows a tqdm bar; ``log`` (e.g. ``print``) receives
    the messages that say what was estimated and which model was kept. A diverging training raises
    :class:`~napari_pupick.errors.TrainingError` whose ``checkpoint`` is the last good weights (or None).
    """
    trainer = training_run(raw_images, names, labels, **kwargs)
    if log is not None:
        log(f"edge margin {trainer.margin_original:g} px" + (" (one particle radius)"
            if trainer.margin_original == float(kwargs["radius"]) else " (a label lies that close to the border)"))
    bar = None
    try:
        for event in trainer.run():
            if progress and event.total_steps:
                if bar is None:
                    from tqdm.auto import tqdm

                    bar = tqdm(total=event.total_steps, desc="train", unit="step")
                bar.n = event.step
                post = {k: f"{v:.3g}" for k, v in (event.losses or {}).items()}
                if event.heldout_ap is not None:
                    post["AP"] = f"{event.heldout_ap:.3f}"
                if event.monitor:
                    post["recall"] = f"{event.monitor['label_recall']:.2f}"
                    post["precision"] = f"{event.monitor['precision']:.2f}"
                bar.set_postfix(post, refresh=False)
                bar.refresh()
            if log is not None and event.kind in ("start", "calibrated", "done", "stopped"):
                if bar is not None:
                    bar.clear()
                log(event.message)
    except TrainingError as exc:
        exc.checkpoint = trainer.best
        raise
    finally:
        if bar is not None:
            bar.close()
    return trainer.best


class Picker:
    """A trained model with its preprocessing and extraction settings: raw micrograph in, picks out.

    Parameters
    ----------
    checkpoint : Checkpoint or path to one.
    device : 'auto', 'cpu', 'cuda', 'mps' (or a torch.device).
    tta : average the logits over four 90-degree rotations; None (default): as the model was calibrated
        (``checkpoint.metrics["tta"]``; its threshold is a logit of the averaged map).
    tile : tile side for scoring (None: automatic).
    """

    def __init__(self, checkpoint, device="auto", tta: bool | None = None, tile: int | None = None):
        from napari_pupick.predict import select_device
        from napari_pupick.preprocess import Preprocessor
        from napari_pupick.training import Checkpoint

        if isinstance(checkpoint, (str, Path)):
            checkpoint = Checkpoint.load(checkpoint)
        self.checkpoint = checkpoint
        self.preprocessor = Preprocessor.from_dict(checkpoint.preprocess or {})
        self.device = select_device(device)
        self.model = checkpoint.build(self.device)
        self.tta = bool((checkpoint.metrics or {}).get("tta", False)) if tta is None else bool(tta)
        self.tile = tile

    @property
    def factor(self) -> int:
        """The downsampling factor the model was trained with."""
        return int(self.preprocessor.downsample)

    @property
    def particle_radius(self) -> float | None:
        """The particle radius in original pixels the model was trained with (None if unknown)."""
        r = (self.checkpoint.config or {}).get("particle_radius")
        return None if r is None else float(r) * self.factor

    @property
    def threshold(self) -> float:
        """The model's calibrated logit threshold (``checkpoint.metrics["threshold"]``, set by training without
        ground truth); :data:`FALLBACK_THRESHOLD` for a checkpoint that has none."""
        t = (self.checkpoint.metrics or {}).get("threshold")
        return FALLBACK_THRESHOLD if t is None or not np.isfinite(float(t)) else float(t)

    @property
    def margin(self) -> float:
        """Default edge margin in original pixels: ``checkpoint.metrics["margin"]`` (chosen at training from the
        particle radius and the labels, :func:`~napari_pupick.calibration.label_margin`), else one particle
        radius (0 when the radius is unknown)."""
        from napari_pupick.calibration import model_margin

        return model_margin(self.checkpoint.metrics, self.particle_radius)

    @property
    def suggested_threshold(self) -> float | None:
        """The calibrated threshold when the checkpoint has one (None otherwise)."""
        t = (self.checkpoint.metrics or {}).get("threshold")
        return None if t is None else float(t)

    def prepare(self, raw: np.ndarray) -> np.ndarray:
        """Downsample and normalize one raw micrograph as the model was trained."""
        return self.preprocessor.transform(np.asarray(raw))

    def score(self, image: np.ndarray, prepared: bool = False) -> np.ndarray:
        """Logit map (binned grid) of one micrograph; ``prepared=True`` when ``image`` is already normalized."""
        from napari_pupick.predict import score_micrograph

        x = image if prepared else self.prepare(image)
        return score_micrograph(self.model, x, device=self.device, tile=self.tile, tta=self.tta)

    def extract(self, logits: np.ndarray, name=None, *, radius=None, threshold=None, margin=None,
                image=None, std_filter=None) -> pd.DataFrame:
        """Non-maximum suppression on a logit map; picks out in original pixels.

        ``radius`` (NMS) and ``margin`` (edge) are in ORIGINAL pixels and default to the model's particle radius
        and :attr:`margin`; ``threshold`` (a logit) defaults to the calibrated :attr:`threshold`. Pass
        ``threshold=ALL_CANDIDATES`` (-6) to keep every candidate for filtering later.
        """
        from napari_pupick.extract import extract_picks

        radius = self.particle_radius if radius is None else float(radius)
        if radius is None:
            raise ValueError("no particle radius: pass radius= (original pixels)")
        threshold = self.threshold if threshold is None else float(threshold)
        margin = self.margin if margin is None else float(margin)
        return extract_picks(
            logits,
            radius / self.factor,
            threshold=threshold,
            margin=float(margin) / self.factor,
            factor=self.factor,
            micrograph=name,
            image=image,
            std_filter=std_filter,
        )

    def pick(self, raw: np.ndarray, name=None, **kwargs) -> pd.DataFrame:
        """Score and extract one raw micrograph (see :meth:`extract` for the keyword arguments)."""
        prepared = self.prepare(raw)
        logits = self.score(prepared, prepared=True)
        if kwargs.get("std_filter") is not None and kwargs.get("image") is None:
            kwargs["image"] = prepared
        return self.extract(logits, name, **kwargs)

    def iter_files(self, paths: Iterable, **kwargs) -> Iterator[tuple[str, pd.DataFrame]]:
        """Pick each micrograph file in turn, yielding ``(name, picks)``."""
        from napari_pupick.io import micrograph_name, read_micrograph

        for path in paths:
            name = micrograph_name(path)
            yield name, self.pick(read_micrograph(path), name, **kwargs)

    def pick_files(self, paths: Iterable, **kwargs) -> pd.DataFrame:
        """Pick every micrograph file and return one table."""
        tables = [t for _, t in self.iter_files(paths, **kwargs)]
        return _concat(tables)


def _concat(tables) -> pd.DataFrame:
    tables = [t for t in tables if len(t)]
    if not tables:
        return pd.DataFrame({"micrograph": pd.Series(dtype=str), "x": pd.Series(dtype=float),
                             "y": pd.Series(dtype=float), "score": pd.Series(dtype=float)})
    return pd.concat(tables, ignore_index=True)


@functools.lru_cache(maxsize=4)
def _cached_picker(checkpoint_path: str, device: str, tta: bool | None, threads: int | None) -> Picker:
    if threads:
        from napari_pupick.predict import set_threads

        set_threads(threads)
    return Picker(checkpoint_path, device=device, tta=tta)


def _pick_one_file(path: str, checkpoint_path: str, device: str, tta: bool | None, threads: int | None,
                   kwargs: dict) -> pd.DataFrame:
    from napari_pupick.io import micrograph_name, read_micrograph

    picker = _cached_picker(checkpoint_path, device, tta, threads)
    return picker.pick(read_micrograph(path), micrograph_name(path), **kwargs)


def pick_distributed(checkpoint_path, paths, client=None, *, device="auto", tta=None, threads=1,
                     **kwargs) -> pd.DataFrame:
    """Pick many micrographs in parallel with dask, one task per micrograph.

    With a ``dask.distributed.Client`` the tasks run on its workers (many machines: each worker loads the
    checkpoint once from ``checkpoint_path``, which must be readable there); with ``client=None`` they run on the
    local threaded scheduler. Returns one pick table in original pixels.

    Every pick is gathered in memory and nothing is written: for many micrographs use
    :func:`napari_pupick.batch.run_batch` (each micrograph written as it finishes, resumable, failures reported).
    """
    import dask

    tasks = [
        dask.delayed(_pick_one_file)(str(p), str(checkpoint_path), str(device), tta, threads, dict(kwargs))
        for p in paths
    ]
    if client is not None:
        futures = client.compute(tasks)
        results = client.gather(futures)
    else:
        (results,) = dask.compute(tasks, scheduler="threads")
    return _concat(results)
