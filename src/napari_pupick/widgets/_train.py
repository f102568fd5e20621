"""Dock widget 2: train (and retrain) the picker in a worker, with live loss and held-out AP; save and load models."""

from __future__ import annotations

from pathlib import Path

from magicgui.widgets import ComboBox, Container, FloatSpinBox, PushButton, SpinBox
from qtpy.QtCore import QTimer

from napari_pupick.loop import LoopEvent
from napari_pupick.widgets._common import PupickWidget, hbox, heading, text_label, warm_up
from napari_pupick.widgets._plot import CURVES, TrainingPlot

__all__ = ["TrainWidget"]

_OBJECTIVES = [("GE-binomial", "ge-binomial"), ("GE-KL", "ge-kl"), ("nnPU", "nnpu"), ("PN", "pn")]
_MODELS = [("conv3 (fast)", "conv3"), ("resnet8 (stronger)", "resnet8")]
_DEVICES = [("auto", "auto"), ("CUDA", "cuda"), ("MPS (Apple)", "mps"), ("CPU", "cpu")]


def describe_model(ck) -> str:
    """What the user needs to know about a model: its threshold, the particle count, recall and precision."""
    m = ck.metrics or {}
    parts = [f"{ck.model}", f"trained {ck.created[:16].replace('T', ' ')}" if ck.created else ""]
    if m.get("threshold") is not None:
        parts.append(f"calibrated threshold {m['threshold']:.2f}")
    if m.get("expected_particles") is not None:
        how = "estimated" if m.get("expected_source") == "estimated" else "given"
        parts.append(f"about {m['expected_particles']:.0f} particles per micrograph ({how})")
    if m.get("label_recall") is not None:
        parts.append(f"held-out labels found {m['label_recall']:.0%}, estimated precision {m['precision']:.0%}")
    if m.get("heldout_ap") is not None:
        parts.append(f"held-out AP {m['heldout_ap']:.3f}")
    if m.get("threshold_f2") is not None:
        parts.append(f"F2 threshold {m['threshold_f2']:.2f}")
    text = " · ".join(p for p in parts if p)
    if m.get("kept"):
        text += f"<br>{m['kept']}"
    return text


class TrainWidget(PupickWidget):
    """Training settings, Train / Retrain / Cancel, a live plot, Save and Load.

    Attributes
    ----------
    extra_config : dict
        More :class:`~napari_pupick.training.TrainConfig` fields for every run (scripts and tests, e.g.
        ``{"model_params": {"width": 0.25}, "batch_size": 2}``).
    """

    #: Training can run for many minutes: its progress stays in this widget (napari's animated activity bar would
    #: keep repainting the window meanwhile, see PupickWidget.napari_progress).
    napari_progress = False

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.extra_config: dict = {}
        self.objective = ComboBox(label="objective", choices=_OBJECTIVES, value="ge-binomial")
        self.model = ComboBox(label="model", choices=_MODELS, value="conv3")
        self.epochs = SpinBox(label="epochs", value=5, min=1, max=1000)  # TrainConfig.epochs
        self.steps = SpinBox(label="steps per epoch", value=20, min=1, max=100000)
        self.device = ComboBox(label="device", choices=_DEVICES, value="auto")
        self.holdout = FloatSpinBox(label="held-out micrographs", value=0.0, min=0.0, max=0.5, step=0.05,
                                    tooltip="0 (default): two rounds that estimate the particle count and "
                                            "calibrate the threshold from labels held out of the first round "
                                            "(retraining runs one). Above 0: hold out this fraction of the "
                                            "labelled micrographs to measure average precision per epoch instead")
        self.threads = SpinBox(label="CPU threads", value=1, min=1, max=64,
                               tooltip="torch threads while training; leave a core free for the viewer")
        self.form = Container(widgets=[self.objective, self.model, self.epochs, self.steps, self.device,
                                       self.holdout, self.threads], labels=True)
        self.form.margins = (0, 0, 0, 0)
        self.train_button = PushButton(text="Train")
        self.retrain_button = PushButton(text="Retrain")
        self.retrain_button.tooltip = ("Continue from the current model with the corrected labels: positives, "
                                       "rejected picks (negatives) and the unlabeled rest")
        self.cancel_button = PushButton(text="Cancel")
        self.cancel_button.tooltip = "Stop at the next step and keep the best model so far"
        self.cancel_button.enabled = False
        self.save_button = PushButton(text="Save model...")
        self.load_button = PushButton(text="Load model...")
        self.body.addWidget(heading("Training"))
        self.body.addWidget(self.form.native)
        self.body.addWidget(hbox(self.train_button, self.retrain_button, self.cancel_button))
        self.plot = TrainingPlot()
        self.body.addWidget(self.plot)
        self.body.addWidget(self.plot.legend)
        self.body.addWidget(heading("Model"))
        self.model_info = text_label("no model yet")
        self.body.addWidget(self.model_info)
        self.body.addWidget(hbox(self.save_button, self.load_button))

        self.train_button.changed.connect(self.train)
        self.retrain_button.changed.connect(self.retrain)
        self.cancel_button.changed.connect(self.cancel)
        self.save_button.changed.connect(lambda *_: self.save())
        self.load_button.changed.connect(lambda *_: self.load())
        self.device.changed.connect(lambda v: setattr(self.loop, "device", v))
        # redraw the plot's axes for a new schedule shortly after the fields change, not when training starts
        self._axes_timer = QTimer(self)
        self._axes_timer.setSingleShot(True)
        self._axes_timer.setInterval(400)
        self._axes_timer.timeout.connect(self._fit_axes)
        # a Python callable: psygnal cannot read the signature of the builtin QTimer.start (a UserWarning on
        # every docking) and would pass the new value on as the interval
        self.epochs.changed.connect(lambda *_: self._axes_timer.start())
        self.steps.changed.connect(lambda *_: self._axes_timer.start())
        self._fit_axes()
        self.subscribe("history", self._history)
        self.subscribe("model", self._model_changed)
        self._model_changed(self.loop)
        warm_up()

    def busy_widgets(self) -> list:
        return [self.train_button, self.retrain_button, self.form, self.save_button, self.load_button]

    def set_busy(self, busy: bool, message: str = "") -> None:
        super().set_busy(busy, message)
        self.cancel_button.enabled = busy

    def _total_steps(self) -> int:
        return int(self.epochs.value) * int(self.steps.value)

    def _fit_axes(self, *_):
        if self.job is None or self.job.done:
            self.plot.reset(total_steps=self._total_steps())

    def config(self) -> dict:
        """The TrainConfig fields set in the widget (plus ``extra_config``)."""
        return dict(objective=self.objective.value, model=self.model.value, epochs=int(self.epochs.value),
                    steps_per_epoch=int(self.steps.value), device=self.device.value,
                    threads=int(self.threads.value), **self.extra_config)

    # -- actions -------------------------------------------------------------------------------------------------

    def train(self, *_, init=None):
        """Train in a generator worker (from scratch, or from ``init``)."""
        # clears the curves only (the axes were drawn when the fields changed); steps then blit the curves
        self.plot.reset(total_steps=self._total_steps())
        what = "Retrain" if init is not None else "Train"
        return self.start_job(
            lambda: self.loop.iter_train(holdout_fraction=float(self.holdout.value), init=init, **self.config()),
            what, on_event=self._on_event)

    def retrain(self, *_):
        """Train again from the current model with positives, negatives and the unlabeled rest."""
        if self.loop.checkpoint is None:
            from napari.utils.notifications import show_error

            show_error("Retrain: no model yet; train one first (or load one)")
            return None
        return self.train(init=self.loop.checkpoint)

    def cancel(self, *_):
        """Stop training at the next step; the best model so far is kept."""
        self.loop.stop()
        self.status.setText("stopping after this step...")

    def _on_event(self, event: LoopEvent) -> None:
        ev = event.data
        if event.kind == "train" and ev.kind in ("step", "epoch"):
            parts = [f"step {ev.step}/{ev.total_steps}"]
            parts += [f"{CURVES[k]} {ev.losses[k]:.3g}" for k in ("loss", "positive") if k in ev.losses]
            if ev.heldout_ap is not None:
                parts.append(f"held-out AP {ev.heldout_ap:.3f}")
            self.status.setText(" · ".join(parts))

    def _history(self, loop) -> None:
        self.plot.plot_history(loop.history)

    def _model_changed(self, loop) -> None:
        ck = loop.checkpoint
        if ck is None:
            self.model_info.setText("no model yet")
            return
        self.model_info.setText(describe_model(ck))
        if ck.history and not loop.history:
            from napari_pupick.training import TrainEvent

            total = max(int(h.get("step", 0)) for h in ck.history) or 1
            events = [TrainEvent(kind, int(h.get("step", 0)), int(h.get("epoch", 0)), total,
                                 losses=dict(h.get("losses") or {}), heldout_ap=h.get("heldout_ap"))
                      for h in ck.history for kind in ("step", "epoch")]
            self.plot.reset(total_steps=total, draw=False)
            self.plot.plot_history(events, force=True)

    def save(self, path=None):
        """Save the current model (asks for a file when ``path`` is None)."""
        if path is None:
            from qtpy.QtWidgets import QFileDialog

            path, _ = QFileDialog.getSaveFileName(self, "Save model", "model.pt", "Model checkpoint (*.pt)")
            if not path:
                return None
        saved = self.report(lambda: self.loop.save_model(path), "Save model")
        if saved is not None:
            self.status.setText(f"saved {Path(saved).name}")
        return saved

    def load(self, path=None):
        """Load a model (asks for a file when ``path`` is None); re-normalizes if its preprocessing differs."""
        if path is None:
            from qtpy.QtWidgets import QFileDialog

            path, _ = QFileDialog.getOpenFileName(self, "Load model", "", "Model checkpoint (*.pt);;All files (*)")
            if not path:
                return None
        ckpt = self.report(lambda: self.loop.load_model(path), "Load model")
        if ckpt is None:
            return None
        self.status.setText(f"loaded {Path(path).name}")
        pre = self.loop.model_preprocessor()
        current = self.loop.preprocessor.to_dict() if self.loop.preprocessor is not None else None
        if self.loop.micrograph_layer is not None and pre is not None and current != pre.to_dict():
            self.start_job(lambda: self.loop.iter_preprocess(preprocessor=pre),
                           "Preprocess as the model was trained")
        return ckpt
