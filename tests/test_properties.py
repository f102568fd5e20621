"""Property-based tests (hypothesis) of every coordinate reader and writer and of the MRC reader.

Round trips: generated tables (names, coordinates, scores) written in each format read back equal, or the writer
refuses them with the package's own error naming the file. Garbage: random text and bytes given to every reader
give either a valid table (finite coordinates, string names) or a PupickError naming the file; anything else is a
bug. Bounded: max_examples per property below, no deadline (the machine is shared).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_pupick.errors import PupickError
from napari_pupick.io import read_coordinates, read_micrograph, write_coordinates, write_micrograph

ROUND_TRIPS = 150
GARBAGE = 200
FAST = settings(max_examples=ROUND_TRIPS, deadline=None, suppress_health_check=list(HealthCheck))
MANY = settings(max_examples=GARBAGE, deadline=None, suppress_health_check=list(HealthCheck))
EXT = {"star": ".star", "csv": ".csv", "topaz": ".txt", "box": ".box"}

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=12)
coords = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
scores = st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False))


@st.composite
def tables(draw, one_micrograph=False):
    n = draw(st.integers(1, 6))
    pool = [draw(names)] if one_micrograph else draw(st.lists(names, min_size=1, max_size=3))
    scored = draw(st.booleans())
    rows = [(draw(st.sampled_from(pool)), draw(coords), draw(coords),
             draw(st.floats(-50, 50, allow_nan=False)) if scored else math.nan) for _ in range(n)]
    return pd.DataFrame(rows, columns=["micrograph", "x", "y", "score"])


def _names_the_file(exc: BaseException, path: Path) -> bool:
    return str(path) in str(exc) or path.name in str(exc)


def _valid_table(table: pd.DataFrame) -> None:
    assert list(table.columns) == ["micrograph", "x", "y", "score"]
    assert np.isfinite(table[["x", "y"]].to_numpy(float)).all()
    assert all(isinstance(v, str) for v in table["micrograph"])


@pytest.mark.parametrize("fmt", ["star", "csv", "topaz"])
@FAST
@given(table=tables())
def test_round_trip_or_named_refusal(fmt, table):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"picks{EXT[fmt]}"
        try:
            write_coordinates(table, path)
        except PupickError as exc:
            assert _names_the_file(exc, path), exc
            assert not path.exists()
            return
        back = read_coordinates(path)
        _valid_table(back)
        assert list(back["micrograph"]) == list(table["micrograph"])
        np.testing.assert_allclose(back[["x", "y"]].to_numpy(float), table[["x", "y"]].to_numpy(float), rtol=1e-6,
                                   atol=1e-3)
        if table["score"].notna().all():
            np.testing.assert_allclose(back["score"].to_numpy(float), table["score"].to_numpy(float), rtol=1e-6,
                                       atol=1e-6)


@pytest.mark.parametrize("fmt", ["star", "csv", "topaz", "box"])
@FAST
@given(table=tables(one_micrograph=True))
def test_per_micrograph_round_trip_or_named_refusal(fmt, table):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "out"
        try:
            write_coordinates(table, folder, per_micrograph=True, format=fmt, box_size=10.0)
        except PupickError as exc:
            assert "out" in str(exc), exc
            return
        back = read_coordinates(folder, format=fmt)
        _valid_table(back)
        assert set(back["micrograph"]) == set(table["micrograph"])
        np.testing.assert_allclose(back[["x", "y"]].to_numpy(float), table[["x", "y"]].to_numpy(float), rtol=1e-6,
                                   atol=1e-3)


LINES = st.lists(st.one_of(
    st.text(max_size=40),
    st.sampled_from(["data_", "data_x", "loop_", "_rlnCoordinateX #1", "_rlnCoordinateY #2", "_rlnMicrographName #3",
                     "micrograph,x,y,score", "image_name\tx_coord\ty_coord\tscore", "a,1,2,3", "a\t1\t2", "1 2 3 4",
                     "10 20 30 30 0.5", "nan", "inf", "1e400", "'a b' 1 2", '"x', "1,5 2,5 10 10", "#", ""]),
    st.lists(st.sampled_from(["a", "1", "-2.5", "1e3", "nan", "inf", "''", "'q", ",", "\t", " ", "x y"]),
             max_size=5).map(" ".join)), max_size=8).map("\n".join)


@pytest.mark.parametrize("fmt", ["star", "csv", "topaz", "box"])
@MANY
@given(text=LINES)
def test_random_text_gives_a_table_or_a_named_error(fmt, text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"m{EXT[fmt]}"
        path.write_text(text, encoding="utf-8")
        try:
            table = read_coordinates(path)
        except PupickError as exc:
            assert _names_the_file(exc, path), exc
            return
        _valid_table(table)


@pytest.mark.parametrize("fmt", ["star", "csv", "topaz", "box"])
@MANY
@given(data=st.binary(max_size=300))
def test_random_bytes_give_a_table_or_a_named_error(fmt, data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"m{EXT[fmt]}"
        path.write_bytes(data)
        try:
            table = read_coordinates(path)
        except PupickError as exc:
            assert _names_the_file(exc, path), exc
            return
        _valid_table(table)


@pytest.fixture(scope="module")
def mrc_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("mrc") / "m.mrc"
    write_micrograph(path, np.arange(12 * 10, dtype=np.float32).reshape(12, 10), pixel_size=1.5)
    return path.read_bytes()


@MANY
@given(data=st.binary(max_size=1500))
def test_random_bytes_as_mrc(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.mrc"
        path.write_bytes(data)
        try:
            image = read_micrograph(path)
        except PupickError as exc:
            assert _names_the_file(exc, path), exc
            return
        assert image.ndim == 2 and np.isfinite(image).all()


@MANY
@given(edits=st.lists(st.tuples(st.integers(0, 1503), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 1504)))
def test_corrupted_mrc_gives_an_image_or_a_named_error(mrc_bytes, edits, cut):
    data = bytearray(mrc_bytes)
    for i, v in edits:
        if i < len(data):
            data[i] = v
    if cut is not None:
        data = data[:cut]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.mrc"
        path.write_bytes(bytes(data))
        try:
            image = read_micrograph(path)
        except PupickError as exc:
            assert _names_the_file(exc, path), exc
            return
        assert image.ndim == 2 and np.isfinite(image).all()
