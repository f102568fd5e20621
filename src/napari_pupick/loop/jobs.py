"""The long jobs of a session as generators of :class:`~napari_pupick.loop.session.LoopEvent` (run by napari
thread workers; they touch no layer) and their blocking twins: preprocess, train, predict."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pandas as pd

from napari_pupick.errors import MicrographError, ModelError, PupickError, TrainingError
from napari_pupick.loop.session import NMS_THRESHOLD, LoopEvent

__all__ = ["JobsMixin"]


class JobsMixin:
    """Preprocess, train and predict for a :class:`~napari_pupick.loop.PickLoop`."""

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
            "planes" (list of (h, w) float32), "stack" (the planes as one array; they are its views when stacked),
            "mixture"}``.
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
        # the layer's array is made here, not on the main thread (19 x 1365 x 1365 float32: 140 MB to copy);
        # the planes become views of it
        stack = np.stack(planes) if data.ndim == 3 else planes[0]
        if data.ndim == 3:
            planes = list(stack)
        yield LoopEvent("preprocessed", total, total, f"normalized {n} micrograph(s) ({pre.method}, binned by "
                        f"{pre.downsample})", {"preprocessor": pre, "planes": planes, "mixture": mixture,
                                               "stack": stack})

    def preprocess(self, layer=None, downsample: int | str | None = None, method: str = "gmm", preprocessor=None):
        """Run :meth:`iter_preprocess` to completion here; returns the normalized Image layer."""
        self._drive(self.iter_preprocess(layer, downsample, method, preprocessor))
        return self.normalized_layer

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
        failure = None
        try:
            for ev in trainer.run():
                total = ev.total_steps or total
                yield LoopEvent("train", ev.step, ev.total_steps, ev.message, ev)
        except TrainingError as exc:  # diverged: keep its last good weights (if any), then report the failure
            if trainer.best is None:
                raise
            failure = exc
        finally:
            self._trainer = None
        best = trainer.best
        if best is None:  # stopped before the first step: nothing was learnt, the current model (if any) stays
            kept = "the current model is kept" if self.checkpoint is not None else "no model yet"
            yield LoopEvent("untrained", total, total, f"training stopped before the first step: {kept}")
            return
        metrics = best.metrics or {}
        if "threshold" in metrics:
            message = f"training finished; calibrated threshold {metrics['threshold']:.2f}"
        else:
            message = "kept the model" + (f" (held-out AP {metrics['heldout_ap']:.3f})" if "heldout_ap" in metrics
                                          else "")
        yield LoopEvent("trained", total, total, message, best)
        if failure is not None:
            raise failure

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

    #: While scoring, the picks of the micrographs not shown reach the picks layer at most this often (s), and
    #: at the end: each update of a Points layer costs 40-100 ms on the main thread, whatever the number of
    #: micrographs it adds. The micrograph shown gets its picks at once (and a micrograph the user moves to
    #: meanwhile, with the next one scored).
    picks_flush_interval = 5.0

    def _apply_scored(self, event: LoopEvent) -> None:
        d = event.data
        plane, logits, factor = d["plane"], d["logits"], d["factor"]
        self.scores[plane] = logits
        self._show_scores(plane, logits, factor)
        self._pending_picks[plane] = d["picks"]
        shown = self.current_plane()
        if shown in self._pending_picks or time.perf_counter() - self._picks_flushed > self.picks_flush_interval:
            self.flush_picks()

    def flush_picks(self) -> None:
        """Put the picks of the micrographs scored since the last update into the picks layer (one update)."""
        pending, self._pending_picks = self._pending_picks, {}
        self._picks_flushed = time.perf_counter()
        if pending:
            self._set_planes_picks(pending)

    def _apply_predicted(self, event: LoopEvent) -> None:
        self.flush_picks()
        self._emit("picks")

    def predict(self, planes=None, **kwargs) -> pd.DataFrame:
        """Run :meth:`iter_predict` to completion here; returns the picks above the threshold."""
        self._drive(self.iter_predict(planes, **kwargs))
        return self.picks_table()
