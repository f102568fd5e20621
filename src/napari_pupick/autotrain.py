"""Training a user can trust without ground truth: two rounds, an estimated particle count, a calibrated threshold.

:class:`AutoTrainer` runs :class:`~napari_pupick.training.Trainer` twice and has the same interface (``run()``
yields :class:`~napari_pupick.training.TrainEvent`, ``stop()``, ``best``, ``latest``, ``history``):

1. **Survey**: a random third of the labels is held out (treated as unlabeled), the model trains on the rest with
   the given particle count, or a first guess from the particle size (:func:`~napari_pupick.calibration.
   initial_expected`). After every epoch it scores the training micrographs and
   :func:`~napari_pupick.calibration.calibrate` estimates, from the held-out labels, the particle count, the
   F1-optimal threshold, and the recall and precision there: the training monitor.
2. **Final**: the model trains again on every label, with the class prior set by the estimated count (or the
   given one). Its threshold is the one that keeps as many picks on the training micrographs as the survey's
   calibrated threshold kept (the held-out labels are in its training set now, so they cannot measure it again).

The final model of the final round is kept (its last weights: with sparse labels no held-out figure is reliable
enough to prefer an earlier epoch). Its ``metrics`` hold ``threshold``, ``expected_particles`` (with
``expected_source``: ``"estimated"`` or ``"given"``), ``label_recall``, ``precision``, ``f1_estimate``,
``picks_per_micrograph``, ``calibration`` (the survey's :class:`~napari_pupick.calibration.Calibration`) and
``kept`` (a sentence saying which model was kept and why).

A diverging round (see :class:`~napari_pupick.training.Trainer`) ends the training like a stop: the last good
weights (of that round, else the survey's) are calibrated and kept in ``best``, the closing event is ``"error"``
and ``run()`` raises :class:`~napari_pupick.errors.TrainingError`, as ``Trainer`` does.

Retraining (``calibration=`` the previous model's) skips the survey: the count is kept and the threshold is
carried over by the number of picks, so a retrain after corrections costs one round.

Lengths here are in the pixels of the images given (binned pixels).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

from napari_pupick.calibration import Calibration, calibrate, initial_expected, max_particles, threshold_for_count
from napari_pupick.errors import TrainingError
from napari_pupick.training import Checkpoint, TrainConfig, Trainer, TrainEvent

__all__ = ["AutoTrainer", "HELDOUT_FRACTION", "MIN_HELDOUT"]

#: Fraction of the labels the survey holds out to calibrate on.
HELDOUT_FRACTION = 1.0 / 3.0
#: Fewest labels worth holding out (with fewer labels the survey is skipped and the count guessed).
MIN_HELDOUT = 2
#: A given count this many times off the estimate gets a warning.
DISAGREEMENT = 2.0


class AutoTrainer:
    """Two-round training with a calibrated threshold (see the module docstring).

    Parameters
    ----------
    images, names, positives, config, negatives, init, preprocess
        As for :class:`~napari_pupick.training.Trainer` (binned pixels). ``config.expected_particles`` may be None:
        the count is then estimated. ``config.particle_radius`` sets NMS and matching.
    calibration : Calibration or dict, optional
        A previous calibration (retraining): skip the survey and carry its count and number of picks over.
    heldout_fraction : float
        Fraction of the labels the survey holds out.
    margin : float, optional
        Edge margin (binned pixels) of the candidates; default one particle radius. Stored in the checkpoint's
        ``metrics["margin"]`` in original pixels (``preprocess["downsample"]`` times it).
    survey_epochs : int, optional
        Epochs of the survey round (default: ``config.epochs``).
    tta : calibrate on maps averaged over four rotations (the checkpoint's ``metrics["tta"]`` then tells pickers
        to score that way); the per-epoch monitor scores without.
    """

    def __init__(self, images: Sequence, names: Sequence[str], positives: pd.DataFrame,
                 config: TrainConfig | None = None, negatives: pd.DataFrame | None = None,
                 init: Checkpoint | None = None, preprocess: dict | None = None,
                 calibration: Calibration | dict | None = None, heldout_fraction: float = HELDOUT_FRACTION,
                 margin: float | None = None, survey_epochs: int | None = None, tta: bool = False):
        self.config = copy.deepcopy(config) if config is not None else TrainConfig()
        self.images = [np.asarray(im, np.float32) for im in images]
        self.names = [str(n) for n in names]
        self.positives = positives.reset_index(drop=True) if positives is not None else positives
        self.negatives = negatives
        self.init = init
        self.preprocess = dict(preprocess or {})
        if isinstance(calibration, dict):
            calibration = Calibration.from_dict(calibration)
        self.previous = calibration
        self.heldout_fraction = float(heldout_fraction)
        r = float(self.config.particle_radius)
        self.margin = r if margin is None else float(margin)
        self.factor = int((self.preprocess or {}).get("downsample", 1))
        self.match_radius = float(self.config.match_fraction) * r
        self.survey_epochs = survey_epochs
        self.tta = bool(tta)
        self.given = self.config.expected_particles
        shape = self.images[0].shape if self.images else (1, 1)
        self.capacity = max_particles(r, shape)
        self.calibration: Calibration | None = None
        self.history: list = []
        self.monitor: dict | None = None
        self.round = ""
        self._trainer: Trainer | None = None
        self._stop = False
        self._kept: Checkpoint | None = None
        self._survey_ckpt: Checkpoint | None = None
        self.error: str | None = None
        self._split()
        # Validate now (the Trainer raises on bad labels, names, settings) so errors surface before run().
        Trainer(self.images, self.names, self.positives, self._round_config(self._first_expected()),
                negatives=self.negatives, init=self.init, preprocess=self.preprocess)

    # -- public state --------------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop at the next step; the model so far is kept and calibrated as well as it can be."""
        self._stop = True
        if self._trainer is not None:
            self._trainer.stop()

    @property
    def best(self) -> Checkpoint | None:
        """The kept model (the final round's last weights, with the calibrated metrics)."""
        return self._kept

    latest = best

    @property
    def surveying(self) -> bool:
        """Whether a survey round runs (enough labels and no previous calibration)."""
        return self.heldout is not None

    # -- setup ---------------------------------------------------------------------------------------------------

    def _split(self) -> None:
        """Hold out a random ``heldout_fraction`` of the labels (at least ``MIN_HELDOUT``, one left to train)."""
        self.heldout = self.trained = None
        n = 0 if self.positives is None else len(self.positives)
        if self.previous is not None or n < MIN_HELDOUT + 1:
            return
        k = min(max(int(round(self.heldout_fraction * n)), MIN_HELDOUT), n - 1)
        rng = np.random.default_rng(int(self.config.seed) + 7919)
        rows = np.zeros(n, bool)
        rows[rng.choice(n, size=k, replace=False)] = True
        self.heldout = self.positives.loc[rows].reset_index(drop=True)
        self.trained = self.positives.loc[~rows].reset_index(drop=True)

    def _first_expected(self) -> float:
        if self.given is not None:
            return float(self.given)
        if self.previous is not None:
            return float(self.previous.expected_particles)
        r = float(self.config.particle_radius)
        return float(np.mean([initial_expected(r, im.shape) for im in self.images]))

    def _round_config(self, expected: float, epochs: int | None = None) -> TrainConfig:
        cfg = copy.deepcopy(self.config)
        cfg.expected_particles = float(expected)
        cfg.pi = self.config.pi
        if epochs is not None:
            cfg.epochs = int(epochs)
        return cfg

    # -- scoring -------------------------------------------------------------------------------------------------

    def candidates(self, checkpoint: Checkpoint, tta: bool | None = None) -> pd.DataFrame:
        """NMS candidates (binned pixels, down to logit -6, edge margin applied) of every training micrograph."""
        from napari_pupick.extract import nms
        from napari_pupick.predict import score_micrographs

        net = checkpoint.build(self.config.device)
        r = float(self.config.particle_radius)
        tables = []
        tta = self.tta if tta is None else tta
        for name, logits in zip(self.names, score_micrographs(net, self.images, tta=tta)):
            picks = nms(logits, r, threshold=-6.0, margin=self.margin)
            picks.insert(0, "micrograph", name)
            tables.append(picks)
        return pd.concat(tables, ignore_index=True)

    def _calibrate(self, checkpoint: Checkpoint, tta: bool | None = None) -> Calibration:
        return calibrate(self.candidates(checkpoint, tta), self.heldout, self.trained, self.match_radius,
                         len(self.images), max_expected=self.capacity)

    def _monitor(self, cal: Calibration) -> dict:
        return {"label_recall": cal.label_recall, "precision": cal.precision, "threshold": cal.threshold,
                "expected": cal.expected_particles}

    # -- the rounds ----------------------------------------------------------------------------------------------

    def run(self) -> Iterator[TrainEvent]:
        """Train both rounds, yielding the inner trainers' events with steps counted over both rounds."""
        cfg = self.config
        survey_epochs = int(self.survey_epochs or cfg.epochs) if self.surveying else 0
        total = (survey_epochs + int(cfg.epochs)) * int(cfg.steps_per_epoch)
        first = self._first_expected()
        how = "given" if self.given is not None else ("kept from the previous model" if self.previous is not None
                                                      else "first guess from the particle size")
        plan = (f"round 1 holds out {len(self.heldout)} of {len(self.positives)} labels to estimate the particle "
                f"count and the threshold, round 2 trains on all" if self.surveying else
                "one round (the count and threshold carry over from the previous model)" if self.previous is not None
                else f"one round ({len(self.positives)} label(s): too few to hold any out)")
        yield TrainEvent("start", 0, 0, total, message=f"{plan}; {first:.0f} particles per micrograph ({how})")
        offset = 0
        survey = None
        if self.surveying:
            self.round = "survey"
            trainer = Trainer(self.images, self.names, self.trained, self._round_config(first, survey_epochs),
                              negatives=self.negatives, init=self.init, preprocess=self.preprocess)
            yield from self._drive(trainer, offset, total, calibrate_epochs=True)
            survey = _trained(trainer)
            offset += trainer.step
            if survey is None or self.error is not None:  # stopped before the first step, or diverged
                yield from self._finish(survey, None, offset, total)
                return
            self._survey_ckpt = survey
            self.calibration = cal = self._calibrate(survey)
            self.monitor = self._monitor(cal)
            msg = (f"round 1: about {cal.expected_particles:.0f} particles per micrograph; at logit "
                   f"{cal.threshold:.2f} {cal.label_recall:.0%} of the {cal.n_heldout} held-out labels are found, "
                   f"estimated precision {cal.precision:.0%}")
            if self.given is not None:
                ratio = float(self.given) / max(cal.expected_particles, 1e-9)
                if ratio > DISAGREEMENT or ratio < 1 / DISAGREEMENT:
                    msg += (f". Warning: the given {float(self.given):g} particles per micrograph disagree with "
                            f"this estimate ({ratio:.2g}x); training uses the given count")
            yield TrainEvent("calibrated", offset, survey_epochs, total, monitor=self.monitor, message=msg)
            if self._stop:
                yield from self._finish(survey, None, offset, total)
                return
        self.round = "final"
        expected = self._final_expected()
        trainer = Trainer(self.images, self.names, self.positives, self._round_config(expected),
                          negatives=self.negatives, init=self.init, preprocess=self.preprocess)
        yield from self._drive(trainer, offset, total, calibrate_epochs=False)
        offset += trainer.step
        yield from self._finish(survey, _trained(trainer), offset, total)

    def _final_expected(self) -> float:
        if self.given is not None:
            return float(self.given)
        if self.calibration is not None:
            return float(self.calibration.expected_particles)
        return self._first_expected()

    def _drive(self, trainer: Trainer, offset: int, total: int, calibrate_epochs: bool) -> Iterator[TrainEvent]:
        self._trainer = trainer
        if self._stop:
            trainer.stop()
        try:
            for ev in trainer.run():
                if ev.kind == "error":  # diverged: the trainer restored its last good weights (it would raise next)
                    self.error = (f"round {1 if self.round == 'survey' else 2}: " if self.surveying else "") + ev.message
                    self._stop = True
                    break
                if ev.kind in ("start", "done"):
                    if ev.kind == "start":
                        yield TrainEvent("round", offset, 0, total, message=f"{self.round} round: {ev.message}")
                    continue
                ev = copy.copy(ev)
                ev.step += offset
                ev.total_steps = total
                ev.monitor = self.monitor
                if ev.kind == "epoch" and calibrate_epochs and _trained(trainer) is not None:
                    cal = self._calibrate(_trained(trainer), tta=False)
                    ev.monitor = self.monitor = self._monitor(cal)
                    ev.message = (f"{self.round} epoch {ev.epoch}: held-out labels found {cal.label_recall:.0%} at "
                                  f"logit {cal.threshold:.2f}, estimated precision {cal.precision:.0%}, about "
                                  f"{cal.expected_particles:.0f} particles per micrograph")
                self.history.append({"round": self.round, "step": ev.step, "epoch": ev.epoch,
                                     "losses": dict(ev.losses or {}), "monitor": ev.monitor})
                if ev.kind == "stopped":
                    continue
                yield ev
        finally:
            self._trainer = None

    def _finish(self, survey: Checkpoint | None, final: Checkpoint | None, step: int, total: int):
        """Calibrate the model to keep, store it in ``best`` and yield the closing event (raise if it diverged)."""
        cal = self.calibration
        if final is not None:
            ckpt = final
            if cal is None and survey is None and self.previous is None:
                threshold, kept_how = None, "no labels were held out, so its threshold is not calibrated"
            else:
                ref = cal or self.previous
                cands = self.candidates(final)
                threshold = threshold_for_count(cands["score"], ref.picks_per_micrograph * len(self.images))
                kept_how = (f"its threshold keeps {ref.picks_per_micrograph:.0f} picks per micrograph, as the "
                            f"{'survey' if cal is not None else 'previous'} model's calibrated threshold did")
            which = f"the last weights of round 2 ({len(self.positives)} labels)" if survey is not None else \
                f"the last weights of the training ({len(self.positives)} labels)"
        elif survey is not None:
            ckpt = survey
            cal = cal or self._calibrate(survey)
            self.calibration = cal
            threshold = cal.threshold
            why = ("stopped before round 2" if self.error is None else "round 1 diverged" if self.round == "survey"
                   else "round 2 diverged at its first step")
            which = f"the round-1 model ({len(self.trained)} labels; {why})"
            kept_how = "its threshold is calibrated on the held-out labels"
        else:
            self._kept = None
            if self.error is not None:
                yield TrainEvent("error", step, 0, total, message=self.error)
                raise TrainingError(self.error)
            yield TrainEvent("stopped", step, 0, total, message="stopped before the first step: no model to keep")
            return
        ref = cal or self.previous
        metrics = {"step": step, "round": "final" if final is not None else "survey",
                   "margin": float(self.margin * self.factor), "tta": self.tta}
        if threshold is not None:
            metrics["threshold"] = float(threshold)
        if ref is not None:
            metrics.update(expected_particles=float(self.given if self.given is not None else
                                                    ref.expected_particles),
                           expected_source="given" if self.given is not None else "estimated",
                           expected_estimate=float(ref.expected_particles), label_recall=ref.label_recall,
                           precision=ref.precision, f1_estimate=ref.f1,
                           picks_per_micrograph=ref.picks_per_micrograph, calibration=ref.to_dict())
        elif self.given is not None:
            metrics.update(expected_particles=float(self.given), expected_source="given")
        metrics["kept"] = f"kept {which}: {kept_how}"
        ckpt = Checkpoint(model=ckpt.model, model_params=dict(ckpt.model_params), state_dict=ckpt.state_dict,
                          preprocess=dict(ckpt.preprocess), config=dict(ckpt.config),
                          history=copy.deepcopy(self.history), metrics=metrics, created=ckpt.created)
        self._kept = ckpt
        kind = "error" if self.error is not None else "done" if final is not None and not self._stop else "stopped"
        mon = self.monitor if ref is not None else None
        msg = metrics["kept"]
        if threshold is not None and math.isfinite(threshold):
            msg += f"; threshold {threshold:.2f}"
        if self.error is not None:
            msg = f"{self.error} {msg[0].upper()}{msg[1:]}"
            metrics["kept"] = msg
        yield TrainEvent(kind, step, 0, total, monitor=mon, message=msg)
        if self.error is not None:
            raise TrainingError(msg)



def _trained(trainer: Trainer) -> Checkpoint | None:
    """The trainer's latest good weights (None before its first step, or when no step's weights were good)."""
    return trainer.latest
