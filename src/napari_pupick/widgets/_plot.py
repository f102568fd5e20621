"""Small matplotlib canvases for the dock widgets: the fitted mixture, the training curves, the score histogram.

Each canvas redraws only what changed and at most every ``min_interval`` seconds while a job streams updates, so
plotting never holds the event loop for long.
"""

from __future__ import annotations

import time

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator
from qtpy.QtWidgets import QSizePolicy

__all__ = ["HistogramPlot", "MixturePlot", "PlotCanvas", "TrainingPlot"]

_BG = "#262930"  # napari's dark theme
_FG = "#d7d9dc"
_GRID = "#414851"
_COLORS = ["#ffd200", "#33ccff", "#ff7f50", "#b388ff", "#7cfc00", "#ff69b4"]


class PlotCanvas(FigureCanvasQTAgg):
    """A compact figure with one axes, styled for napari's dark theme."""

    def __init__(self, height: float = 1.9, min_interval: float = 0.25, margins=(0.04, 0.97)):
        fig = Figure(figsize=(3.6, height), dpi=90, facecolor=_BG)
        super().__init__(fig)
        self.ax = fig.add_subplot(111)
        # fixed margins: a constrained layout would cost ~100 ms per draw on a slow CPU
        fig.subplots_adjust(left=margins[0], right=margins[1], bottom=0.2 * 1.9 / height + 0.02, top=0.96)
        self._style(self.ax)
        # a fixed height: a label growing a line elsewhere in the widget must not resize the canvas (a resize is a
        # full redraw)
        self.setFixedHeight(int(round(height * 90)))
        self.setMinimumWidth(200)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.min_interval = float(min_interval)
        self._last_draw = 0.0

    @staticmethod
    def _style(ax) -> None:
        ax.set_facecolor(_BG)
        for spine in ax.spines.values():
            spine.set_color(_GRID)
        ax.tick_params(colors=_FG, labelsize=7, length=2)
        ax.xaxis.label.set_color(_FG)
        ax.yaxis.label.set_color(_FG)
        ax.xaxis.label.set_size(7)
        ax.yaxis.label.set_size(7)

    def redraw(self, force: bool = False) -> bool:
        """Schedule a redraw unless one happened less than ``min_interval`` ago (``force``: always)."""
        now = time.perf_counter()
        if not force and now - self._last_draw < self.min_interval:
            return False
        self._last_draw = now
        self.draw_idle()
        return True


class MixturePlot(PlotCanvas):
    """Histogram of the normalized pixels with the two fitted mixture components over it."""

    def plot_mixture(self, centres, density, pdf0=None, pdf1=None) -> None:
        ax = self.ax
        ax.clear()
        self._style(ax)
        centres = np.asarray(centres)
        width = float(centres[1] - centres[0]) if len(centres) > 1 else 1.0
        edges = np.r_[centres - width / 2, centres[-1:] + width / 2]
        # one filled step outline, not 256 bar patches (those took 0.5 s of the main thread to make and draw)
        ax.stairs(density, edges, fill=True, color="#8a93a0", alpha=0.8, linewidth=0, label="pixels")
        if pdf0 is not None and pdf1 is not None:
            ax.plot(centres, pdf0, color=_COLORS[1], lw=1.2, label="component 0")
            ax.plot(centres, pdf1, color=_COLORS[2], lw=1.2, label="component 1")
            ax.plot(centres, np.asarray(pdf0) + np.asarray(pdf1), color=_COLORS[0], lw=1.0, ls="--",
                    label="mixture")
        ax.set_xlabel("normalized pixel value")
        ax.set_yticks([])
        leg = ax.legend(fontsize=6, frameon=False, labelcolor=_FG, loc="upper right")
        leg.set_visible(True)
        self.redraw(force=True)


#: Loss terms of a training step as a microscopist reads them (``objective`` is left out: without rejected picks
#: and reconstruction it is the total loss again). Terms on the right axis are probabilities, not losses.
CURVES = {"loss": "total loss", "positive": "labelled particles", "negative": "rejected picks",
          "reconstruction": "reconstruction", "unlabeled_mean_g": "unlabelled: mean probability"}
_RIGHT = {"unlabeled_mean_g"}
_CURVE_TIPS = {
    "total loss": "What training minimises (lower is better)",
    "labelled particles": "Loss on your labelled particles: falls as the model learns to find them",
    "rejected picks": "Loss on the picks you rejected: falls as the model learns to avoid them",
    "reconstruction": "Autoencoder reconstruction error",
    "unlabelled: mean probability": "Mean predicted particle probability over unlabelled regions (right axis): "
                                    "should settle near the expected share of particles",
    "held-out AP": "Average precision on labels held out of training (right axis; 1 is perfect)",
}


class TrainingPlot(PlotCanvas):
    """Loss terms per step (left axis, log scale) and held-out average precision per epoch (right axis).

    While training streams steps, only the lines are redrawn (blitted over a cached background); the axes are
    drawn again only when the data leave the current limits, so an update costs a few milliseconds.
    """

    def __init__(self, height: float = 2.1, min_interval: float = 0.25):
        from napari_pupick.widgets._common import text_label

        super().__init__(height, min_interval, margins=(0.13, 0.87))
        #: The legend, as a Qt label under the plot (a matplotlib legend would need a full redraw per change).
        self.legend = text_label()
        self.ax_ap = self.ax.twinx()
        self._lines: dict = {}
        self._ap_line = None
        self._background = None
        self._needs_full = True
        self.mpl_connect("draw_event", self._on_draw)
        self.reset()

    def reset(self, total_steps: int | None = None, draw: bool = True) -> None:
        """Clear the curves for a run of ``total_steps`` steps (``draw=False``: leave drawing to the next update).

        When the axes already fit, only the curves are cleared (no full redraw).
        """
        if self._background is not None and total_steps and tuple(self.ax.get_xlim()) == (0, total_steps):
            for line in self._lines.values():
                line.set_data([], [])
            self._ap_line.set_data([], [])
            self._blit()
            return
        for ax in (self.ax, self.ax_ap):
            ax.clear()
            self._style(ax)
        self._lines = {}
        self.ax.set_xlabel("step")
        self.ax.set_ylabel("loss")
        self.ax.set_yscale("log")
        # plain major labels and no minor ticks: mathtext labels and dozens of minor tick objects cost most of a
        # full redraw
        self.ax.yaxis.set_major_locator(LogLocator(numticks=5))
        self.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        self.ax.yaxis.set_minor_locator(NullLocator())
        self.ax.set_ylim(1e-2, 1e2)  # wide from the start: every change of limits costs a full redraw
        self.ax.set_xlim(0, total_steps or 10)
        self.ax_ap.set_ylim(0, 1.02)
        self.ax_ap.set_yticks([0, 0.5, 1.0])
        self.ax_ap.yaxis.tick_right()  # clear() puts a twin axis back on the left
        self.ax_ap.yaxis.set_label_position("right")
        self.ax_ap.set_ylabel("AP, probability")
        (self._ap_line,) = self.ax_ap.plot([], [], "o-", color="#7cfc00", ms=3, lw=1.2, label="held-out AP",
                                           animated=True)
        self._background = None
        if draw:
            self.draw_idle()

    def _update_legend(self) -> None:
        items = [(CURVES[key], line.get_color()) for key, line in self._lines.items()]
        if len(self._ap_line.get_xdata()):  # only when micrographs are held out (the count-calibrated run has none)
            items.append(("held-out AP", "#7cfc00"))
        # no break inside an entry, a break allowed between entries
        self.legend.setText(" ".join(f"<span style='white-space:nowrap'><span style='color:{c}'>&#9632;</span>"
                                     f"&nbsp;{k.replace(' ', '&nbsp;')}&nbsp;&nbsp;</span>" for k, c in items))
        self.legend.setToolTip("<br>".join(f"<b>{k}</b>: {_CURVE_TIPS[k]}" for k, _ in items))

    def _blit(self) -> None:
        if self._background is None:
            self.draw_idle()
            return
        self.restore_region(self._background)
        self._draw_lines()
        self.update()  # painted with the next frame (FigureCanvasQTAgg.blit would repaint right now)

    def _on_draw(self, event=None) -> None:
        self._background = self.copy_from_bbox(self.figure.bbox)
        self._draw_lines()

    def _draw_lines(self) -> None:
        for line in self._lines.values():
            line.axes.draw_artist(line)
        self.ax_ap.draw_artist(self._ap_line)

    def plot_history(self, history, force: bool = False) -> None:
        """Plot a list of TrainEvents (the loop's ``history``)."""
        steps = [e for e in history if e.kind == "step" and e.losses]
        full = force
        if history and history[0].total_steps and self.ax.get_xlim()[1] != history[0].total_steps:
            self.ax.set_xlim(0, history[0].total_steps)
            full = True
        if steps:
            keys = [k for k in CURVES if np.isfinite(steps[-1].losses.get(k, np.nan))]
            for stale in set(self._lines) - set(keys):  # another objective: other loss terms
                self._lines.pop(stale).remove()
                self._update_legend()
            x = np.array([e.step for e in steps])
            lo, hi = np.inf, -np.inf
            for i, key in enumerate(keys):
                y = np.array([e.losses.get(key, np.nan) for e in steps], float)
                right = key in _RIGHT
                if not right:
                    y = np.where(y > 0, y, np.nan)
                line = self._lines.get(key)
                if line is None:
                    ax = self.ax_ap if right else self.ax
                    (line,) = ax.plot([], [], lw=1.0, color=_COLORS[i % len(_COLORS)], label=CURVES[key],
                                      animated=True, ls="--" if right else "-")
                    self._lines[key] = line
                    self._update_legend()
                line.set_data(x, y)
                if not right and np.isfinite(y).any():
                    lo, hi = min(lo, np.nanmin(y)), max(hi, np.nanmax(y))
            ymin, ymax = self.ax.get_ylim()
            if np.isfinite(lo) and (lo < ymin or hi > ymax):
                self.ax.set_ylim(10 ** np.floor(np.log10(lo) - 0.5), 10 ** np.ceil(np.log10(hi) + 0.5))
                full = True
        elif not force:
            return  # nothing to show yet: wait for the first step (one full redraw instead of two)
        epochs = [e for e in history if e.kind == "epoch" and e.heldout_ap is not None]
        had_ap = len(self._ap_line.get_xdata()) > 0
        self._ap_line.set_data([e.step for e in epochs], [e.heldout_ap for e in epochs])
        if had_ap != bool(epochs):
            self._update_legend()
        if full or self._background is None:
            self.draw_idle()  # the draw event re-captures the background and draws the lines
        elif self.redraw_allowed():
            self._blit()

    def redraw_allowed(self) -> bool:
        now = time.perf_counter()
        if now - self._last_draw < self.min_interval:
            return False
        self._last_draw = now
        return True


class HistogramPlot(PlotCanvas):
    """Histogram of pick scores with the threshold as a vertical line; moving the threshold redraws only the line
    and the shading (blitted over the cached histogram)."""

    def __init__(self, height: float = 1.6, min_interval: float = 0.0):
        super().__init__(height, min_interval)
        self._line = None
        self._span = None
        self._background = None
        #: Called with the new width after each resize (the threshold slider below re-aligns its track).
        self.on_resize = None
        #: Called with the score under the mouse when the histogram is clicked or dragged (sets the threshold).
        self.on_pick = None
        self._pressed = False
        self.mpl_connect("draw_event", self._on_draw)
        self.mpl_connect("button_press_event", self._press)
        self.mpl_connect("motion_notify_event", self._drag)
        self.mpl_connect("button_release_event", self._release)
        self.setToolTip("Scores of all candidates; the picks are those right of the yellow line (click or drag to "
                        "move it)")
        self.plot_scores(np.zeros(0), 0.0)

    def axis_pixels(self) -> tuple[float, float]:
        """Left and right end of the x axis, in Qt pixels from the canvas's left edge."""
        pars = self.figure.subplotpars
        return pars.left * self.width(), pars.right * self.width()

    def resizeEvent(self, event):
        super().resizeEvent(event)
        if self.on_resize is not None:
            self.on_resize(self.width())

    def _press(self, event):
        if event.inaxes is self.ax and event.xdata is not None and self.on_pick is not None:
            self._pressed = True
            self.on_pick(float(event.xdata))

    def _drag(self, event):
        if self._pressed and event.inaxes is self.ax and event.xdata is not None:
            self.on_pick(float(event.xdata))

    def _release(self, event):
        self._pressed = False

    def plot_scores(self, scores, threshold: float, xlim: tuple[float, float] | None = None) -> None:
        """Histogram of ``scores`` with the threshold line; ``xlim``: the axis range (the slider's range, so the
        slider's track lines up with the axis), default the scores' range."""
        ax = self.ax
        ax.clear()
        self._style(ax)
        scores = np.asarray(scores, float)
        scores = scores[np.isfinite(scores)]
        if scores.size:
            lo, hi = (float(scores.min()), float(scores.max())) if xlim is None else map(float, xlim)
            ax.hist(scores, bins=np.linspace(lo, hi, 61) if hi > lo else 60, color="#8a93a0", linewidth=0)
            ax.set_yscale("log")
            ax.set_xlim(lo, hi if hi > lo else lo + 1)
        elif xlim is not None:
            ax.set_xlim(*xlim)
        ax.set_xlabel("score (logit)")
        ax.set_yticks([])
        ax.yaxis.set_minor_locator(NullLocator())
        self._line = ax.axvline(threshold, color="#ffd200", lw=1.5, animated=True)
        self._span = ax.axvspan(ax.get_xlim()[0], threshold, color="black", alpha=0.35, lw=0, animated=True)
        self._background = None
        self.redraw(force=True)

    def _on_draw(self, event=None) -> None:
        self._background = self.copy_from_bbox(self.figure.bbox)
        self._draw_marker()

    def _draw_marker(self) -> None:
        self.ax.draw_artist(self._span)
        self.ax.draw_artist(self._line)

    def set_threshold(self, threshold: float) -> None:
        self._line.set_xdata([threshold, threshold])
        lo = self.ax.get_xlim()[0]
        self._span.set_x(lo)
        self._span.set_width(threshold - lo)
        if self._background is None:
            self.draw_idle()
            return
        self.restore_region(self._background)
        self._draw_marker()
        self.update()  # painted with the next frame (FigureCanvasQTAgg.blit would repaint right now)
