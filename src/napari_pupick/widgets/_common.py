"""What every pupick dock widget shares: the session, a job runner (thread worker + progress + errors), styling."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QScrollArea, QSizePolicy, QVBoxLayout, QWidget

from napari_pupick.errors import PupickError
from napari_pupick.loop import LoopEvent, PickLoop

__all__ = ["Job", "JobError", "PupickWidget", "heading", "hbox", "install_shortcuts", "text_label", "warm_up",
           "wrap_path"]

_WARM_UP = None


def warm_up():
    """Prepare torch in a background thread, once: import the training and scoring modules and run one step of a
    tiny training. Returns the thread.

    Importing torch, and the first model built and run (which imports more lazily, e.g. sympy, and sets up the CPU
    kernels), hold the GIL for stretches of up to half a second; done when a widget is docked, those hitches do
    not land in the middle of the first training or prediction.
    """
    global _WARM_UP
    if _WARM_UP is not None:
        return _WARM_UP
    import threading

    def _run():
        import numpy as np
        import pandas as pd

        from napari_pupick.training import TrainConfig, Trainer

        # one step of a tiny training with a held-out image runs every code path a real run will take
        rng = np.random.default_rng(0)
        images = [rng.standard_normal((48, 48)).astype(np.float32) for _ in range(2)]
        labels = pd.DataFrame({"micrograph": ["a", "b"], "x": [20.0, 24.0], "y": [20.0, 24.0]})
        config = TrainConfig(model_params={"width": 0.125}, epochs=1, steps_per_epoch=1, batch_size=2, tile=33,
                             particle_radius=4, expected_particles=2, device="cpu", threads=1, warmup=1)
        for _ in Trainer(images, ["a", "b"], labels, config, holdout=["b"]).run():
            pass
        # and the calibration after round 1 (scipy.stats and scipy.optimize are first imported there: a 0.4 s
        # stall of the viewer 9 s into the first training, bench_gui.py --session)
        from napari_pupick.calibration import calibrate
        from napari_pupick.extract import nms

        nms(rng.standard_normal((48, 48)).astype(np.float32), 4.0, threshold=-6.0)
        xy = rng.uniform(0, 48, (60, 2))
        candidates = pd.DataFrame({"micrograph": "a", "x": np.r_[20.0, xy[:, 0]], "y": np.r_[20.0, xy[:, 1]],
                                   "score": np.r_[3.0, rng.normal(-2.0, 1.0, 60)]})
        calibrate(candidates, labels.iloc[:1], None, 4.0, 1)

    _WARM_UP = threading.Thread(target=_run, name="pupick-warm-up", daemon=True)
    _WARM_UP.start()
    return _WARM_UP


def install_shortcuts(loop) -> None:
    """The loop's keyboard shortcuts (:data:`napari_pupick.loop.keys.SHORTCUTS`), once per viewer: bound on the
    viewer (canvas focus) and as window-wide Qt shortcuts (focus in a dock widget: the panel, the layer list).
    Text fields keep their own keys (Qt lets a focused line edit take a plain key or Ctrl+Z first)."""
    from qtpy.QtGui import QKeySequence, QShortcut

    from napari_pupick.loop.keys import SHORTCUTS, bind_keys

    if getattr(loop, "_shortcuts", None) is not None:
        return
    viewer = loop.viewer
    bind_keys(viewer, loop)
    window = getattr(getattr(viewer, "window", None), "_qt_window", None)
    loop._shortcuts = []
    if window is None:
        return
    for key, name, _ in SHORTCUTS:
        shortcut = QShortcut(QKeySequence(key), window)
        shortcut.setContext(Qt.ShortcutContext.WindowShortcut)
        shortcut.activated.connect(lambda name=name: getattr(loop, name)())
        loop._shortcuts.append(shortcut)


class JobError(PupickError):
    """A RuntimeError (e.g. TrainingError) raised inside a worker job, carried to the main thread."""


def text_label(text: str = "") -> QLabel:
    """A word-wrapped label whose text never widens the dock widget (a wider dock would resize the plots, and a
    plot resize is a full matplotlib redraw)."""
    label = QLabel(text)
    label.setWordWrap(True)
    label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    label.setMinimumWidth(50)
    return label


def wrap_path(path) -> str:
    """A path a word-wrapped label can break after each ``/`` (zero-width spaces), so it is shown whole."""
    return str(path).replace("/", "/\u200b").replace("\\", "\\\u200b")


def heading(text: str) -> QLabel:
    """A small bold section title."""
    label = QLabel(f"<b>{text}</b>")
    label.setContentsMargins(0, 6, 0, 0)
    return label


def hbox(*widgets) -> QWidget:
    """Widgets side by side (magicgui widgets or QWidgets)."""
    box = QWidget()
    layout = QHBoxLayout(box)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.setSpacing(4)
    for w in widgets:
        layout.addWidget(getattr(w, "native", w))
    return box


class Job:
    """One long job: a loop generator run by a napari thread worker.

    Each yielded :class:`~napari_pupick.loop.LoopEvent` is applied to the layers on the main thread
    (``loop.handle``), advances a napari progress bar and the widget's own bar, and is passed to ``on_event``.
    An exception inside the worker becomes an error notification (``show_error``), never a crash.
    """

    def __init__(self, owner: PupickWidget, events: Iterator[LoopEvent], description: str,
                 on_event: Callable | None = None, on_done: Callable | None = None):
        from napari.qt.threading import create_worker
        from napari.utils import progress

        self.owner = owner
        self.description = description
        self.error: BaseException | None = None
        self.done = False  # True once the worker has finished (returned, failed or was stopped)
        # napari's activity panel bar (besides the widget's own); see PupickWidget.napari_progress
        self._pbar = progress(total=0, desc=description) if owner.napari_progress else None
        self._on_event, self._on_done = on_event, on_done
        self._queue: deque = deque()
        self._draining = False
        self._finish_pending = False
        self._last_bar = 0.0

        def run():
            try:
                yield from events
            except RuntimeError as exc:
                # superqt takes a RuntimeError in a worker for a deleted worker and drops it silently (no
                # `errored`, no `finished`): TrainingError is one, so it travels wrapped.
                raise JobError(str(exc)) from exc

        self.worker = create_worker(run, _ignore_errors=True)
        self.worker.yielded.connect(self._yielded)
        self.worker.errored.connect(self._errored)
        self.worker.finished.connect(self._finished)
        owner.set_busy(True, description)
        self.worker.start()

    def _yielded(self, event: LoopEvent) -> None:
        # napari's progress bars call QApplication.processEvents(), so this slot can be re-entered by the next
        # queued event: events are queued and applied strictly in order by the outermost call.
        self._queue.append(event)
        if self._draining:
            return
        self._draining = True
        try:
            while self._queue:
                event = self._queue.popleft()
                try:
                    self._apply(event)
                except Exception as exc:  # e.g. a layer the job updates was deleted meanwhile
                    self._queue.clear()
                    self.worker.quit()
                    self._errored(exc)
        finally:
            self._draining = False
        if self._finish_pending:
            self._finished()

    def _apply(self, event: LoopEvent) -> None:
        self.owner.show_progress(event.step, event.total, event.message)
        self.owner.loop.handle(event)
        if self._on_event is not None:
            self._on_event(event)
        now = time.perf_counter()
        if self._pbar is not None and event.total and (now - self._last_bar > 0.1 or event.step >= event.total):
            self._last_bar = now
            if self._pbar.total != event.total:
                self._pbar.total = event.total
            self._pbar.n = event.step
            if event.message:
                self._pbar.set_description(f"{self.description}: {event.message}"[:70])
            self._pbar.refresh()

    def _errored(self, exc: BaseException) -> None:
        from napari.utils.notifications import show_error

        self.error = exc
        show_error(f"{self.description} failed: {exc}")
        self.owner.status.setText(f"<span style='color:#ff7070'>{self.description} failed: {exc}</span>")

    def _finished(self) -> None:
        if self._draining:  # events still being applied: finish after them
            self._finish_pending = True
            return
        self._finish_pending = False
        if self.done:
            return
        self.done = True
        try:  # a scoring job cancelled or failed midway: what it scored still shows
            self.owner.loop.flush_picks()
        except Exception as exc:  # e.g. the picks layer was deleted meanwhile
            self._errored(exc)
        if self._pbar is not None:
            self._pbar.close()
        self.owner.set_busy(False)
        if self._on_done is not None:
            self._on_done(self)


class PupickWidget(QWidget):
    """Base of the dock widgets: the viewer's :class:`PickLoop`, a progress bar, a status line, one job at a time.

    Subclasses put their controls into ``self.body`` (a QVBoxLayout) and call :meth:`start_job`.
    """

    #: Also show jobs in napari's activity panel (``napari.utils.progress``). Where the window is drawn by
    #: software OpenGL (remote desktops, Xvfb) each such bar costs the event loop about 0.5 s to create, and its
    #: animated indicator repaints the whole window continuously (measured: one CPU core busy, training 3x
    #: slower on 2 cores). Short jobs use it; training shows its own bar only (see TrainWidget).
    napari_progress = True

    def __init__(self, napari_viewer):
        super().__init__()
        self.loop = PickLoop.for_viewer(napari_viewer)
        self.viewer = self.loop.viewer  # the viewer itself (napari passes plugins a public-only proxy)
        self.job: Job | None = None
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(4)
        # the controls scroll (no step asks for more height than the dock gets, docked alone or with the
        # others); the progress bar and the status line stay in view below them
        inner = QWidget()
        wrap = QVBoxLayout(inner)
        wrap.setContentsMargins(6, 6, 6, 0)
        self.body = QVBoxLayout()
        self.body.setSpacing(4)
        wrap.addLayout(self.body)
        wrap.addStretch(1)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        self.scroll.setWidget(inner)
        self.scroll.setMinimumHeight(120)
        outer.addWidget(self.scroll, 1)
        self.progress = QProgressBar()
        self.progress.setMaximumHeight(14)
        self.progress.setTextVisible(False)
        policy = self.progress.sizePolicy()
        policy.setRetainSizeWhenHidden(True)  # showing it must not re-layout the widget (and resize the plots)
        self.progress.setSizePolicy(policy)
        self.progress.setVisible(False)
        self.status = text_label()
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self._footer = QVBoxLayout()
        self._footer.setContentsMargins(6, 0, 6, 6)
        self._footer.addWidget(self.progress)
        self._footer.addWidget(self.status)
        outer.addLayout(self._footer)
        self._subscriptions: list = []
        self.destroyed.connect(self._unsubscribe_all)
        install_shortcuts(self.loop)

    # -- loop callbacks that do not outlive the widget ---------------------------------------------------------

    def subscribe(self, what: str, callback: Callable) -> None:
        self.loop.connect(what, callback)
        self._subscriptions.append(callback)

    def _unsubscribe_all(self, *_):
        for cb in self._subscriptions:
            self.loop.disconnect(cb)
        self._subscriptions = []

    # -- jobs ----------------------------------------------------------------------------------------------------

    @property
    def worker(self):
        """The thread worker of the last job started here (None before any)."""
        return None if self.job is None else self.job.worker

    def busy_widgets(self) -> list:
        """Controls disabled while a job runs (override)."""
        return []

    def set_busy(self, busy: bool, message: str = "") -> None:
        for w in self.busy_widgets():
            getattr(w, "native", w).setEnabled(not busy)
        self.progress.setVisible(busy)
        if busy:
            # a determinate bar at 0 until the job reports its length: Qt's "busy" animation repaints forever
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
            self.status.setText(message + "...")

    def show_progress(self, step: int, total: int, message: str = "") -> None:
        if total:
            self.progress.setRange(0, int(total))
            self.progress.setValue(int(step))
        if message:
            self.status.setText(message)

    def start_job(self, make_events: Callable[[], Iterator[LoopEvent]], description: str,
                  on_event: Callable | None = None, on_done: Callable | None = None) -> Job | None:
        """Start ``make_events()`` in a thread worker; errors while setting up are shown, not raised."""
        from napari.utils.notifications import show_error

        if self.job is not None and self.job.worker.is_running:
            show_error(f"{description}: another job of this widget is still running")
            return None
        try:
            events = make_events()
        except Exception as exc:  # setting up reads layers and settings: report, do not crash the viewer
            show_error(f"{description} failed: {exc}")
            self.status.setText(f"<span style='color:#ff7070'>{description} failed: {exc}</span>")
            return None
        self.job = Job(self, events, description, on_event, on_done)
        return self.job

    def report(self, func: Callable, description: str):
        """Call ``func()`` (a quick main-thread action); an error becomes a notification. Returns its result."""
        from napari.utils.notifications import show_error

        try:
            return func()
        except Exception as exc:
            show_error(f"{description} failed: {exc}")
            self.status.setText(f"<span style='color:#ff7070'>{description} failed: {exc}</span>")
            return None
