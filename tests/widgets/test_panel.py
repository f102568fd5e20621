"""The one-panel viewer: it fits the screen, the micrograph table counts right and moves the viewer, reviewed
micrographs filter exports, and "label next" ranks by uncertainty and fewest labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import starfile
from qtpy.QtCore import Qt
from widget_helpers import WIDGETS, dock


def _fits(window, width, height) -> bool:
    hint = window.minimumSizeHint()
    return hint.width() <= width and hint.height() <= height


def test_panel_fits_the_screen(sample_viewer, qtbot):
    panel = dock(sample_viewer, "Picking panel")
    assert type(panel).__name__ == "PupickPanel" and panel.tabs.count() == 4
    window = sample_viewer.window._qt_window
    assert _fits(window, 1920, 1080), window.minimumSizeHint()
    assert _fits(window, 1366, 768), window.minimumSizeHint()  # still workable on a small laptop
    window.resize(1920, 1080)
    window.show()
    qtbot.waitUntil(lambda: panel.isVisible(), timeout=5000)
    qtbot.waitUntil(lambda: panel._sized, timeout=5000)
    qtbot.wait(50)
    # the plots keep their height (the steps scroll instead of squeezing them)
    for plot in (panel.preprocess.plot, panel.train.plot, panel.predict.plot):
        assert plot.height() == plot.minimumHeight()
    # every micrograph's row is in view, and no column is cut off
    t = panel.micrographs.table
    assert t.viewport().height() >= sum(t.rowHeight(r) for r in range(t.rowCount()))
    assert sum(t.columnWidth(c) for c in range(t.columnCount())) <= t.viewport().width()
    # no step is wider than the panel (nothing clipped on the right)
    for step in (panel.preprocess, panel.train, panel.predict, panel.export):
        assert step.scroll.widget().minimumSizeHint().width() <= panel.width(), type(step).__name__
    # the stack opens on the first micrograph and its name is shown
    assert panel.loop.current_plane() == 0 and "synth_0" in panel.micrographs.current.text()


def test_each_step_widget_fits_alone_and_together(sample_viewer):
    window = sample_viewer.window._qt_window
    for name in WIDGETS:
        dock_widget, _ = sample_viewer.window.add_plugin_dock_widget("napari-pupick", name)
        assert _fits(window, 1366, 768), (name, window.minimumSizeHint())
        sample_viewer.window.remove_dock_widget(dock_widget)
    for name in WIDGETS:
        sample_viewer.window.add_plugin_dock_widget("napari-pupick", name)
    assert _fits(window, 1920, 1080), window.minimumSizeHint()  # all four docked at once


def test_training_legend_speaks_plainly(sample_viewer):
    from napari_pupick.training import TrainEvent

    train = dock(sample_viewer, "2 Train")
    terms = {"loss": 0.5, "objective": 0.5, "positive": 0.3, "negative": 0.2, "unlabeled_mean_g": 0.05}
    steps = [TrainEvent("step", s, 0, 10, losses=terms) for s in range(1, 4)]
    train.plot.plot_history(steps, force=True)
    text = train.plot.legend.text()
    for name in ("total loss", "labelled particles", "rejected picks", "unlabelled: mean probability"):
        assert name.replace(" ", "&nbsp;") in text
    assert "objective" not in text and "unlabeled_mean_g" not in text  # no duplicate curve, no internal names
    assert "held-out" not in text  # no held-out micrographs (the default): no AP curve, no AP legend entry
    train.plot.plot_history(steps + [TrainEvent("epoch", 3, 1, 10, heldout_ap=0.5)], force=True)
    assert "held-out&nbsp;AP" in train.plot.legend.text()  # held-out micrographs: their AP per epoch
    # the probability is drawn on the 0-1 axis, the losses on the log axis
    assert train.plot._lines["unlabeled_mean_g"].axes is train.plot.ax_ap
    assert train.plot._lines["loss"].axes is train.plot.ax


def test_threshold_slider_lines_up_with_the_histogram(picked, qtbot):
    from qtpy.QtWidgets import QSlider, QStyle, QStyleOptionSlider

    viewer, loop = picked
    predict = dock(viewer, "3 Predict and inspect")
    viewer.window._qt_window.resize(1920, 1080)
    viewer.window._qt_window.show()
    qtbot.waitUntil(predict.isVisible, timeout=5000)
    qtbot.wait(50)
    slider = predict.threshold.native.findChild(QSlider)
    assert tuple(predict.plot.ax.get_xlim()) == (predict.threshold.min, predict.threshold.max)
    for value in (predict.threshold.min, predict.threshold.max, 0.0):
        predict.set_threshold(value)
        opt = QStyleOptionSlider()
        slider.initStyleOption(opt)
        handle = slider.style().subControlRect(QStyle.ComplexControl.CC_Slider, opt,
                                               QStyle.SubControl.SC_SliderHandle, slider)
        centre = slider.mapTo(predict.plot.parentWidget(), handle.center()).x() - predict.plot.x()
        x0, x1 = predict.plot.axis_pixels()
        lo, hi = predict.plot.ax.get_xlim()
        expected = x0 + (value - lo) / (hi - lo) * (x1 - x0)
        assert abs(centre - expected) <= 3, (value, centre, expected)
    # clicking the histogram moves the threshold there
    predict.plot.on_pick(1.25)
    assert loop.threshold == 1.25 and abs(predict.threshold_box.value - 1.25) < 1e-9


def test_micrograph_table(picked, qtbot, tmp_path):
    viewer, loop = picked
    panel = dock(viewer, "Picking panel")
    table = panel.micrographs
    table.refresh()
    t = table.table
    assert t.rowCount() == loop.n_planes
    positives, _ = loop.labels()
    per = loop.picks_per_micrograph()
    for name in loop.names:
        r = table.row_of(name)
        assert int(t.item(r, 1).text()) == int((positives["micrograph"] == name).sum())
        assert int(t.item(r, 3).text()) == per[name]
    # sortable by picks
    t.sortItems(3, Qt.SortOrder.DescendingOrder)
    col = [int(t.item(r, 3).text()) for r in range(t.rowCount())]
    assert col == sorted(col, reverse=True)
    # a click on a row shows that micrograph
    r = table.row_of("synth_2")
    qtbot.mouseClick(t.viewport(), Qt.MouseButton.LeftButton, pos=t.visualItemRect(t.item(r, 0)).center())
    assert loop.current_plane() == 2 and "synth_2" in table.current.text()
    # the reviewed checkbox; exports can keep only the reviewed micrographs
    t.item(table.row_of("synth_1"), 5).setCheckState(Qt.CheckState.Checked)
    assert loop.reviewed == {"synth_1"}
    out = loop.export(tmp_path / "reviewed.star", reviewed_only=True)
    written = starfile.read(out)
    assert len(written) == per["synth_1"] and set(written["rlnMicrographName"]) == {"synth_1.mrc"}
    # picks counts follow the threshold
    loop.set_threshold(float(np.max(loop.all_scores())) + 1)
    table.refresh()
    assert all(t.item(r, 3).text() == "0" for r in range(t.rowCount()))


def test_label_next_ranks_uncertain_and_unlabelled_first(sample_viewer):
    from napari_pupick.loop import PickLoop

    loop = PickLoop.for_viewer(sample_viewer)
    loop.set_micrographs("synthetic micrographs")
    loop.threshold = 0.0
    rng = np.random.default_rng(0)
    positives, _ = loop.labels()
    counts = positives["micrograph"].value_counts().reindex(loop.names, fill_value=0).to_numpy()
    target, labelled = int(np.argmin(counts)), int(np.argmax(counts))
    assert counts[target] < counts[labelled]
    # the least and the most labelled micrographs both score near the threshold; the others are clear cut
    rows, scores = [], []
    for plane in range(4):
        near = plane in (target, labelled)
        s = rng.uniform(-0.5, 0.5, 40) if near else np.r_[rng.uniform(3, 5, 20), rng.uniform(-6, -4, 20)]
        rows.append(np.column_stack([np.full(40, plane), rng.uniform(20, 490, (40, 2))]))
        scores.append(s)
    loop._replace_picks(np.concatenate(rows), np.concatenate(scores))
    loop.scores = {p: np.zeros((4, 4)) for p in range(4)}
    summary = loop.micrograph_table()
    assert summary.loc[target, "uncertainty"] == 1.0
    assert summary.drop(index=[target, labelled])["uncertainty"].max() < 0.1
    order = loop.label_next()
    name = loop.names[target]
    assert order[:2] == [name, loop.names[labelled]]  # fewest labels first among the uncertain
    loop.set_reviewed(name)
    assert name not in loop.label_next()
    loop.set_reviewed(name, False)
    panel = dock(sample_viewer, "Picking panel")
    assert panel.micrographs.go_next() == name and loop.current_plane() == target
    assert isinstance(summary, pd.DataFrame)
