"""RELION 5 External job entry points on a small synthetic RELION project: every file written parses with
``starfile`` (as RELION users' tools read them), names match the input micrographs, the node file names the
coordinates file, and the exit files tell RELION how the job ended."""

from __future__ import annotations

from pathlib import Path

import pytest
import starfile

from napari_pupick.cli import main
from napari_pupick.relion import COORDS_NODE, MODEL_NODE, pick_main, relion_targets

JOB = "External/job012/"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A RELION project (the current directory): MotionCorr/job002/Movies/*.mrc listed in a micrographs STAR
    with its optics table, and a ManualPick job's coordinates for two of them."""
    from napari_pupick.synthetic import make_synthetic

    monkeypatch.chdir(tmp_path)
    synth = make_synthetic(n_micrographs=4, shape=(192, 192), n_particles=12, radius=8, snr=0.5, n_labels=16,
                           label_micrographs=2, seed=4, name_prefix="FoilHole_1_Data")
    files = synth.write(tmp_path / "raw")
    mics = []
    for p in files["micrographs"]:
        target = Path("MotionCorr/job002/Movies") / p.name
        target.parent.mkdir(parents=True, exist_ok=True)
        p.rename(target)
        mics.append(str(target))
    rows = "".join(f"{m} 1\n" for m in mics)
    star = _write(Path("MotionCorr/job002/corrected_micrographs.star"),
                  "\n# version 50001\n\ndata_optics\n\nloop_\n_rlnOpticsGroupName #1\n_rlnOpticsGroup #2\n"
                  "_rlnMicrographPixelSize #3\n_rlnVoltage #4\nopticsGroup1 1 1.000000 300.000000\n\n"
                  "# version 50001\n\ndata_micrographs\n\nloop_\n_rlnMicrographName #1\n_rlnOpticsGroup #2\n"
                  + rows)
    coord_rows = []
    for m in mics[:2]:
        name = Path(m).stem
        picks = synth.labels[synth.labels["micrograph"] == name]
        cf = Path("ManualPick/job004/Movies") / f"{name}_manualpick.star"
        _write(cf, "\ndata_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n"
               + "".join(f"{x:.1f} {y:.1f}\n" for x, y in zip(picks["x"], picks["y"])))
        coord_rows.append(f"{m} {cf}\n")
    manual = _write(Path("ManualPick/job004/manualpick.star"),
                    "\ndata_coordinate_files\n\nloop_\n_rlnMicrographName #1\n_rlnMicrographCoordinates #2\n"
                    + "".join(coord_rows))
    return {"mics": mics, "star": str(star), "manualpick": str(manual), "labels": synth.labels}


def _job_files(job: str) -> list[Path]:
    return sorted(p for p in Path(job).rglob("*") if p.is_file() and ".pupick" not in p.parts)


def test_pick_writes_relion_autopick_layout(project, tiny_model):
    rc = main(["relion", "pick", "--o", JOB, "--in_mics", project["star"], "--model", str(tiny_model), "--j", "1"])
    assert rc == 0
    assert Path(JOB, "RELION_JOB_EXIT_SUCCESS").is_file() and not Path(JOB, "RELION_JOB_EXIT_FAILURE").exists()
    for f in _job_files(JOB):  # every STAR file the job wrote parses with starfile
        if f.suffix == ".star":
            starfile.read(f, always_dict=True)
    listing = starfile.read(Path(JOB, "autopick.star"), always_dict=True)["coordinate_files"]
    assert list(listing["rlnMicrographName"]) == project["mics"]
    # RELION's AutoPick layout: the micrograph's directory without MotionCorr/job002/
    expected = [f"External/job012/Movies/{Path(m).stem}_autopick.star" for m in project["mics"]]
    assert list(listing["rlnMicrographCoordinates"]) == expected
    for f in expected:
        coords = starfile.read(f)
        assert list(coords.columns) == ["rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit"]
        assert len(coords) > 0 and (coords["rlnCoordinateX"] < 192).all()
    nodes = starfile.read(Path(JOB, "RELION_OUTPUT_NODES.star"), always_dict=True)["output_nodes"]
    assert list(nodes["rlnPipeLineNodeName"]) == ["External/job012/autopick.star"]
    assert list(nodes["rlnPipeLineNodeTypeLabel"]) == [COORDS_NODE]
    # RELION's "Continue": nothing redone, the same listing
    before = Path(JOB, "autopick.star").read_bytes()
    assert pick_main(["--o", JOB, "--in_mics", project["star"], "--model", str(tiny_model)]) == 0
    assert Path(JOB, "autopick.star").read_bytes() == before


def test_pick_failure_writes_failure(project, tiny_model, capsys):
    bad = Path(project["star"]).read_text() + "MotionCorr/job002/Movies/missing.mrc 1\n"
    star = _write(Path("bad_micrographs.star"), bad)
    rc = main(["relion", "pick", "--o", JOB, "--in_mics", str(star), "--model", str(tiny_model)])
    assert rc == 1
    assert Path(JOB, "RELION_JOB_EXIT_FAILURE").is_file() and not Path(JOB, "RELION_JOB_EXIT_SUCCESS").exists()
    assert "missing.mrc" in capsys.readouterr().out
    # the others are listed; a model that does not exist fails cleanly too
    listing = starfile.read(Path(JOB, "autopick.star"))
    assert list(listing["rlnMicrographName"]) == project["mics"]
    assert main(["relion", "pick", "--o", "External/job013/", "--in_mics", project["star"], "--model",
                 "nope.pt"]) == 1
    assert Path("External/job013/RELION_JOB_EXIT_FAILURE").is_file()
    assert "nope.pt" in capsys.readouterr().err


def test_targets_keep_the_whole_directory_when_short_names_collide():
    names = ["MotionCorr/job002/Movies/a.mrc", "MotionCorr/job003/Movies/a.mrc", "Import/b.tif.mrc"]
    assert [str(t) for t in relion_targets(names, "External/job1")] == [
        "External/job1/MotionCorr/job002/Movies/a_autopick.star",
        "External/job1/MotionCorr/job003/Movies/a_autopick.star", "External/job1/Import/b.tif_autopick.star"]
    assert [str(t) for t in relion_targets(names[:1], "X")] == ["X/Movies/a_autopick.star"]


def test_train_from_manualpick_then_pick_with_the_model(project):
    rc = main(["relion", "train", "--o", "External/job020/", "--in_mics", project["star"], "--in_coords",
               project["manualpick"], "--radius", "8", "--epochs", "1", "--steps", "8", "--j", "1"])
    assert rc == 0
    assert Path("External/job020/RELION_JOB_EXIT_SUCCESS").is_file()
    nodes = starfile.read("External/job020/RELION_OUTPUT_NODES.star", always_dict=True)["output_nodes"]
    assert list(nodes["rlnPipeLineNodeName"]) == ["External/job020/model.pt"]
    assert list(nodes["rlnPipeLineNodeTypeLabel"]) == [MODEL_NODE]
    labels = starfile.read("External/job020/labels.star")
    assert len(labels) == len(project["labels"])
    assert set(labels["rlnMicrographName"]) == {Path(m).name for m in project["mics"][:2]}
    assert pick_main(["--o", JOB, "--in_mics", project["star"], "--model", "External/job020/model.pt"]) == 0
    assert len(starfile.read(Path(JOB, "autopick.star"))) == len(project["mics"])


def test_train_without_coordinates_fails(project, capsys):
    assert main(["relion", "train", "--o", "External/job021/", "--in_mics", project["star"], "--radius", "8"]) == 1
    assert Path("External/job021/RELION_JOB_EXIT_FAILURE").is_file()
    assert "--in_coords" in capsys.readouterr().err


def test_unknown_parameter_fails_with_the_exit_file(project, tiny_model):
    with pytest.raises(SystemExit):
        main(["relion", "pick", "--o", "External/job030/", "--in_mics", project["star"], "--model", str(tiny_model),
              "--no_such_param", "3"])
    assert Path("External/job030/RELION_JOB_EXIT_FAILURE").is_file()
