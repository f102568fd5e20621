"""The ``pupick`` command line and the pipeline it shares with the plugin, end to end on small synthetic data."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import starfile

from napari_pupick.cli import main
from napari_pupick.io import read_coordinates, write_coordinates
from napari_pupick.synthetic import make_synthetic

TINY = ["--epochs", "3", "--steps", "15", "--threads", "1", "-q"]


@pytest.fixture(scope="module")
def synth_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    synth = make_synthetic(n_micrographs=4, shape=(320, 320), n_particles=35, radius=12, snr=0.3, n_labels=30,
                           label_micrographs=2, seed=3)
    files = synth.write(folder)
    return synth, files, folder


def test_help_names_every_command():
    out = subprocess.run([sys.executable, "-m", "napari_pupick", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for cmd in ("normalize", "train", "extract", "evaluate", "convert", "demo"):
        assert cmd in out


def test_convert_threshold_and_formats(tmp_path):
    table = pd.DataFrame({"micrograph": ["a", "a", "b"], "x": [10.0, 20.0, 30.0], "y": [5.0, 6.0, 7.0],
                          "score": [-1.0, 2.0, 3.0]})
    src = write_coordinates(table, tmp_path / "in.star")
    assert main(["convert", str(src), str(tmp_path / "out.csv"), "--threshold", "0"]) == 0
    back = read_coordinates(tmp_path / "out.csv")
    assert sorted(back["score"]) == [2.0, 3.0]
    assert main(["convert", str(src), str(tmp_path / "relion"), "--per-micrograph"]) == 0
    files = sorted(p.name for p in (tmp_path / "relion").iterdir())
    assert files == ["a.star", "b.star"]
    df = starfile.read(tmp_path / "relion" / "a.star")
    assert list(df["rlnCoordinateX"]) == [10.0, 20.0]


def test_evaluate_truth_against_itself(tmp_path, capsys):
    synth = make_synthetic(n_micrographs=2, shape=(200, 200), n_particles=10, radius=8, seed=1)
    truth = write_coordinates(synth.particles.assign(score=0.0), tmp_path / "truth.csv")
    picks = synth.particles.assign(score=np.linspace(1, 0, len(synth.particles)))
    picks = pd.concat([picks, pd.DataFrame({"micrograph": [synth.names[0]], "x": [1.0], "y": [1.0],
                                            "score": [-5.0]})])
    pfile = write_coordinates(picks, tmp_path / "picks.star")
    assert main(["evaluate", str(pfile), "--truth", str(truth), "--radius", "4", "--json",
                 str(tmp_path / "m.json")]) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["ap"] == pytest.approx(1.0)
    assert result["n_picks"] == len(picks)


def test_train_extract_evaluate_end_to_end(synth_files, tmp_path):
    synth, files, folder = synth_files
    model = tmp_path / "model.pt"
    rc = main(["train", str(folder / "micrographs"), "--labels", str(files["labels"]), "--radius", "12",
               "--downsample", "2", "--expected", "35", "-o", str(model), *TINY])
    assert rc == 0 and model.exists()
    picks = tmp_path / "picks.star"
    assert main(["extract", str(folder / "micrographs"), "--model", str(model), "-o", str(picks),
                 "--all-candidates", "--threads", "1", "-q"]) == 0
    table = read_coordinates(picks)
    assert set(table["micrograph"]) <= set(synth.names) and len(table) > 0
    assert table["score"].notna().all()
    # evaluate on the two micrographs that had no labels
    test = synth.particles[synth.particles["micrograph"].isin(synth.names[2:])]
    truth = write_coordinates(test.assign(score=0.0), tmp_path / "truth.star")
    assert main(["evaluate", str(picks), "--truth", str(truth), "--radius", "6", "--json",
                 str(tmp_path / "m.json")]) == 0
    ap = json.loads((tmp_path / "m.json").read_text())["ap"]
    # chance level: the fraction of candidate positions that are particles is a few percent
    assert ap > 0.3


def test_minimal_command_chooses_and_uses_the_defaults(synth_files, tmp_path, capsys):
    """``train`` with micrographs, labels and radius only prints the binning, the estimated count and the
    threshold; ``extract`` without flags writes exactly the picks at or above that threshold, outside the margin;
    ``--all-candidates`` writes more; ``convert --model`` applies the same threshold."""
    from napari_pupick.calibration import choose_downsample
    from napari_pupick.training import Checkpoint

    synth, files, folder = synth_files
    model = tmp_path / "model.pt"
    assert main(["train", str(folder / "micrographs"), "--labels", str(files["labels"]), "--radius", "12",
                 "-o", str(model), *TINY]) == 0
    out = capsys.readouterr().out
    factor = choose_downsample(12).factor
    assert f"binning {factor} (auto)" in out and "particles per micrograph" in out and "default threshold" in out
    ckpt = Checkpoint.load(model)
    threshold = ckpt.metrics["threshold"]
    assert ckpt.metrics["expected_source"] == "estimated" and ckpt.metrics["expected_particles"] > 0
    assert ckpt.metrics["kept"].startswith("kept ")
    assert int(ckpt.preprocess["downsample"]) == factor

    default, every = tmp_path / "picks.star", tmp_path / "all.star"
    assert main(["extract", str(folder / "micrographs"), "--model", str(model), "-o", str(default), "-q"]) == 0
    assert main(["extract", str(folder / "micrographs"), "--model", str(model), "-o", str(every),
                 "--all-candidates", "-q"]) == 0
    picks, candidates = read_coordinates(default), read_coordinates(every)
    assert len(picks) > 0 and (picks["score"] >= threshold - 1e-6).all()
    assert len(candidates) > len(picks)
    assert (candidates["score"] < threshold).any()
    # the default margin is one particle radius: nothing closer to the border
    assert (picks[["x", "y"]].to_numpy() >= 12 - 1e-6).all()
    assert (picks[["x", "y"]].to_numpy() <= 320 - 1 - 12 + 1e-6).all()
    # the same picks (within a pixel of the margin) as the candidates above the threshold
    above = candidates[(candidates["score"] >= threshold)]
    assert len(above) == len(picks)
    converted = tmp_path / "converted.csv"
    assert main(["convert", str(every), str(converted), "--model", str(model)]) == 0
    assert len(read_coordinates(converted, format="csv")) == len(picks)


def test_train_without_labels_fails_cleanly(synth_files, tmp_path, capsys):
    synth, files, folder = synth_files
    empty = tmp_path / "empty.csv"
    empty.write_text("micrograph,x,y\n")
    rc = main(["train", str(folder / "micrographs"), "--labels", str(empty), "--radius", "10", "-o",
               str(tmp_path / "m.pt"), *TINY])
    assert rc == 1
    assert "label" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_bad_micrograph_reports_file(tmp_path, capsys):
    bad = tmp_path / "broken.mrc"
    bad.write_bytes(b"not an mrc file at all" * 10)
    rc = main(["normalize", str(bad), "-o", str(tmp_path / "out")])
    assert rc == 1
    assert "broken.mrc" in capsys.readouterr().err


def test_normalize_writes_mrcs_and_settings(synth_files, tmp_path):
    import mrcfile

    synth, files, folder = synth_files
    out = tmp_path / "norm"
    assert main(["normalize", str(folder / "micrographs"), "-o", str(out), "--downsample", "2", "-q"]) == 0
    settings = json.loads((out / "preprocess.json").read_text())
    assert settings["downsample"] == 2
    with mrcfile.open(out / f"{synth.names[0]}.mrc") as mrc:
        assert mrc.data.shape == (160, 160)
        assert abs(float(np.median(mrc.data))) < 1.0


def test_demo_runs_whole_loop(tmp_path):
    from napari_pupick.demo import run_demo

    result = run_demo(tmp_path / "demo", n_micrographs=4, n_labels=30, shape=(320, 320), radius=12, snr=0.3,
                      downsample=2, progress=False, epochs=3, steps_per_epoch=15)
    for name in ("model.pt", "picks.star", "picks.csv", "metrics.json", "picks.png"):
        assert (tmp_path / "demo" / name).exists(), name
    assert any((tmp_path / "demo" / "picks_relion").glob("*.star"))
    assert result["ap"] > 0.3


def test_normalize_reads_8_bit_png_like_the_same_mrc(data_dir, tmp_path):
    """Picking sets shipped as 8-bit PNG: the real apoferritin crops quantized to 8 bits give the same
    normalized micrographs from PNG files as from MRC files holding the same pixels."""
    import mrcfile
    from PIL import Image

    from napari_pupick.io import list_micrographs, read_micrograph

    png, mrc = tmp_path / "png", tmp_path / "mrc"
    png.mkdir()
    mrc.mkdir()
    for path in list_micrographs(data_dir / "empiar10146_apoferritin" / "micrographs"):
        image = read_micrograph(path).astype(float)
        grey = np.round(255 * (image - image.min()) / np.ptp(image)).astype(np.uint8)
        Image.fromarray(grey).save(png / f"{path.stem}.png")
        with mrcfile.new(mrc / f"{path.stem}.mrc") as m:
            m.set_data(grey)
    for src in (png, mrc):
        assert main(["normalize", str(src), "-o", str(tmp_path / f"out_{src.name}"), "--radius", "30", "-q"]) == 0
    outs = sorted((tmp_path / "out_png").glob("*.mrc"))
    assert len(outs) == 3
    first = read_micrograph(mrc / f"{outs[0].stem}.mrc").astype(np.uint8)
    Image.fromarray(first).save(tmp_path / "one.jpg", quality=95)
    assert main(["normalize", str(tmp_path / "one.jpg"), "-o", str(tmp_path / "out_jpg"), "--radius", "30",
                 "-q"]) == 0
    with mrcfile.open(tmp_path / "out_jpg" / "one.mrc") as jpg, mrcfile.open(outs[0]) as ref:
        assert jpg.data.shape == ref.data.shape
        assert np.corrcoef(jpg.data.ravel(), ref.data.ravel())[0, 1] > 0.99  # lossy, the same picture
    for out in outs:
        with mrcfile.open(out) as a, mrcfile.open(tmp_path / "out_mrc" / out.name) as b:
            np.testing.assert_allclose(a.data, b.data, atol=1e-5)
