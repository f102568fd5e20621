"""Readouts stay current and speak in the microscopist's units: label counts, export errors, Angstrom, boxes, the
mixture in normalized units, a smooth display of the binned micrographs."""

from __future__ import annotations

import numpy as np
from widget_helpers import dock


def test_readouts_stay_current(picked, tmp_path):
    viewer, loop = picked
    panel = dock(viewer, "Picking panel")
    pre, predict, export = panel.preprocess, panel.predict, panel.export
    # the label count follows every click (no stale "0 labels so far")
    pre.add_positives()
    n = len(loop.labels()[0])
    assert pre.labels_info.text().startswith(f"{n} labelled particles")
    loop.positives_layer.add([0, 100.0, 100.0])
    assert pre.labels_info.text().startswith(f"{n + 1} labelled particles")
    loop.undo()
    assert pre.labels_info.text().startswith(f"{n} labelled particles")
    # a red "Export failed" goes once there is something to export
    export.status.setText("<span style='color:#ff7070'>Export failed: no picks to export</span>")
    loop.set_threshold(loop.threshold + 0.1)
    assert "failed" not in export.status.text()
    (tmp_path / "a folder with a long name").mkdir()
    out = export.export(tmp_path / "a folder with a long name" / "picks.star")
    assert out is not None and str(out) in export.status.text().replace("\u200b", "")  # the whole path
    # sizes in pixels and Angstrom (the sample has 1 A/px... so say it)
    px = loop.pixel_size
    assert px and f"box {2 * loop.radius:g} px = {2 * loop.radius * px:.3g} \u00c5" in predict.units.text()
    assert "\u00c5" in pre.particle_info.text()
    # picks as boxes of the extraction box size
    predict.boxes.value = True
    assert set(np.asarray(loop.picks_layer.symbol).astype(str)) == {"square"}
    assert np.allclose(loop.picks_layer.size, 2 * loop.radius)
    predict.boxes.value = False
    assert "square" not in set(np.asarray(loop.picks_layer.symbol).astype(str))
    # the binned micrographs are shown smooth, not blocky
    assert str(loop.normalized_layer.interpolation2d) == "linear"
    # the edge margin field and the line under it follow the model's margin (a label at the border: 0 px)
    import dataclasses

    ck = dataclasses.replace(loop.checkpoint, metrics={**(loop.checkpoint.metrics or {}), "margin": 0.0})
    loop.set_model(ck)
    assert predict.margin.value == 0.0 and "edge margin 0 px" in predict.units.text()
    ck = dataclasses.replace(ck, metrics={**ck.metrics, "margin": 7.0})
    loop.set_model(ck)
    assert predict.margin.value == 7.0 and "edge margin 7 px" in predict.units.text()


def test_mixture_in_normalized_units():
    from napari_pupick.preprocess import GMM
    from napari_pupick.widgets._preprocess import describe_mixture

    text = describe_mixture(GMM(p=0.2, mu0=-30.0, mu1=10.0, s0=8.0, s1=4.0))
    assert "ice mean 0, sd 1 (80% of the pixels)" in text
    assert "mean +5.00, sd 0.50 (20%)" in text  # p weighs component 1; dominant (-30, 8): (10 + 30) / 8, 4 / 8
