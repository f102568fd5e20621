"""The whole loop on the sample data, driven by pressing the widgets' buttons."""

from __future__ import annotations

import numpy as np
import starfile
from widget_helpers import TINY, click, notifications


def test_whole_loop_by_buttons(sample_viewer, docked, qtbot, tmp_path):
    viewer = sample_viewer
    pre, train, predict, export = (docked[k] for k in ("PreprocessWidget", "TrainWidget", "PredictWidget",
                                                       "ExportWidget"))
    loop = pre.loop

    # 1. preprocess: binned by 2, GMM, in a worker; the normalized stack sits on the original grid
    pre.downsample.value = 2
    pre.method.value = "gmm"
    job = click(qtbot, pre.run_button, pre)
    assert job.error is None
    norm = loop.normalized_layer
    assert norm is not None and norm in viewer.layers
    assert norm.data.shape == (4, 256, 256)
    assert tuple(norm.scale) == (1.0, 2.0, 2.0)
    assert abs(float(np.median(norm.data[0]))) < 1.0
    assert loop.preprocessor.gmm is not None
    assert len(pre.plot.ax.lines) == 3  # two components and the mixture over the histogram
    assert not viewer.layers["synthetic micrographs"].visible

    # 2. label: one click gives the positives layer (the sample's clicks), point size = diameter, add mode
    pre.radius.value = 12
    pre.expected.value = 60
    click(qtbot, pre.label_button)
    pos = loop.positives_layer
    assert pos is viewer.layers["positives"]
    assert viewer.layers.selection.active is pos and pos.mode == "add"
    assert np.allclose(pos.size, 24.0)
    assert loop.expected_particles == 60
    n_labels = len(pos.data)
    assert n_labels > 20

    # 3. train a tiny model in a generator worker; live history and plot
    train.epochs.value, train.steps.value, train.holdout.value = 2, 3, 0.25
    train.extra_config = dict(TINY)
    job = click(qtbot, train.train_button, train)
    assert job.error is None, job.error
    ck = loop.checkpoint
    assert ck is not None and ck.config["epochs"] == 2 and ck.config["particle_radius"] == 6.0
    assert [e.kind for e in loop.history][0] == "start" and loop.history[-1].kind == "done"
    assert len(train.plot.ax.lines) >= 1
    assert "conv3" in train.model_info.text()

    # 4. predict every plane: heatmap + picks with a score feature; threshold offered
    job = click(qtbot, predict.all_button, predict)
    assert job.error is None, job.error
    picks = loop.picks_layer
    assert picks is viewer.layers["picks"] and "score" in picks.features
    assert set(np.rint(picks.data[:, 0]).astype(int)) <= {0, 1, 2, 3}
    assert sorted(loop.scores) == [0, 1, 2, 3]
    heat = viewer.layers["scores"]
    assert heat.data.shape == (4, 256, 256) and tuple(heat.scale) == (1.0, 2.0, 2.0)
    assert heat.data.max() > 0
    assert "candidates shown" in predict.counts.text()

    # 6. export the shown picks as STAR through the widget
    threshold = float(np.median(loop.all_scores()))
    predict.set_threshold(threshold)
    assert loop.threshold == threshold
    export.path.value = str(tmp_path / "picks.star")
    click(qtbot, export.export_button)
    df = starfile.read(tmp_path / "picks.star", always_dict=True)
    table = next(iter(df.values()))
    expected = int((picks.features["score"].to_numpy() >= threshold).sum())
    assert len(table) == expected > 0
    assert {"rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit"} <= set(table)
    assert table["rlnAutopickFigureOfMerit"].min() >= threshold - 1e-6
    # coordinates are in original micrograph pixels (the 512 x 512 micrographs, not the 256 x 256 binned grid)
    assert table["rlnCoordinateX"].max() > 256 and table["rlnCoordinateX"].max() <= 511
    assert not notifications("error")
