"""Micrograph files: reading, headers, listing, lazy stacks, and every kind of bad file."""

from __future__ import annotations

import warnings

import mrcfile
import numpy as np
import pytest
import tifffile

from napari_pupick.errors import MicrographError
from napari_pupick.io import (
    list_micrographs,
    micrograph_info,
    micrograph_name,
    open_stack,
    read_micrograph,
    write_micrograph,
)
from napari_pupick.io import mrc as mrc_module


def _write_mrc(path, data, voxel_size=1.0, stack=False):
    with mrcfile.new(path, overwrite=True) as m, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile warns about NaN pixels we put there on purpose
        m.set_data(np.asarray(data))
        if stack:
            m.set_image_stack()
        m.voxel_size = voxel_size
    return path


@pytest.fixture
def count_reads(monkeypatch):
    """Count the per-plane pixel reads of napari_pupick.io.mrc."""
    calls = []
    real = mrc_module._load_plane

    def counting(path, section=0, dtype=None):
        calls.append((str(path), section))
        return real(path, section, dtype)

    monkeypatch.setattr(mrc_module, "_load_plane", counting)
    return calls


@pytest.mark.parametrize(
    "given, expected",
    [
        ("a/b/mic_001.mrc", "mic_001"),
        ("May08_03.05.02.mrc", "May08_03.05.02"),
        ("May08_03.05.02", "May08_03.05.02"),
        ("MotionCorr/job002/Movies/x.MRC", "x"),
        ("stack.mrcs", "stack"),
        ("img.tiff", "img"),
        ("img.tif", "img"),
        ("C:\\data\\mic.mrc", "mic"),
    ],
)
def test_micrograph_name_strips_directories_and_known_extensions_only(given, expected):
    assert micrograph_name(given) == expected


def test_real_apoferritin_micrographs(data_dir):
    folder = data_dir / "empiar10146_apoferritin" / "micrographs"
    files = list_micrographs(folder)
    assert len(files) == 3
    assert [p.name for p in files] == sorted(p.name for p in folder.glob("*.mrc"))
    image = read_micrograph(files[0])
    # the crop is 320 wide and 256 high (as the full 1240 x 1200, width x height): 256 rows by 320 columns
    assert image.shape == (256, 320)
    assert image.dtype == np.uint16
    assert image.flags.writeable
    info = micrograph_info(files[0])
    assert info["shape"] == (256, 320) and info["dtype"] == np.uint16
    assert info["pixel_size"] == 0.0  # these headers carry no pixel size: 0 means unknown


def test_real_ribosome_stack_is_lazy_and_matches_single_reads(data_dir, count_reads):
    folder = data_dir / "empiar10028_ribosome" / "micrographs"
    stack = open_stack(folder)
    assert count_reads == []  # headers only
    assert stack.shape == (3, 256, 256) and stack.data.dtype == np.float32
    assert stack.data.chunksize == (1, 256, 256)
    assert stack.names[:2] == ["061_10028", "062_10028"] and len(stack.names) == 3
    assert stack.data_range is not None and stack.data_range[0] < stack.data_range[1]
    plane = np.asarray(stack.data[2])
    assert len(count_reads) == 1 and count_reads[0][0].endswith("063_10028.mrc")
    np.testing.assert_array_equal(plane, read_micrograph(stack.paths[2]))


def test_synthetic_round_trip_and_pixel_size(synthetic_dir):
    syn = synthetic_dir["set"]
    paths = list_micrographs(synthetic_dir["folder"])
    assert [micrograph_name(p) for p in paths] == syn.names
    for path, image in zip(paths, syn.micrographs):
        np.testing.assert_array_equal(read_micrograph(path), image)
    info = micrograph_info(paths[0])
    assert info == {"shape": (128, 160), "dtype": np.dtype(np.float32), "pixel_size": 1.5, "n_sections": 1}
    stack = open_stack([str(p) for p in reversed(paths)])  # any order in, sorted out
    assert stack.names == syn.names and stack.pixel_size == 1.5
    np.testing.assert_array_equal(stack.data[1:3].compute(), np.stack(syn.micrographs[1:3]))
    np.testing.assert_array_equal(stack.read(2), syn.micrographs[2])


def test_pixel_size_is_rounded(tmp_path):
    path = _write_mrc(tmp_path / "a.mrc", np.zeros((8, 12), np.float32), voxel_size=1.06)
    assert micrograph_info(path)["pixel_size"] == 1.06  # stored as float32 1.0600001


def test_tiff_micrographs(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(20, 30)).astype(np.float32) for _ in range(2)]
    for i, image in enumerate(images):
        tifffile.imwrite(tmp_path / f"m{i}.tif", image)
    np.testing.assert_array_equal(read_micrograph(tmp_path / "m1.tif"), images[1])
    assert micrograph_info(tmp_path / "m0.tif")["shape"] == (20, 30)
    stack = open_stack(tmp_path)
    assert stack.names == ["m0", "m1"]
    np.testing.assert_array_equal(stack.data.compute(), np.stack(images))


def test_mrcs_stack_refused_by_read_micrograph_and_expanded_by_open_stack(tmp_path):
    data = np.arange(3 * 6 * 5, dtype=np.float32).reshape(3, 6, 5)
    path = _write_mrc(tmp_path / "several.mrcs", data, stack=True)
    with pytest.raises(MicrographError, match=r"several\.mrcs.*stack of 3.*open_stack"):
        read_micrograph(path)
    assert micrograph_info(path)["shape"] == (3, 6, 5)
    stack = open_stack(path)
    assert stack.names == ["several_0", "several_1", "several_2"]
    assert stack.sections == [0, 1, 2]
    np.testing.assert_array_equal(stack.data[2].compute(), data[2])


def test_multipage_tiff_is_a_stack(tmp_path):
    data = np.random.default_rng(1).integers(0, 1000, (2, 10, 12)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "pages.tif", data)
    with pytest.raises(MicrographError, match="open_stack"):
        read_micrograph(tmp_path / "pages.tif")
    np.testing.assert_array_equal(open_stack(tmp_path / "pages.tif").data.compute(), data)


def test_list_micrographs_filters_sorts_and_complains(tmp_path):
    for name in ["b.mrc", "a.MRC", "c.tiff", "notes.txt", ".hidden.mrc"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_micrographs(tmp_path)] == ["a.MRC", "b.mrc", "c.tiff"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MicrographError, match=r"empty: no micrographs in this folder"):
        list_micrographs(empty)
    with pytest.raises(MicrographError, match=r"missing\.mrc: no such file"):
        list_micrographs([tmp_path / "missing.mrc"])
    with pytest.raises(MicrographError, match=r"notes\.txt: not a micrograph file"):
        list_micrographs([tmp_path / "notes.txt"])


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_non_mrc_file(tmp_path):
    path = tmp_path / "holiday.mrc"
    path.write_text("this is a text file, not a micrograph\n" * 50)
    with pytest.raises(MicrographError, match=r"holiday\.mrc: not an MRC file"):
        read_micrograph(path)
    with pytest.raises(MicrographError, match=r"holiday\.mrc: not an MRC file"):
        micrograph_info(path)
    short = tmp_path / "short.mrc"
    short.write_bytes(b"abc")
    with pytest.raises(MicrographError, match=r"short\.mrc: not an MRC file"):
        read_micrograph(short)


def test_truncated_mrc(tmp_path):
    path = _write_mrc(tmp_path / "cut.mrc", np.ones((64, 80), np.float32))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(MicrographError, match=r"cut\.mrc: truncated MRC file.*64 x 80"):
        read_micrograph(path)
    # open_stack checks sizes from the headers too, before any pixel is read
    with pytest.raises(MicrographError, match="truncated"):
        open_stack(tmp_path)


def test_3d_mrc_where_2d_expected(tmp_path):
    path = _write_mrc(tmp_path / "volume.mrc", np.zeros((4, 16, 16), np.float32))
    with pytest.raises(MicrographError, match=r"volume\.mrc: 3-D data \(4 x 16 x 16\), expected a 2-D micrograph"):
        read_micrograph(path)
    with pytest.raises(MicrographError, match="3-D data"):
        open_stack(path)


def test_nan_pixels_are_counted(tmp_path):
    image = np.zeros((10, 10), np.float32)
    image[2, 3] = np.nan
    image[5, 5] = np.inf
    path = _write_mrc(tmp_path / "bad.mrc", image)
    with pytest.raises(MicrographError, match=r"bad\.mrc: 2 of 100 pixels are NaN or infinite"):
        read_micrograph(path)


def test_nan_pixels_in_a_stack_raise_when_the_plane_is_read(tmp_path):
    _write_mrc(tmp_path / "a_good.mrc", np.zeros((10, 10), np.float32))
    image = np.zeros((10, 10), np.float32)
    image[0, :4] = np.nan
    _write_mrc(tmp_path / "b_bad.mrc", image)
    stack = open_stack(tmp_path)  # lazy: opening succeeds
    assert stack.data[0].compute().sum() == 0
    with pytest.raises(MicrographError, match=r"b_bad\.mrc: 4 of 100 pixels are NaN"):
        stack.data[1].compute()


def test_differing_shapes_are_listed(tmp_path):
    for name in ["a", "b", "c"]:
        _write_mrc(tmp_path / f"{name}.mrc", np.zeros((32, 32), np.float32))
    _write_mrc(tmp_path / "odd.mrc", np.zeros((32, 48), np.float32))
    with pytest.raises(MicrographError) as info:
        open_stack(tmp_path)
    msg = str(info.value)
    assert "differ in size" in msg
    assert "32 x 32 (3 files: a.mrc, b.mrc, c.mrc)" in msg
    assert "32 x 48 (1 file: odd.mrc)" in msg


def test_mixed_dtypes_stack_to_a_common_dtype(tmp_path):
    _write_mrc(tmp_path / "a.mrc", np.full((4, 4), 7, np.int16))
    _write_mrc(tmp_path / "b.mrc", np.full((4, 4), 0.5, np.float32))
    stack = open_stack(tmp_path)
    assert stack.data.dtype == np.float32
    np.testing.assert_array_equal(stack.data.compute()[:, 0, 0], [7.0, 0.5])


def test_write_micrograph_round_trip_and_atomic(tmp_path, monkeypatch):
    image = np.arange(12 * 10, dtype=np.float64).reshape(12, 10) / 7.0
    path = write_micrograph(tmp_path / "m.mrc", image, pixel_size=1.5)
    back = read_micrograph(path)
    assert back.dtype == np.float32 and back.shape == (12, 10)
    np.testing.assert_allclose(back, image.astype(np.float32))
    assert micrograph_info(path)["pixel_size"] == pytest.approx(1.5)
    # a failed write leaves the existing file as it was and no temporary file behind
    with pytest.raises(MicrographError, match="2-D"):
        write_micrograph(path, np.zeros((2, 3, 4)))
    np.testing.assert_array_equal(read_micrograph(path), back)

    def broken(self, data):
        raise OSError("disk full")

    monkeypatch.setattr(mrcfile.mrcfile.MrcFile, "set_data", broken)
    with pytest.raises(OSError, match="disk full"):
        write_micrograph(path, np.ones((4, 4)))
    monkeypatch.undo()
    np.testing.assert_array_equal(read_micrograph(path), back)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mrc"]


# ----------------------------------------------------------------------------------------------------------------
# PNG and JPEG (8-bit picking sets)
# ----------------------------------------------------------------------------------------------------------------


def test_png_micrographs_8_and_16_bit(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    grey8 = rng.integers(0, 256, (24, 36)).astype(np.uint8)
    grey16 = rng.integers(0, 65536, (24, 36)).astype(np.uint16)
    Image.fromarray(grey8).save(tmp_path / "a.png")
    Image.fromarray(grey16).save(tmp_path / "b.png")
    assert micrograph_info(tmp_path / "a.png") == {"shape": (24, 36), "dtype": np.dtype(np.float32),
                                                   "pixel_size": 0.0, "n_sections": 1}
    image = read_micrograph(tmp_path / "a.png")
    assert image.dtype == np.float32  # grey levels as numbers, like the float32 MRC files pipelines write
    np.testing.assert_array_equal(image, grey8)
    np.testing.assert_array_equal(read_micrograph(tmp_path / "b.png"), grey16)
    stack = open_stack(tmp_path)
    assert stack.names == ["a", "b"] and stack.shape == (2, 24, 36)
    np.testing.assert_array_equal(stack.data[0].compute(), grey8)


def test_jpeg_and_grey_rgb_read_as_one_channel(tmp_path):
    from PIL import Image

    grey = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (30, 1))
    Image.fromarray(grey).save(tmp_path / "g.jpg", quality=95)
    Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(tmp_path / "rgb.png")
    jpg = read_micrograph(tmp_path / "g.jpg")
    assert jpg.shape == (30, 40) and jpg.dtype == np.float32
    assert np.abs(jpg - grey).max() <= 3  # lossy, but the same picture
    np.testing.assert_array_equal(read_micrograph(tmp_path / "rgb.png"), grey)
    assert [p.name for p in list_micrographs(tmp_path)] == ["g.jpg", "rgb.png"]
    assert micrograph_name(tmp_path / "x.JPEG") == "x"


def test_bad_png_and_jpeg_files_are_named(tmp_path):
    from PIL import Image

    colour = np.zeros((10, 10, 3), np.uint8)
    colour[..., 0] = 200
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(MicrographError, match=r"colour\.png: a colour image"):
        read_micrograph(tmp_path / "colour.png")
    (tmp_path / "text.jpg").write_text("not a picture")
    with pytest.raises(MicrographError, match=r"text\.jpg: not a readable JPEG file"):
        read_micrograph(tmp_path / "text.jpg")
    Image.fromarray(np.zeros((8, 8), bool)).save(tmp_path / "bits.png")
    with pytest.raises(MicrographError, match=r"bits\.png: image mode '1'"):
        micrograph_info(tmp_path / "bits.png")
    full = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64)).astype(np.uint8)).save(full)
    (tmp_path / "cut.png").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(MicrographError, match=r"cut\.png: cannot read the pixels"):
        read_micrograph(tmp_path / "cut.png")
