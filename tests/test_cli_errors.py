"""CLI misuse: one line on stderr naming the flag or file, exit 2 for bad usage, 1 for failures, no traceback
(``--debug`` lets it through). Subprocess-free: ``main`` with capsys."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_pupick.cli import main
from napari_pupick.io import write_coordinates, write_micrograph


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from napari_pupick.models import build_model
    from napari_pupick.training import Checkpoint

    d = tmp_path_factory.mktemp("misuse")
    (d / "mics").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        write_micrograph(d / "mics" / f"{name}.mrc", rng.normal(size=(64, 64)).astype(np.float32))
    (d / "blank").mkdir()
    write_micrograph(d / "blank" / "blank.mrc", np.zeros((64, 64), np.float32))
    write_coordinates(pd.DataFrame({"micrograph": ["a", "b"], "x": [10.0, 20.0], "y": [5.0, 6.0],
                                    "score": [1.0, 2.0]}), d / "labels.star")
    write_coordinates(pd.DataFrame({"micrograph": ["zz"], "x": [1.0], "y": [2.0], "score": [1.0]}), d / "other.star")
    net = build_model("conv3", width=0.25)
    state = {k: (v * float("nan") if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    Checkpoint(model="conv3", model_params=dict(net.hparams), state_dict=state).save(d / "nan.pt")
    Checkpoint(model="conv3", model_params=dict(net.hparams), state_dict=net.state_dict()).save(d / "ok.pt")
    (d / "inf.csv").write_text("micrograph,x,y\na,inf,3\n")
    (d / "bad.tsv").write_text("image_name\tx_coord\ty_coord\na\t1\n\t\t\t\t\n")
    (d / "folder.star").mkdir()
    return d


M, L, O = "{d}/mics", "{d}/labels.star", "{d}/out"
CASES = [  # (argv, exit status, words the one line must hold)
    (["normalize", M, "-o", O, "--downsample", "0"], 2, "--downsample"),
    (["normalize", M, "-o", O, "--radius", "-3"], 2, "--radius/-r: must be above 0"),
    (["normalize", M, "-o", O, "--radius", "nan"], 2, "--radius/-r: must be a finite number"),
    (["normalize", M, "-o", O, "--downsample", "auto"], 2, "--downsample auto needs --radius"),
    (["normalize", M, "-o", L], 2, "labels.star: exists and is not a folder"),
    (["normalize", "{d}/blank", "-o", O, "--method", "affine", "-q"], 1, "blank.mrc: the micrograph is blank"),
    (["train", M, "--labels", L, "--radius", "-5", "-o", O + ".pt"], 2, "--radius/-r: must be above 0, not -5"),
    (["train", M, "--labels", L, "--radius", "8", "--downsample", "0", "-o", O + ".pt"], 2, "--downsample"),
    (["train", M, "--labels", L, "--radius", "8", "--epochs", "0", "-o", O + ".pt"], 2, "--epochs: must be at least 1"),
    (["train", M, "--labels", L, "--radius", "8", "--expected", "-1", "-o", O + ".pt"], 2, "--expected/-n"),
    (["train", M, "--labels", L, "--radius", "8", "-o", "{d}"], 2, "is a folder; give a file name"),
    (["train", M, "--labels", "{d}/nope.star", "--radius", "8", "-o", O + ".pt"], 2, "nope.star: no such file"),
    (["train", M, "--labels", "{d}/other.star", "--radius", "8", "-o", O + ".pt", "-q"], 1, "['zz']"),
    (["train", M, "--labels", L, "--radius", "8", "--init", L, "-o", O + ".pt"], 2,
     "--init {d}/labels.star: not a napari-pupick checkpoint"),
    (["extract", M, "--model", L, "-o", O + ".star"], 2, "--model {d}/labels.star: not a napari-pupick checkpoint"),
    (["extract", M, "--model", "{d}/nope.pt", "-o", O + ".star"], 2, "nope.pt: no such file"),
    (["extract", M, "--model", "{d}/nan.pt", "-o", O + ".star", "-q"], 1, "nan.pt: the checkpoint's weights hold NaN"),
    (["extract", M, "--model", "{d}/ok.pt", "-o", O + ".star", "--radius", "-1"], 2, "--radius/-r"),
    (["extract", M, "--model", "{d}/ok.pt", "-o", O + ".star", "--margin", "-1"], 2, "--margin: must be at least 0"),
    (["extract", M, "--model", "{d}/ok.pt", "-o", O + ".star", "--margin", "nan"], 2, "--margin: must be a finite"),
    (["extract", M, "--model", "{d}/ok.pt", "-o", O + ".star", "--threshold", "nan"], 2, "--threshold/-t"),
    (["extract", M, "--model", "{d}/ok.pt", "-o", "{d}/folder.star"], 2, "folder.star: is a folder"),
    (["extract", M, "--model", "{d}/ok.pt", "-o", O + ".star", "--workers", "0"], 2, "--workers"),
    (["extract", M, "--model", "{d}/ok.pt", "-o", O + ".box", "--box-size", "-2"], 2, "--box-size"),
    (["extract", "{d}/folder.star", "--model", "{d}/ok.pt", "-o", O + ".star"], 1, "no micrographs in this folder"),
    (["extract", "{d}/blank", "--model", "{d}/ok.pt", "-o", "{d}/o_blank.star", "-q", "--radius", "4", "--threshold",
      "0", "--margin", "0"], 1,
     "1 of 1 micrograph(s) failed: {d}/blank/blank.mrc"),
    (["evaluate", L, "--truth", "{d}/other.star", "--radius", "4"], 1, "have no micrograph in common"),
    (["evaluate", L, "--truth", L, "--radius", "0"], 2, "--radius/-r: must be above 0"),
    (["evaluate", L, "--truth", L, "--radius", "4", "--json", "{d}"], 2, "--json {d}: is a folder"),
    (["convert", "{d}/inf.csv", O + ".star"], 1, "inf.csv: 1 value(s) of x are missing or not finite"),
    (["convert", "{d}/bad.tsv", O + ".star"], 1, "bad.tsv: cannot parse as topaz"),
    (["convert", L, O + ".star", "--scale", "nan"], 2, "--scale"),
    (["convert", L, O + ".star", "--model", L], 2, "--model {d}/labels.star: not a napari-pupick checkpoint"),
    (["convert", L, O + ".star", "--model", "{d}/ok.pt", "--threshold", "1"], 2, "not both"),
    (["demo", "-o", O, "--micrographs", "0"], 2, "--micrographs: must be at least 1"),
    (["pretrain", "-o", O + ".pt", "--steps", "0"], 2, "--steps: must be at least 1"),
    (["train", "--bogus"], 2, "pupick train: error:"),
]


@pytest.mark.parametrize("argv, status, words", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_misuse_gives_one_line_and_the_right_status(files, capsys, argv, status, words):
    argv = [a.format(d=files) for a in argv]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == status, err
    assert len(lines) == 1 and lines[0].startswith(f"pupick {argv[0]}: error: "), err
    assert words.format(d=files) in lines[0]
    assert "Traceback" not in err


def test_scheduler_without_distributed_is_bad_usage(files, capsys, monkeypatch):
    from napari_pupick import batch

    monkeypatch.setattr(batch, "have_distributed", lambda: False)
    rc = main(["extract", str(files / "mics"), "--model", str(files / "ok.pt"), "-o", str(files / "o.star"),
               "--scheduler", "tcp://nowhere:8786"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "dask.distributed" in err and "pip install" in err


def test_read_only_output_folder_fails_before_reading(files, capsys, monkeypatch):
    import errno

    from napari_pupick.io import atomic

    def refused(target):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(atomic, "temp_path", refused)
    rc = main(["train", str(files / "mics"), "--labels", str(files / "labels.star"), "--radius", "8", "-o",
               str(files / "ro" / "model.pt")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == (f"pupick train: error: -o {files / 'ro' / 'model.pt'}: cannot write into {files} "
                               "(Permission denied)")


def test_debug_lets_the_traceback_through(files):
    from napari_pupick.errors import CoordinateError

    with pytest.raises(CoordinateError, match="inf.csv"):
        main(["convert", str(files / "inf.csv"), str(files / "o.star"), "--debug"])


def test_an_unexpected_exception_is_one_line_too(files, capsys, monkeypatch):
    from napari_pupick import cli

    def broken(args):
        raise ZeroDivisionError("boom")

    monkeypatch.setitem(cli.COMMANDS, "convert", broken)
    assert main(["convert", str(files / "labels.star"), str(files / "o.csv")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("pupick convert: error: internal error (ZeroDivisionError: boom); run again with --debug for the "
                   "traceback")


def test_napari_reader_refuses_infinite_coordinates_before_any_layer(files):
    from napari_pupick._reader import get_coordinate_reader
    from napari_pupick.errors import CoordinateError

    reader = get_coordinate_reader(str(files / "inf.csv"))
    assert reader is not None
    with pytest.raises(CoordinateError, match="inf.csv"):
        reader(str(files / "inf.csv"))
