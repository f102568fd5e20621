"""Take the user guide's screenshots from a running napari viewer on the plugin's sample data.

Every step is done the way a user does it: the Picking panel is docked through the plugin manifest in a 1920 x 1080
window, its tabs are opened and their buttons pressed, with every setting left at its default; the script only
waits for each worker to finish before taking the picture.

Run from the repository root (starts its own Xvfb when there is no display)::

    .venv/bin/python docs/make_screenshots.py            # writes docs/images/*.png

Options: ``--out FOLDER``, ``--epochs N``, ``--steps N`` (default: the Train tab's own).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def start_xvfb() -> subprocess.Popen | None:
    """Start a virtual X server when there is no display (returns the process to stop, or None)."""
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    if shutil.which("Xvfb") is None:
        raise SystemExit("no display and no Xvfb: install xvfb or run under a desktop session")
    for number in range(90, 110):
        if not Path(f"/tmp/.X{number}-lock").exists():
            break
    proc = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", "1920x1080x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ["DISPLAY"] = f":{number}"
    time.sleep(1.0)
    return proc


def small(path: Path) -> None:
    """Rewrite a screenshot with a 256-colour palette (a quarter of the size, no visible change)."""
    from PIL import Image

    with Image.open(path) as im:
        palette = im.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
    palette.save(path, optimize=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "images"))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    xvfb = start_xvfb()
    try:
        run(out, args.epochs, args.steps)
    finally:
        if xvfb is not None:
            xvfb.terminate()
            xvfb.wait(timeout=10)


def run(out: Path, epochs: int | None, steps: int | None) -> None:
    import napari
    import numpy as np
    import torch
    from qtpy.QtWidgets import QApplication

    torch.set_num_threads(1)
    viewer = napari.Viewer(show=True, title="napari-pupick")
    viewer.window._qt_window.resize(1920, 1080)
    viewer.theme = "dark"
    app = QApplication.instance()

    def settle(seconds: float = 0.4) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.01)

    def wait(widget) -> None:
        t0 = time.perf_counter()
        while widget.job is None or not widget.job.done:
            app.processEvents()
            time.sleep(0.02)
        if widget.job.error is not None:
            raise RuntimeError(f"{widget.job.description} failed: {widget.job.error}")
        print(f"  {widget.job.description}: {time.perf_counter() - t0:.1f} s")
        settle()

    def shot(name: str) -> None:
        settle(0.6)
        viewer.screenshot(str(out / name), canvas_only=False, flash=False)
        small(out / name)
        print(f"wrote {out / name}")

    viewer.open_sample("napari-pupick", "synthetic")
    _, panel = viewer.window.add_plugin_dock_widget("napari-pupick", "Picking panel")
    settle()

    # 1. preprocess: the particle radius (from the sample's labels), binning auto, GMM normalization
    pre = panel.preprocess
    panel.tabs.setCurrentWidget(pre)
    pre.run_button.native.click()
    wait(pre)
    shot("01_preprocess.png")

    # 2. label: the positives layer in add mode, zoomed in
    pre.label_button.native.click()
    viewer.scene.camera.center = (0, 256, 256)
    viewer.scene.camera.zoom = 1.6
    shot("02_label.png")

    # 3. train with the tab's defaults
    train = panel.train
    panel.tabs.setCurrentWidget(train)
    if epochs:
        train.epochs.value = epochs
    if steps:
        train.steps.value = steps
    train.train_button.native.click()
    wait(train)
    shot("03_train.png")

    # 4. score every micrograph; the threshold is the model's calibrated one
    predict = panel.predict
    panel.tabs.setCurrentWidget(predict)
    predict.all_button.native.click()
    wait(predict)
    viewer.reset_view()
    shot("04_predict.png")

    # 5. correct: delete the false picks on dark ice (what a user sees: no particle there, a dark blob), click
    # a particle the model missed. The hidden ground-truth layer plays the user's eye.
    loop = predict.loop
    layer = loop.picks_layer
    data = np.asarray(layer.data)
    on_plane = np.flatnonzero(layer.shown & (np.rint(data[:, 0]) == 0))
    truth = np.asarray(viewer.layers["ground truth"].data)
    truth = truth[np.rint(truth[:, 0]) == 0]
    to_truth = np.sqrt(((data[on_plane, None, 1:] - truth[None, :, 1:]) ** 2).sum(-1)).min(axis=1)
    binned, s = loop.prepared[0], loop.factor
    half = int(1.5 * loop.radius / s)
    darkness = np.array([binned[max(int(y / s) - half, 0):int(y / s) + half + 1,
                                max(int(x / s) - half, 0):int(x / s) + half + 1].mean()
                         for _, y, x in data[on_plane]])
    false = on_plane[to_truth > loop.radius]
    junk = on_plane[(to_truth > loop.radius) & (darkness < -0.5)]
    if len(junk) == 0:
        junk = false[:3]
    focus = data[junk[0]]
    viewer.layers.selection.active = layer
    layer.selected_data = set(junk.tolist())
    layer.remove_selected()  # the Delete key
    kept = np.asarray(layer.data)[layer.shown & (np.rint(np.asarray(layer.data)[:, 0]) == 0)]
    dist = np.sqrt(((truth[:, None, 1:] - kept[None, :, 1:]) ** 2).sum(-1)).min(axis=1)
    missed = truth[dist > loop.radius]
    if len(missed):
        near = missed[np.argmin(((missed[:, 1:] - focus[1:]) ** 2).sum(axis=1))]
        layer.add(near)  # a click in add mode: the point becomes a positive label
        if np.hypot(*(near[1:] - focus[1:])) < 200:
            focus = (focus + near) / 2
    print(f"  rejected {len(junk)} picks on ice, added {min(len(missed), 1)} missed particle(s)")
    viewer.layers["scores"].visible = False
    viewer.layers.selection.active = layer
    viewer.scene.camera.center = (0, float(focus[1]), float(focus[2]))
    viewer.scene.camera.zoom = 2.0
    shot("05_correct.png")
    viewer.layers["scores"].visible = True

    # 6. export
    export = panel.export
    panel.tabs.setCurrentWidget(export)
    target = Path(tempfile.mkdtemp(prefix="pupick_project_"))
    export.path.value = str(target / "picks.star")
    export.export_button.native.click()
    settle()
    viewer.reset_view()
    shot("06_export.png")
    shutil.rmtree(target, ignore_errors=True)
    viewer.close()


if __name__ == "__main__":
    main()
