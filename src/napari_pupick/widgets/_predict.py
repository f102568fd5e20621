"""Dock widget 3: score micrographs in a worker, then inspect: heatmap, picks, live threshold over the histogram."""

from __future__ import annotations

import numpy as np
from magicgui.widgets import CheckBox, Container, FloatSlider, FloatSpinBox, PushButton
from qtpy.QtWidgets import QLabel

from napari_pupick.widgets._common import PupickWidget, hbox, heading, text_label, warm_up
from napari_pupick.widgets._plot import HistogramPlot

__all__ = ["PredictWidget"]


class PredictWidget(PupickWidget):
    """Score the current micrograph or all of them; filter the picks live by score without scoring again.

    The picks layer keeps every candidate above a low logit (-6) with its ``score`` feature; the threshold slider
    only changes which are shown. Deleting picks records them as negatives, adding a point adds a positive.
    """

    #: Scoring a day's micrographs takes a while: its progress stays in this widget (napari's animated activity
    #: bar repaints the window with every update: 16-19 event-loop gaps over 100 ms in a Score all of 19
    #: micrographs against 4-6 without it, bench_gui.py --session).
    napari_progress = False

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.current_button = PushButton(text="Score this micrograph")
        self.all_button = PushButton(text="Score all")
        self.nms_radius = FloatSpinBox(label="NMS radius (px)", value=self.loop.radius, min=0, max=5000, step=1,
                                       tooltip="Picks closer than this (original pixels) suppress each other")
        self.margin = FloatSpinBox(label="edge margin (px)", value=self.loop.effective_margin(), min=0, max=5000,
                                   step=1, tooltip="Drop picks closer than this to the micrograph border (default: "
                                                   "the model's, chosen from the particle radius and the labels)")
        self.heatmap = CheckBox(text="show score heatmap", value=True)
        self.boxes = CheckBox(text="picks as boxes", value=self.loop.show_boxes,
                              tooltip="Draw each pick as its extraction box (2 x radius, as the box exports) "
                                      "instead of a circle")
        self.units = text_label()
        self.form = Container(widgets=[self.nms_radius, self.margin], labels=True)
        self.form.margins = (0, 0, 0, 0)
        self.body.addWidget(heading("Score"))
        self.body.addWidget(hbox(self.current_button, self.all_button))
        self.body.addWidget(self.form.native)
        self.body.addWidget(self.units)
        self.body.addWidget(hbox(self.heatmap, self.boxes))

        self.body.addWidget(heading("Threshold"))
        self.plot = HistogramPlot()
        self.body.addWidget(self.plot)
        # the slider's track spans exactly the histogram's x axis (same range, same pixels: see _align_slider)
        self.threshold = FloatSlider(value=self.loop.threshold, min=-6.0, max=10.0, step=0.01, readout=False,
                                     tracking=True, tooltip="Show picks with score >= threshold (a logit)")
        self.threshold.label = "threshold"
        self.threshold_box = FloatSpinBox(label="threshold", value=self.loop.threshold, min=-1000, max=1000,
                                          step=0.1, tooltip="The threshold (a logit): picks scoring at least "
                                                            "this are shown and exported")
        self.suggest_button = PushButton(text="Model's threshold")
        self.suggest_button.enabled = False
        self.body.addWidget(self.threshold.native)
        self.body.addWidget(hbox(QLabel("threshold"), self.threshold_box, self.suggest_button))
        self.plot.on_resize = self._align_slider
        self.plot.on_pick = self.set_threshold
        self.counts = text_label("no picks yet")
        self.body.addWidget(self.counts)

        self.current_button.changed.connect(lambda *_: self.predict("current"))
        self.all_button.changed.connect(lambda *_: self.predict("all"))
        self.threshold.changed.connect(self._threshold_moved)
        self.threshold_box.changed.connect(self._threshold_moved)
        self.suggest_button.changed.connect(self.use_suggested)
        self.nms_radius.changed.connect(self._extraction_changed)
        self.margin.changed.connect(self._extraction_changed)
        self.heatmap.changed.connect(self._toggle_heatmap)
        self.boxes.changed.connect(lambda v: self.loop.set_boxes(bool(v)))
        self.nms_radius.changed.connect(self._show_units)
        self.margin.changed.connect(self._show_units)
        self.viewer.dims.events.current_step.connect(self._update_counts)
        self.subscribe("picks", self._picks_changed)
        self.subscribe("threshold", self._threshold_changed)
        self.subscribe("model", self._model_changed)
        self.subscribe("micrographs", self._micrographs_changed)
        self.subscribe("particle", self._micrographs_changed)
        self._set_range(self.threshold.min, self.threshold.max)
        self._model_changed(self.loop)
        self._show_units()
        warm_up()

    def busy_widgets(self) -> list:
        return [self.current_button, self.all_button, self.form]

    # -- actions -------------------------------------------------------------------------------------------------

    def predict(self, planes="all"):
        """Score ``planes`` ('current', 'all' or indices) in a worker; picks and heatmap appear plane by plane."""
        if float(self.nms_radius.value) != self.loop.radius:
            self.loop.nms_radius = float(self.nms_radius.value) or None
        if float(self.margin.value) != self.loop.effective_margin():
            self.loop.margin = float(self.margin.value)
        return self.start_job(lambda: self.loop.iter_predict(planes), "Predict",
                              on_done=lambda job: self._picks_changed(self.loop))

    def use_suggested(self, *_):
        """Back to the model's calibrated threshold (no longer a threshold set by hand)."""
        t = self.loop.suggested_threshold
        if t is not None:
            self.loop.set_threshold(t, by_hand=False)

    def set_threshold(self, value: float) -> None:
        """Show the picks with score >= ``value`` (the slider follows)."""
        self.loop.set_threshold(float(value))

    def _threshold_moved(self, value) -> None:
        self.loop.set_threshold(float(value))

    def _show_threshold(self, value: float) -> None:
        """Move the slider and the number to ``value`` without feeding back into the loop."""
        with self.threshold.changed.blocked():
            if value < self.threshold.min or value > self.threshold.max:
                self._set_range(min(self.threshold.min, value), max(self.threshold.max, value))
            self.threshold.value = value
        with self.threshold_box.changed.blocked():
            self.threshold_box.value = round(value, 2)

    def _set_range(self, lo: float, hi: float, scores=None) -> None:
        """The slider's range and the histogram's axis, always the same."""
        with self.threshold.changed.blocked():
            self.threshold.min, self.threshold.max = lo, hi
        self.plot.plot_scores(self.loop.all_scores() if scores is None else scores, self.loop.threshold,
                              xlim=(lo, hi))

    def _align_slider(self, width: int | None = None) -> None:
        """Give the slider's track the histogram axis's pixels: the handle's centre sits at the score it shows."""
        from qtpy.QtWidgets import QSlider, QStyle, QStyleOptionSlider

        slider = self.threshold.native.findChild(QSlider)
        if slider is None:
            return
        opt = QStyleOptionSlider()
        slider.initStyleOption(opt)
        handle = slider.style().subControlRect(QStyle.ComplexControl.CC_Slider, opt,
                                               QStyle.SubControl.SC_SliderHandle, slider).width()
        x0, x1 = self.plot.axis_pixels()
        left = round(x0 - handle / 2)
        right = round(self.plot.width() - x1 - handle / 2)
        self.threshold.native.layout().setContentsMargins(max(left, 0), 0, max(right, 0), 0)

    def _threshold_changed(self, loop) -> None:
        self._show_threshold(loop.threshold)
        self.plot.set_threshold(loop.threshold)
        self._update_counts()

    def _extraction_changed(self, *_):
        """A new NMS radius or margin: extract the picks again from the cached scores, in a worker."""
        radius, margin = float(self.nms_radius.value), float(self.margin.value)
        if self.loop.scores:
            self.start_job(lambda: self.loop.iter_reextract(radius or None, margin), "Re-extract picks")
        else:
            self.loop.nms_radius, self.loop.margin = radius or None, margin

    def _show_units(self, *_):
        """NMS radius, edge margin and box size in pixels, and in Angstrom when the pixel size is known."""
        loop = self.loop
        self.units.setText(f"NMS radius {loop.in_angstrom(float(self.nms_radius.value))} · edge margin "
                           f"{loop.in_angstrom(float(self.margin.value))} · box {loop.in_angstrom(2 * loop.radius)}")

    def _toggle_heatmap(self, value) -> None:
        layer = self.loop.scores_layer
        if layer is not None and layer in self.viewer.layers:
            layer.visible = bool(value)

    # -- views ---------------------------------------------------------------------------------------------------

    def _micrographs_changed(self, loop) -> None:
        """The NMS radius and the edge margin follow the particle radius (and the model) until set here."""
        if loop.nms_radius is None:
            with self.nms_radius.changed.blocked():
                self.nms_radius.value = loop.radius
        if loop.margin is None:
            with self.margin.changed.blocked():
                self.margin.value = loop.effective_margin()
        self._show_units()

    def _model_changed(self, loop) -> None:
        t = loop.suggested_threshold
        self.suggest_button.enabled = t is not None
        self.suggest_button.text = "Model's threshold" if t is None else f"Model's threshold ({t:.2f})"
        self.suggest_button.tooltip = ("The threshold training calibrated from the held-out labels"
                                       if t is not None else "Known after training")
        if loop.margin is None:
            with self.margin.changed.blocked():
                self.margin.value = loop.effective_margin()
        self._show_units()  # the line under the fields says what they hold now
        self._show_threshold(loop.threshold)
        self.plot.set_threshold(loop.threshold)

    def _picks_changed(self, loop) -> None:
        scores = loop.all_scores()
        if scores.size:
            lo, hi = float(np.floor(scores.min())), float(np.ceil(scores.max()))
            self._set_range(min(lo, loop.threshold), max(hi, loop.threshold), scores)
        else:
            self._set_range(self.threshold.min, self.threshold.max, scores)
        self._show_threshold(loop.threshold)
        if loop.scores_layer is not None:
            loop.scores_layer.visible = bool(self.heatmap.value)
        self._update_counts()

    def _update_counts(self, *_):
        loop = self.loop
        layer = loop.picks_layer
        if layer is None or layer not in self.viewer.layers or not len(layer.data):
            self.counts.setText("no picks yet")
            return
        shown = layer.shown
        total = int(shown.sum())
        if loop.stacked:
            plane = loop.current_plane()
            on_plane = np.rint(np.asarray(layer.data)[:, 0]).astype(int) == plane
            per = np.bincount(np.rint(np.asarray(layer.data)[shown, 0]).astype(int), minlength=loop.n_planes)
            scored = sorted(loop.scores)
            per = per[scored] if scored else per
            here = int((shown & on_plane).sum())
            text = (f"{total} of {len(shown)} candidates shown · this micrograph ({loop.names[plane]}): {here}"
                    f"<br>per scored micrograph: mean {per.mean():.0f}, min {per.min()}, max {per.max()} "
                    f"({len(per)} micrographs)")
        else:
            text = f"{total} of {len(shown)} candidates shown"
        self.counts.setText(text)
