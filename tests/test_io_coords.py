"""Coordinate files: every format round-trips through the one pick table; bad files give clear errors."""

from __future__ import annotations

import os

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
from napari_pupick.io import atomic as atomic_module


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
    with pytest.raises(CoordinateError, match=r"t\.csv: 1 value\(s\) of x are missing or not finite numbers.*'three'"):
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


@pytest.mark.parametrize("filename, target", [("picks.star", "_write_text"), ("picks.csv", "to_csv")])
def test_failed_write_leaves_existing_file_and_no_temp(tmp_path, table, monkeypatch, filename, target):
    path = tmp_path / filename
    path.write_text("precious\n")
    if target == "_write_text":
        monkeypatch.setattr(coords_module, "_write_text", _boom)
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
    real, calls = coords_module._write_text, []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(coords_module, "_write_text", fail_second)
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


# ---------------------------------------------------------------------------------------------------------------
# Reliability (issue 13): no stale reads, no silent drops, one rule for coordinates and names
# ---------------------------------------------------------------------------------------------------------------

_STAR_ROW = "data_\n\nloop_\n_rlnMicrographName #1\n_rlnCoordinateX #2\n_rlnCoordinateY #3\n{}\n"


def test_star_fixed_after_a_failed_read_gives_the_new_rows(tmp_path):
    path = tmp_path / "picks.star"
    path.write_text(_STAR_ROW.format("a.mrc 1 2\nb.mrc 3"))  # a row with a missing field
    with pytest.raises(CoordinateError, match=r"picks\.star, line 8: 2 value\(s\) in a row.*3 column"):
        read_coordinates(path)
    path.write_text(_STAR_ROW.format("a.mrc 100 200\nb.mrc 300 400"))
    t = read_coordinates(path)
    assert t[["x", "y"]].to_numpy().tolist() == [[100, 200], [300, 400]]


def test_concatenated_star_files_keep_every_block(tmp_path):
    one = "data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n{}\n"
    path = tmp_path / "mic_autopick.star"
    path.write_text(one.format("1 2\n3 4") + one.format("5 6"))  # cat a_autopick.star b_autopick.star
    t = read_coordinates(path)
    assert t[["x", "y"]].to_numpy().tolist() == [[1, 2], [3, 4], [5, 6]] and set(t.micrograph) == {"mic"}


def test_star_windows_path_in_one_row_block_and_names_like_nan(tmp_path):
    path = tmp_path / "one.star"
    path.write_text("data_\n_rlnMicrographName C:\\data\\mics\\x.tif.mrc\n_rlnCoordinateX 5\n_rlnCoordinateY 6\n")
    t = read_coordinates(path)
    assert t.micrograph.tolist() == ["x.tif"] and t.x.tolist() == [5.0]
    path.write_text(_STAR_ROW.format("nan 1 2\nnan.mrc 3 4"))
    assert read_coordinates(path).micrograph.tolist() == ["nan", "nan"]


def test_star_duplicate_column_is_an_error(tmp_path):
    path = tmp_path / "dup.star"
    path.write_text("data_\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateX #2\n_rlnCoordinateY #3\n1 2 3\n")
    with pytest.raises(CoordinateError, match=r"dup\.star, line 4: column _rlnCoordinateX appears twice"):
        read_coordinates(path)
    (tmp_path / "dup.csv").write_text("micrograph,x,x,y\na,1,2,3\n")
    with pytest.raises(CoordinateError, match=r"dup\.csv"):
        read_coordinates(tmp_path / "dup.csv")


@pytest.mark.parametrize("value", ["inf", "-inf", "1e400", "nan", "1e300"])
@pytest.mark.parametrize("fmt", ["star", "csv", "topaz", "box"])
def test_non_finite_or_huge_coordinates_are_named_errors(tmp_path, value, fmt):
    body = {"star": _STAR_ROW.format(f"a.mrc 1 2\na.mrc {value} 4"),
            "csv": f"micrograph,x,y\na,1,2\na,{value},4\n",
            "topaz": f"image_name\tx_coord\ty_coord\na\t1\t2\na\t{value}\t4\n",
            "box": f"1 2 10 10\n{value} 4 10 10\n"}[fmt]
    path = tmp_path / f"a.{ {'topaz': 'txt'}.get(fmt, fmt) }"
    path.write_text(body)
    with pytest.raises(CoordinateError) as info:
        read_coordinates(path)
    msg = str(info.value)
    assert str(path) in msg and ("row 2" in msg or "line 2" in msg) and value in msg


def test_box_decimal_commas_are_refused(tmp_path):
    path = tmp_path / "m.box"
    path.write_text("10,5 20,5 64 64\n")
    with pytest.raises(CoordinateError, match=r"m\.box, line 1: '10,5' is not a number \(a decimal comma"):
        read_coordinates(path)
    path.write_text("10,20,64,64\n")  # comma-separated is fine
    assert read_coordinates(path)[["x", "y"]].to_numpy().tolist() == [[42, 52]]


def test_malformed_tsv_gives_our_error(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_bytes(b'image_name\tx_coord\ty_coord\n"a\t1\t2\n')
    try:
        t = read_coordinates(path)
    except CoordinateError as exc:
        assert "bad.tsv" in str(exc)
    else:
        assert tuple(t.columns) == COLUMNS


@pytest.mark.parametrize("name", ["#hash", "_under", "data_x", "loop_y", "with space", "it's", 'say "hi"',
                                  "x.tif", "May08_03.05.02", "nan", "'quoted'", "a.mrc.tif"])
@pytest.mark.parametrize("filename", ["p.star", "p.csv", "p.txt"])
def test_micrograph_names_round_trip(tmp_path, name, filename):
    table = pd.DataFrame({"micrograph": [name, "plain"], "x": [1.0, 2.0], "y": [3.0, 4.0], "score": [0.5, 1.0]})
    back = read_coordinates(write_coordinates(table, tmp_path / filename))
    assert back.micrograph.tolist() == [name, "plain"]


@pytest.mark.parametrize("name", ["x.tif", "May08_03.05.02", "nan", "#h"])
@pytest.mark.parametrize("fmt", ["star", "csv", "topaz", "box"])
def test_per_micrograph_names_round_trip(tmp_path, name, fmt):
    table = pd.DataFrame({"micrograph": [name], "x": [10.0], "y": [30.0], "score": [0.5]})
    write_coordinates(table, tmp_path / "per", fmt, per_micrograph=True, box_size=8)
    assert read_coordinates(tmp_path / "per").micrograph.tolist() == [name]


@pytest.mark.parametrize("name", [" lead", "trail ", "tab\there", "line\nbreak", ""])
def test_names_no_reader_gives_back_are_refused(tmp_path, name):
    table = pd.DataFrame({"micrograph": [name], "x": [1.0], "y": [2.0], "score": [0.5]})
    for filename in ["p.star", "p.csv", "p.txt"]:
        with pytest.raises(CoordinateError, match=r"micrograph name .*rename it|cannot store"):
            write_coordinates(table, tmp_path / filename)
    assert list(tmp_path.iterdir()) == []


def test_writers_refuse_infinite_coordinates(tmp_path, table):
    with pytest.raises(CoordinateError, match=r"a\.csv: 1 value\(s\) of x .*row 2, inf"):
        write_coordinates(table.assign(x=[1.0, np.inf, 2, 3, 4]), tmp_path / "a.csv")


def test_files_get_the_umask_permissions(tmp_path, table):
    import os

    old = os.umask(0o022)
    try:
        path = write_coordinates(table, tmp_path / "p.star")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_per_micrograph_export_failing_at_the_second_rename_keeps_the_old_set(tmp_path, table, monkeypatch):
    out = tmp_path / "per"
    out.mkdir()
    (out / "0007.star").write_text("old 0007\n")
    (out / "May08_03.05.02.star").write_text("old May\n")
    real, calls = os.replace, []

    def fail_second(src, dst):
        if not str(src).endswith(".tmp") or str(dst).endswith(".tmp"):
            return real(src, dst)
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("rename failed (simulated)")
        return real(src, dst)

    monkeypatch.setattr(atomic_module.os, "replace", fail_second)
    with pytest.raises(OSError, match="rename failed"):
        write_coordinates(table, out, per_micrograph=True)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["0007.star", "May08_03.05.02.star"]
    assert (out / "0007.star").read_text() == "old 0007\n"
    assert (out / "May08_03.05.02.star").read_text() == "old May\n"
