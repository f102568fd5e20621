"""How responsive the viewer stays: event-loop gaps while training runs on the CPU, and the threshold refilter.

1. **Event-loop gaps during training.** A real napari viewer (on Xvfb when there is no display) holds the sample
   data, preprocessed (binned by 2). A QTimer fires every 10 ms and records when it actually ran; the longest gap
   between two ticks is how long the viewer was frozen. Measured: the idle viewer, with and without flipping
   through the micrographs every 200 ms (napari's own redraw cost, the baseline); then the Train widget's button
   starts training with the widget's defaults (conv3, GE-binomial, no napari activity bar) for 1 and 2 torch
   threads, with 1 thread while browsing, and with 1 thread and napari's activity-panel progress bar. The widget is
   docked (and torch warmed up in the background) before the clock starts; that docking is reported apart.
   Target: under 100 ms.
2. **Threshold refilter of 100,000 picks.** A picks layer with 100,000 picks over 20 planes (the Predict widget
   docked); the threshold is moved 40 times. Timed: ``PickLoop.set_threshold`` (``layer.shown`` from the
   ``score`` feature, plus the widget's histogram line and counts, which it triggers), the slider's own reaction,
   and that plus the repaint of the window. Target: under 50 ms.

3. **A session on real data** (``--session``, the figures of docs/benchmarks.md): a 1920 x 1080 window with the
   Picking panel docked, the 19 apoferritin micrographs of ``../shared/data`` opened with the panel's Open
   micrographs, 100 labels; Preprocess, Train, Score all and a re-extraction (new edge margin) pressed as a user
   does, with every setting at its default, while a 40 ms timer pans the view. Reported per step: the longest
   event-loop gap and the gaps over 100 ms; then the threshold refilter at 100,000 candidates in that window
   (core, slider, slider plus repaint), the time to change micrograph (``dims`` step plus repaint, with the
   picks and the heatmap shown) and the main window's minimum size. Targets: gaps under 100 ms, refilter and
   redraw under 50 ms, micrograph change under 50 ms.

Run from the repository root::

    .venv/bin/python benchmarks/bench_gui.py [--steps 30] [--threads 1 2] [--json out.json]
    PUPICK_DATA=../shared/data .venv/bin/python benchmarks/bench_gui.py --session [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np


def start_xvfb():
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    if shutil.which("Xvfb") is None:
        raise SystemExit("no display and no Xvfb")
    for number in range(110, 130):
        if not Path(f"/tmp/.X{number}-lock").exists():
            break
    proc = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", "1920x1080x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ["DISPLAY"] = f":{number}"
    time.sleep(1.0)
    return proc


class TickRecorder:
    """A 10 ms QTimer that records when it actually fires."""

    def __init__(self, interval_ms: int = 10):
        from qtpy.QtCore import QTimer

        self.times: list[float] = []
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(lambda: self.times.append(time.perf_counter()))

    def start(self):
        self.times = [time.perf_counter()]
        self.timer.start()

    def stop(self) -> np.ndarray:
        self.timer.stop()
        return np.diff(np.asarray(self.times)) * 1000.0


def pump(app, seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.002)


def gap_stats(gaps) -> dict:
    return {"ticks": int(len(gaps)), "max_gap_ms": round(float(gaps.max()), 1),
            "p99_gap_ms": round(float(np.percentile(gaps, 99)), 1),
            "median_gap_ms": round(float(np.median(gaps)), 1),
            "gaps_over_50ms": int((gaps > 50).sum()), "gaps_over_100ms": int((gaps > 100).sum())}


def bench_idle(viewer, app, browse: bool, seconds: float = 8.0) -> dict:
    """Event-loop gaps of the viewer doing nothing but (optionally) flipping planes: the baseline."""
    ticks = TickRecorder()
    ticks.start()
    plane, last_flip, end = 0, time.perf_counter(), time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.001)
        if browse and time.perf_counter() - last_flip > 0.2:
            plane = (plane + 1) % 4
            viewer.dims.set_current_step(0, plane)
            last_flip = time.perf_counter()
    return {"browse": browse, **gap_stats(ticks.stop())}


def bench_training(viewer, app, threads: int, epochs: int, steps: int, browse: bool = True,
                   napari_progress: bool = False) -> dict:
    """Longest event-loop gap while the Train widget trains (widget defaults, ``threads`` torch threads)."""
    from napari_pupick.loop import PickLoop
    from napari_pupick.widgets._train import TrainWidget

    TrainWidget.napari_progress = napari_progress

    loop = PickLoop.for_viewer(viewer)
    ticks = TickRecorder()
    ticks.start()
    dock, train = viewer.window.add_plugin_dock_widget("napari-pupick", "2 Train")
    train.epochs.value, train.steps.value, train.threads.value = epochs, steps, threads
    from napari_pupick.widgets._common import warm_up

    pump(app, 2.0)  # the user sets the fields, while torch warms up in the background (once per session)
    warming = warm_up()
    while warming.is_alive():
        pump(app, 0.1)
    docking = gap_stats(ticks.stop())
    ticks.start()
    t0 = time.perf_counter()
    train.train_button.native.click()
    click_ms = (time.perf_counter() - t0) * 1000
    plane, last_flip = 0, time.perf_counter()
    while not train.job.done:
        app.processEvents()
        time.sleep(0.001)
        if browse and time.perf_counter() - last_flip > 0.2:  # browse the micrographs while training
            plane = (plane + 1) % loop.n_planes
            viewer.dims.set_current_step(0, plane)
            last_flip = time.perf_counter()
    wall = time.perf_counter() - t0
    times = np.asarray(ticks.times)
    gaps = ticks.stop()
    big = np.flatnonzero(gaps > 100)
    stalls = [(round(float(times[i] - t0), 2), round(float(gaps[i]))) for i in big]
    if train.job.error is not None:
        raise RuntimeError(train.job.error)
    n_steps = sum(e.kind == "step" for e in loop.history)
    viewer.window.remove_dock_widget(dock)
    return {"threads": threads, "browse": browse, "napari_progress": napari_progress, "steps": n_steps,
            "wall_s": round(wall, 2),
            "s_per_step": round(wall / max(n_steps, 1), 3), **gap_stats(gaps),
            "click_handler_ms": round(click_ms, 1), "stalls_over_100ms_at_s": stalls[:12],
            "docking_max_gap_ms": docking["max_gap_ms"]}


class Panner:
    """A timer that pans the view in a small circle every ``interval_ms`` (a user dragging the canvas)."""

    def __init__(self, viewer, interval_ms: int = 40, radius: float = 60.0):
        from qtpy.QtCore import QTimer

        self.viewer, self.radius, self.k = viewer, radius, 0
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._pan)

    def _pan(self):
        cam = self.viewer.scene.camera
        self.k += 1
        angle = 0.3 * self.k
        c = list(cam.center)
        c[-2] = self.y0 + self.radius * np.sin(angle)
        c[-1] = self.x0 + self.radius * np.cos(angle)
        cam.center = tuple(c)

    def start(self):
        self.y0, self.x0 = self.viewer.scene.camera.center[-2:]
        self.timer.start()

    def stop(self):
        self.timer.stop()


def _run_step(app, viewer, widget, press, pan: bool = True) -> dict:
    """Press a button (``press()``), keep the event loop running (panning) until the widget's job is done."""
    ticks, panner = TickRecorder(), Panner(viewer)
    ticks.start()
    if pan:
        panner.start()
    t0 = time.perf_counter()
    press()
    while widget.job is None or not widget.job.done:
        app.processEvents()
        time.sleep(0.001)
    pump(app, 0.3)  # what the end of the job triggers (layer updates, plots)
    wall = time.perf_counter() - t0
    panner.stop()
    times = np.asarray(ticks.times)
    gaps = ticks.stop()
    if widget.job.error is not None:
        raise RuntimeError(f"{widget.job.description}: {widget.job.error}")
    stalls = [(round(float(times[i] - t0), 2), round(float(gaps[i]))) for i in np.flatnonzero(gaps > 100)]
    return {"wall_s": round(wall, 2), **gap_stats(gaps), "stalls_over_100ms_at_s": stalls[:20]}


def _gaps_while(app, viewer, action, seconds: float = 1.5) -> dict:
    """Event-loop gaps while ``action()`` runs on the main thread and the view is panned for ``seconds``."""
    ticks, panner = TickRecorder(), Panner(viewer)
    ticks.start()
    panner.start()
    t0 = time.perf_counter()
    action()
    took = time.perf_counter() - t0
    pump(app, seconds)
    panner.stop()
    return {"call_ms": round(took * 1000, 1), **gap_stats(ticks.stop())}


def bench_session(app, n_labels: int = 100, seed: int = 0, screenshot: str | None = None) -> dict:
    """The loop on the 19 apoferritin micrographs in a 1920 x 1080 window with the Picking panel docked."""
    import sys

    import napari

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common

    ds = common.get_dataset("apoferritin").with_labels(n_labels, seed)
    viewer = napari.Viewer(show=True)
    win = viewer.window._qt_window
    win.resize(1920, 1080)
    _, panel = viewer.window.add_plugin_dock_widget("napari-pupick", "Picking panel")
    pump(app, 1.0)
    pre, train, predict = panel.preprocess, panel.train, panel.predict
    folder = ds.micrograph_paths()[0].parent
    pre.open_micrographs(folder)
    loop = panel.loop
    pre.radius.value = float(ds.radius)
    loop.add_positives(ds.labels())
    pump(app, 1.0)
    from napari_pupick.widgets._common import warm_up

    warming = warm_up()  # torch imported in the background when the panel is docked, as in a session
    while warming.is_alive():
        pump(app, 0.1)
    out = {"micrographs": loop.n_planes, "labels": int(len(ds.labels())), "radius": float(ds.radius),
           "window": [win.width(), win.height()]}
    panel.tabs.setCurrentWidget(pre)
    out["preprocess"] = _run_step(app, viewer, pre, pre.run_button.native.click)
    out["binning"] = int(loop.factor)
    panel.tabs.setCurrentWidget(train)
    out["train"] = _run_step(app, viewer, train, train.train_button.native.click)
    panel.tabs.setCurrentWidget(predict)
    out["score_all"] = _run_step(app, viewer, predict, predict.all_button.native.click)
    out["candidates"] = int(len(loop.all_scores()))
    if screenshot:  # what the user sees after Score all (the picks at the model's threshold)
        pump(app, 0.5)
        viewer.screenshot(screenshot, canvas_only=False, flash=False)
    out["reextract"] = _gaps_while(app, viewer, lambda: setattr(predict.margin, "value",
                                                                float(predict.margin.value) + 10.0))
    # micrograph change with picks and heatmap shown: the dims step and the repaint it causes
    change = []
    for plane in list(range(1, loop.n_planes)) + [0]:
        t0 = time.perf_counter()
        viewer.dims.set_current_step(0, plane)
        app.processEvents()
        change.append((time.perf_counter() - t0) * 1000)
        pump(app, 0.05)
    out["micrograph_change_ms"] = {"median": round(float(np.median(change)), 1),
                                   "max": round(float(np.max(change)), 1)}
    hint = win.minimumSizeHint()
    out["window_minimum"] = [max(hint.width(), win.minimumWidth()), max(hint.height(), win.minimumHeight())]
    viewer.close()
    return out


def bench_threshold(app, n_picks: int = 100_000, n_planes: int = 20, repeats: int = 40) -> dict:
    """Time the threshold refilter of ``n_picks`` picks (in a viewer of its own)."""
    import dask.array as da
    import napari

    from napari_pupick.loop import PickLoop

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1920, 1080)
    rng = np.random.default_rng(0)
    stack = da.zeros((n_planes, 4096, 4096), dtype=np.float32, chunks=(1, 4096, 4096))
    viewer.add_image(stack, name="big stack", contrast_limits=(0, 1),
                     metadata={"micrograph_names": [f"m{i:02d}" for i in range(n_planes)]})
    loop = PickLoop.for_viewer(viewer)
    loop.set_micrographs("big stack")
    loop.radius = 20.0
    data = np.column_stack([rng.integers(0, n_planes, n_picks), rng.uniform(0, 4096, (n_picks, 2))])
    scores = rng.normal(-1.0, 2.0, n_picks)
    loop._replace_picks(data, scores)
    _, panel = viewer.window.add_plugin_dock_widget("napari-pupick", "Picking panel")
    widget = panel.predict
    panel.tabs.setCurrentWidget(widget)
    loop._emit("picks")
    pump(app, 0.5)
    thresholds = np.linspace(-4, 3, repeats)
    core, slider, painted = [], [], []
    for t in thresholds:
        t0 = time.perf_counter()
        loop.set_threshold(float(t) + 1e-3)
        core.append(time.perf_counter() - t0)
        pump(app, 0.02)
        t0 = time.perf_counter()
        widget.threshold.value = float(t)
        slider.append(time.perf_counter() - t0)
        app.processEvents()  # the canvas repaint and the coalesced histogram redraw
        painted.append(time.perf_counter() - t0)
        pump(app, 0.02)
    shown = int(loop.picks_layer.shown.sum())
    assert shown == int((scores >= widget.threshold.value).sum())
    viewer.close()

    def stats(x):
        x = np.asarray(x) * 1000
        return {"median_ms": round(float(np.median(x)), 2), "max_ms": round(float(x.max()), 2)}

    return {"n_picks": n_picks, "n_planes": n_planes, "repeats": repeats, "set_threshold": stats(core),
            "slider_reaction": stats(slider), "slider_plus_repaint": stats(painted)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15, help="steps per epoch")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--session", action="store_true",
                        help="the loop on the apoferritin set with the Picking panel at 1920 x 1080 (needs the data)")
    parser.add_argument("--screenshot", help="--session: also save the window after Score all here (PNG)")
    args = parser.parse_args(argv)
    xvfb = start_xvfb()
    if args.session:
        try:
            return session_main(args)
        finally:
            if xvfb is not None:
                xvfb.terminate()
                xvfb.wait(timeout=10)
    try:
        import napari
        import torch
        from qtpy.QtWidgets import QApplication

        viewer = napari.Viewer(show=True)
        viewer.window._qt_window.resize(1400, 900)
        app = QApplication.instance()
        viewer.open_sample("napari-pupick", "synthetic")
        from napari_pupick.loop import PickLoop

        loop = PickLoop.for_viewer(viewer)
        loop.set_micrographs("synthetic micrographs")
        loop.preprocess(downsample=2)
        loop.add_positives_layer(radius=12, expected_particles=60)
        pump(app, 1.0)
        results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                   "torch": torch.__version__, "napari": napari.__version__, "training": []}
        def say(label, r):
            print(f"{label}: event-loop gaps max {r['max_gap_ms']} ms, p99 {r['p99_gap_ms']} ms, median "
                  f"{r['median_gap_ms']} ms, {r['gaps_over_100ms']} over 100 ms ({r['ticks']} ticks)")

        results["idle"] = [bench_idle(viewer, app, browse) for browse in (False, True)]
        for r in results["idle"]:
            say(f"idle viewer{', browsing' if r['browse'] else ''}", r)
        # (threads, browsing, napari activity bar): the Train widget's default is no activity bar
        configs = [(t, False, False) for t in args.threads] + [(args.threads[0], True, False),
                                                                (args.threads[0], False, True)]
        for threads, browse, bar in configs:
            r = bench_training(viewer, app, threads, args.epochs, args.steps, browse, bar)
            results["training"].append(r)
            say(f"training, {threads} torch thread(s){', browsing' if browse else ''}"
                f"{', with a napari activity bar' if bar else ''} ({r['steps']} steps in {r['wall_s']} s; "
                f"docking the "
                f"widget: max gap {r['docking_max_gap_ms']} ms)", r)
            pump(app, 0.5)
        r = bench_threshold(app)
        results["threshold"] = r
        print(f"threshold refilter of {r['n_picks']:,} picks: set_threshold median {r['set_threshold']['median_ms']}"
              f" ms (max {r['set_threshold']['max_ms']}); slider reaction median {r['slider_reaction']['median_ms']}"
              f" ms (max {r['slider_reaction']['max_ms']}); with repaint median "
              f"{r['slider_plus_repaint']['median_ms']} ms (max {r['slider_plus_repaint']['max_ms']})")
        viewer.close()
    finally:
        if xvfb is not None:
            xvfb.terminate()
            xvfb.wait(timeout=10)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def session_main(args) -> dict:
    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    torch.set_num_threads(1)
    napari.Viewer(show=False).close()  # the QApplication
    app = QApplication.instance()
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "torch": torch.__version__, "napari": napari.__version__}
    r = results["session"] = bench_session(app, screenshot=args.screenshot)
    print(f"{r['micrographs']} micrographs, {r['labels']} labels, radius {r['radius']} px, binning {r['binning']}, "
          f"window {r['window'][0]} x {r['window'][1]}; {r['candidates']:,} candidates")
    for step in ("preprocess", "train", "score_all", "reextract"):
        x = r[step]
        print(f"{step}: {x.get('wall_s', '-')} s, max gap {x['max_gap_ms']} ms, p99 {x['p99_gap_ms']} ms, "
              f"{x['gaps_over_100ms']} gaps over 100 ms; stalls {x.get('stalls_over_100ms_at_s', [])[:8]}")
    print(f"micrograph change: median {r['micrograph_change_ms']['median']} ms, max {r['micrograph_change_ms']['max']}"
          f" ms; main window minimum {r['window_minimum'][0]} x {r['window_minimum'][1]}")
    t = results["threshold"] = bench_threshold(app)
    print(f"threshold refilter of {t['n_picks']:,} picks: set_threshold median {t['set_threshold']['median_ms']} ms; "
          f"slider median {t['slider_reaction']['median_ms']} ms; with repaint median "
          f"{t['slider_plus_repaint']['median_ms']} ms (max {t['slider_plus_repaint']['max_ms']})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
