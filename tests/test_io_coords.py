"""Coordinate files: every format round-trips through the one pick table; bad files give clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_pupick.errors import CoordinateError
from napari_pupick.io import (
    COLUMNS,
    match_micrographs,
    read_coordinates,
    validate_in_bounds,
    write_coordinates,
)
from napari_pupick.io import coords as coords_module


@pytest.fixture
def table():
    """Two micrographs (one with a dotted name, one all digits), fractional coordinates, logit scores."""
    return pd.DataFrame({
        "micrograph": ["May08_03.05.02"] * 3 + ["0007"] * 2,
        "x": [10.5, 200.25, 33.0, 1.0, 1023.75],
        "y": [20.0, 5.125, 400.5, 2.0, 0.0],
        "score": [3.5, -1.25, 0.0, 7.0, -6.5],
    })


def _sorted(df):
    return df.sort_values(["micrograph", "x", "y"]).reset_index(drop=True)


def assert_tables_equal(a, b, atol=0.0):
    assert tuple(b.columns) == COLUMNS
    a, b = _sorted(a), _sorted(b)
    assert list(a["micrograph"]) == list(b["micrograph"])
    for col in ["x", "y", "score"]:
        np.testing.assert_allclose(b[col].to_numpy(float), a[col].to_numpy(float), atol=atol, rtol=0)


@pytest.mark.parametrize("filename", ["picks.star", "picks.csv", "picks.txt", "picks.tsv"])
@pytest.mark.parametrize("with_score", [True, False])
def test_round_trip_combined_formats(tmp_path, table, filename, with_score):
    if not with_score:
        table = table.assign(score=np.nan)
    written = write_coordinates(table, tmp_path / filename)
    assert written == tmp_path / filename
    back = read_coordinates(written)
    assert back["x"].dtype == np.float64 and back["score"].dtype == np.float64
    assert_tables_equal(table, back, atol=1e-6 if filename.endswith(".star") else 0.0)
    if not with_score:
        assert back["score"].isna().all()
    assert list(back.index) == list(range(len(table)))


@pytest.mark.parametrize("fmt", ["star", "csv", "topaz", "box"])
def test_round_trip_per_micrograph(tmp_path, table, fmt):
    out = tmp_path / "per"
    written = write_coordinates(table, out, fmt, per_micrograph=True, box_size=40)
    ext = {"star": ".star", "csv": ".csv", "topaz": ".txt", "box": ".box"}[fmt]
    assert sorted(p.name for p in written) == sorted([f"May08_03.05.02{ext}", f"0007{ext}"])
    assert_tables_equal(table, read_coordinates(out), atol=1e-6)


def test_box_single_file_centres_and_corners(tmp_path, table):
    one = table[table.micrograph == "0007"]
    path = write_coordinates(one, tmp_path / "0007.box", box_size=64)
    first = path.read_text().splitlines()[0].split("\t")
    assert [float(v) for v in first] == [1.0 - 32, 2.0 - 32, 64, 64, 7.0]  # corner = centre - box/2
    assert_tables_equal(one, read_coordinates(path), atol=1e-9)


def test_per_micrograph_star_matches_relion_import(tmp_path, table):
    written = write_coordinates(table, tmp_path / "relion", per_micrograph=True)
    text = (tmp_path / "relion" / "0007.star").read_text()
    assert "_rlnCoordinateX" in text and "_rlnAutopickFigureOfMerit" in text
    assert "_rlnMicrographName" not in text  # the file name says which micrograph
    auto = write_coordinates(table, tmp_path / "auto", per_micrograph=True, suffix="_autopick")
    assert sorted(p.name for p in auto) == ["0007_autopick.star", "May08_03.05.02_autopick.star"]
    assert_tables_equal(table, read_coordinates(tmp_path / "auto"), atol=1e-6)
    # a single per-micrograph file read on its own is named after the file
    single = read_coordinates(tmp_path / "auto" / "0007_autopick.star")
    assert set(single.micrograph) == {"0007"} and len(single) == 2
    assert len(written) == 2


def test_star_micrograph_names_get_an_extension_once(tmp_path, table):
    path = write_coordinates(table.assign(micrograph=["a.mrc"] * 3 + ["b"] * 2), tmp_path / "x.star")
    text = path.read_text()
    assert "a.mrc\t" in text and "b.mrc\t" in text and "a.mrc.mrc" not in text
    bare = write_coordinates(table, tmp_path / "bare.star", micrograph_ext="")
    assert "\n0007\t" in bare.read_text()
    assert_tables_equal(table, read_coordinates(bare), atol=1e-6)


def test_star_names_with_directories_and_multiple_blocks(tmp_path):
    (tmp_path / "relion31.star").write_text(
        "data_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnVoltage #2\n1 300.0\n\n"
        "data_particles\n\nloop_\n_rlnMicrographName #1\n_rlnCoordinateX #2\n_rlnCoordinateY #3\n"
        "_rlnAutopickFigureOfMerit #4\n"
        "MotionCorr/job002/Movies/mic_01.mrc 100.0 200.0 1.5\nMotionCorr/job002/Movies/mic_02.mrc 3 4 -2\n"
    )
    t = read_coordinates(tmp_path / "relion31.star")
    assert list(t.micrograph) == ["mic_01", "mic_02"]
    np.testing.assert_array_equal(t[["x", "y", "score"]].to_numpy(), [[100, 200, 1.5], [3, 4, -2]])
    # one block per micrograph, named by its block
    (tmp_path / "blocks.star").write_text(
        "data_mic_a\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n1 2\n3 4\n\n"
        "data_mic_b\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n5 6\n"
    )
    t = read_coordinates(tmp_path / "blocks.star")
    assert list(t.micrograph) == ["mic_a", "mic_a", "mic_b"] and t.score.isna().all()


def test_aliases_and_format_override(tmp_path):
    # a Topaz-style header in a .csv, and a .dat file read as Topaz when told
    (tmp_path / "t.csv").write_text("image_name,x_coord,y_coord\nm1,1,2\n")
    assert read_coordinates(tmp_path / "t.csv").iloc[0].tolist()[:3] == ["m1", 1.0, 2.0]
    (tmp_path / "t.dat").write_text("image_name\tx_coord\ty_coord\tscore\nm1\t1\t2\t0.5\n")
    t = read_coordinates(tmp_path / "t.dat", format="topaz")
    assert t.iloc[0].tolist() == ["m1", 1.0, 2.0, 0.5]
    # a per-micrograph CSV without a name column is named after the file
    (tmp_path / "mic_9_manualpick.csv").write_text("x,y\n5,6\n")
    assert read_coordinates(tmp_path / "mic_9_manualpick.csv").micrograph.tolist() == ["mic_9"]


def test_empty_files_give_empty_tables(tmp_path):
    (tmp_path / "none.star").write_text("\ndata_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n")
    (tmp_path / "zero.box").write_text("")
    (tmp_path / "header.csv").write_text("micrograph,x,y,score\n")
    for name in ["none.star", "zero.box", "header.csv"]:
        t = read_coordinates(tmp_path / name)
        assert len(t) == 0 and tuple(t.columns) == COLUMNS


@pytest.mark.parametrize(
    "folder, n_particles, n_micrographs",
    [("empiar10146_apoferritin", 26, 3), ("empiar10028_ribosome", 13, 3)],
)
def test_real_particles(data_dir, folder, n_particles, n_micrographs):
    t = read_coordinates(data_dir / folder / "particles.txt")
    assert len(t) == n_particles
    assert t.micrograph.nunique() == n_micrographs
    stems = sorted(p.stem for p in (data_dir / folder / "micrographs").glob("*.mrc"))
    assert sorted(t.micrograph.unique()) == stems
    assert t.score.isna().all()
    match_micrographs(t, stems)  # every name matches a micrograph


def test_synthetic_write_uses_this_module(synthetic_dir):
    syn = synthetic_dir["set"]
    labels = read_coordinates(synthetic_dir["labels"])
    assert_tables_equal(syn.labels.assign(score=1.0), labels, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_star_without_coordinate_columns(tmp_path):
    path = tmp_path / "ctf.star"
    path.write_text("data_micrographs\n\nloop_\n_rlnMicrographName #1\n_rlnDefocusU #2\na.mrc 10000\n")
    with pytest.raises(CoordinateError) as info:
        read_coordinates(path)
    msg = str(info.value)
    assert "ctf.star" in msg and "rlnDefocusU" in msg and "rlnCoordinateX" in msg


def test_not_a_star_file(tmp_path):
    path = tmp_path / "junk.star"
    path.write_text("hello\n1 2 3\n")
    with pytest.raises(CoordinateError, match=r"junk\.star: no data blocks"):
        read_coordinates(path)


def test_csv_missing_columns_lists_found_and_needed(tmp_path):
    path = tmp_path / "napari_points.csv"
    path.write_text("index,axis-0,axis-1\n0,1,2\n")
    with pytest.raises(CoordinateError, match=r"napari_points\.csv.*found columns \[index, axis-0, axis-1\].*"
                                              r"need micrograph, x and y"):
        read_coordinates(path)


def test_non_numeric_and_bad_box_lines(tmp_path):
    (tmp_path / "t.csv").write_text("micrograph,x,y\na,1,2\na,three,4\n")
    with pytest.raises(CoordinateError, match=r"t\.csv: 1 value\(s\) of x are missing or not numbers.*'three'"):
        read_coordinates(tmp_path / "t.csv")
    (tmp_path / "m.box").write_text("10 20 64 64\n10 20\n")
    with pytest.raises(CoordinateError, match=r"m\.box, line 2: expected x_corner y_corner width height"):
        read_coordinates(tmp_path / "m.box")


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(CoordinateError, match=r"a\.json: unknown coordinate file type '\.json'"):
        read_coordinates(tmp_path / "a.json")
    with pytest.raises(CoordinateError, match="no such file"):
        read_coordinates(tmp_path / "nope.star")


def test_points_outside_the_image(table):
    shapes = {"May08_03.05.02": (300, 250), "0007": (1024, 1024)}
    with pytest.raises(CoordinateError) as info:
        validate_in_bounds(table, shapes, path="picks.star")
    msg = str(info.value)
    # (33, 400.5) is below the 300-row image; (200.25, 5.125) is inside; 1023.75 > 1023.5 on 0007
    assert msg.startswith("picks.star: 2 point(s) fall outside")
    assert "1 on May08_03.05.02 (300 x 250 pixels, e.g. x=33, y=400.5)" in msg
    assert "1 on 0007" in msg
    validate_in_bounds(table, {"May08_03.05.02": (500, 250), "0007": (1024, 1025)})  # all inside: no error


def test_micrograph_names_matching_nothing(table):
    with pytest.raises(CoordinateError) as info:
        match_micrographs(table, ["mic_a", "mic_b"], path="picks.star")
    msg = str(info.value)
    assert "picks.star: 5 point(s) on micrographs that are not open" in msg
    assert "May08_03.05.02 (3 points)" in msg and "0007 (2 points)" in msg and "mic_a, mic_b" in msg
    plane = match_micrographs(table, ["0007", "other"], allow_partial=True)
    np.testing.assert_array_equal(plane, [-1, -1, -1, 0, 0])
    with pytest.raises(CoordinateError, match="May08_03.05.02"):
        match_micrographs(table, ["0007"])
    with pytest.raises(CoordinateError):
        match_micrographs(table, ["x"], allow_partial=True)


def test_write_argument_errors(tmp_path, table):
    with pytest.raises(CoordinateError, match=r"need a box size: pass box_size"):
        write_coordinates(table, tmp_path / "a.box")
    with pytest.raises(CoordinateError, match=r"holds one micrograph but the table has 2"):
        write_coordinates(table, tmp_path / "a.box", box_size=32)
    with pytest.raises(CoordinateError, match="need micrograph, x and y"):
        write_coordinates(table.drop(columns="y"), tmp_path / "a.csv")
    with pytest.raises(CoordinateError, match="unknown coordinate file type"):
        write_coordinates(table, tmp_path / "a.xyz")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------------


def _boom(*args, **kwargs):
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize("filename, target", [("picks.star", "starfile.write"), ("picks.csv", "to_csv")])
def test_failed_write_leaves_existing_file_and_no_temp(tmp_path, table, monkeypatch, filename, target):
    path = tmp_path / filename
    path.write_text("precious\n")
    if target == "starfile.write":
        import starfile

        monkeypatch.setattr(starfile, "write", _boom)
    else:
        monkeypatch.setattr(pd.DataFrame, "to_csv", _boom)
    with pytest.raises(OSError, match="disk full"):
        write_coordinates(table, path)
    assert path.read_text() == "precious\n"
    assert [p.name for p in tmp_path.iterdir()] == [filename]


def test_failed_per_micrograph_write_replaces_nothing(tmp_path, table, monkeypatch):
    out = tmp_path / "per"
    out.mkdir()
    (out / "0007.star").write_text("old 0007\n")
    (out / "May08_03.05.02.star").write_text("old May\n")
    import starfile

    real, calls = starfile.write, []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(starfile, "write", fail_second)
    with pytest.raises(OSError):
        write_coordinates(table, out, per_micrograph=True)
    assert sorted(p.name for p in out.iterdir()) == ["0007.star", "May08_03.05.02.star"]
    assert (out / "0007.star").read_text() == "old 0007\n"
    assert (out / "May08_03.05.02.star").read_text() == "old May\n"


def test_successful_write_replaces_existing_file(tmp_path, table):
    path = tmp_path / "picks.csv"
    path.write_text("old\n")
    write_coordinates(table, path)
    assert path.read_text().startswith("micrograph,x,y,score")
    assert [p.name for p in tmp_path.iterdir()] == ["picks.csv"]
    assert coords_module.guess_format(path) == "csv"
