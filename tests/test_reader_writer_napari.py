"""npe2 contributions: readers, writers and sample data, through napari (ViewerModel without Qt, and a Qt viewer)."""

from __future__ import annotations

import subprocess
import sys

import mrcfile
import numpy as np
import pandas as pd
import pytest

from napari_pupick._reader import (
    get_coordinate_reader,
    get_micrograph_reader,
    points_layer_data,
    read_micrographs,
    read_points,
)
from napari_pupick._writer import points_to_table, write_points_per_micrograph
from napari_pupick.errors import CoordinateError, MicrographError
from napari_pupick.io import mrc as mrc_module
from napari_pupick.io import read_coordinates, write_coordinates

PLUGIN = "napari-pupick"


@pytest.fixture
def viewer_model(pupick_plugin):
    from napari.components import ViewerModel

    return ViewerModel()


def _planes(table, names):
    index = {n: i for i, n in enumerate(names)}
    return table["micrograph"].map(index).to_numpy()


def test_reader_claims(tmp_path, synthetic_dir):
    folder = synthetic_dir["folder"]
    one = str(synthetic_dir["micrographs"][0])
    assert get_micrograph_reader(one) is read_micrographs
    assert get_micrograph_reader([one, str(synthetic_dir["micrographs"][1])]) is read_micrographs
    assert get_micrograph_reader(str(folder)) is read_micrographs
    assert get_micrograph_reader(str(synthetic_dir["labels"])) is None
    assert get_coordinate_reader(str(synthetic_dir["labels"])) is read_points
    assert get_coordinate_reader(str(folder)) is None  # a micrograph folder belongs to the micrograph reader
    (tmp_path / "per").mkdir()
    (tmp_path / "per" / "a.star").write_text("")
    assert get_coordinate_reader(str(tmp_path / "per")) is read_points
    assert get_micrograph_reader(str(tmp_path / "per")) is None
    assert get_micrograph_reader(str(tmp_path / "x.png")) is read_micrographs  # 8-bit picking sets
    assert get_micrograph_reader(str(tmp_path / "x.gif")) is None


def test_open_one_micrograph(viewer_model, synthetic_dir):
    path = synthetic_dir["micrographs"][1]
    [layer] = viewer_model.open(path, plugin=PLUGIN)
    assert layer.name == "synth_1"
    assert isinstance(layer.data, np.ndarray) and layer.data.shape == (128, 160)
    np.testing.assert_array_equal(layer.data, synthetic_dir["set"].micrographs[1])
    assert layer.metadata["micrograph_names"] == ["synth_1"]
    assert layer.metadata["pixel_size"] == 1.5


def test_open_folder_as_lazy_stack(viewer_model, synthetic_dir, monkeypatch):
    reads = []
    real = mrc_module._load_plane
    monkeypatch.setattr(mrc_module, "_load_plane", lambda *a, **k: reads.append(a) or real(*a, **k))
    layer_data = read_micrographs(str(synthetic_dir["folder"]))
    assert reads == []  # producing layer data reads headers only
    data, kwargs, kind = layer_data[0]
    assert kind == "image" and data.shape == (3, 128, 160) and type(data).__name__ == "Array"
    assert kwargs["name"] == "micrographs"
    assert kwargs["metadata"]["micrograph_names"] == ["synth_0", "synth_1", "synth_2"]
    assert kwargs["metadata"]["pixel_size"] == 1.5
    assert [p.endswith(".mrc") for p in kwargs["metadata"]["paths"]] == [True] * 3
    [layer] = viewer_model.open(synthetic_dir["folder"], plugin=PLUGIN)
    assert layer.data.shape == (3, 128, 160)
    np.testing.assert_array_equal(np.asarray(layer.data[2]), synthetic_dir["set"].micrographs[2])


def test_open_real_folder_and_coordinates(viewer_model, data_dir):
    folder = data_dir / "empiar10146_apoferritin"
    [stack] = viewer_model.open(folder / "micrographs", plugin=PLUGIN)
    assert stack.data.shape == (3, 256, 320) and stack.data.dtype == np.uint16
    # no Qt viewer here: napari.current_viewer() is None, so place the points with the layer explicitly
    table = read_coordinates(folder / "particles.txt")
    data, kwargs, kind = points_layer_data(table, [stack], source=folder / "particles.txt")
    assert kind == "points" and data.shape == (26, 3)
    np.testing.assert_array_equal(data[:, 0], _planes(table, stack.metadata["micrograph_names"]))
    np.testing.assert_array_equal(data[:, 1:], table[["y", "x"]].to_numpy())


def test_open_png_folder_and_jpeg_file(viewer_model, synthetic_dir, tmp_path):
    from PIL import Image

    grey = [np.round(np.clip(m * 40 + 128, 0, 255)).astype(np.uint8) for m in synthetic_dir["set"].micrographs]
    for name, image in zip(synthetic_dir["set"].names, grey):
        Image.fromarray(image).save(tmp_path / f"{name}.png")
    [layer] = viewer_model.open(tmp_path, plugin=PLUGIN)
    assert layer.data.shape == (3, 128, 160) and layer.data.dtype == np.float32
    assert layer.metadata["micrograph_names"] == synthetic_dir["set"].names
    np.testing.assert_array_equal(np.asarray(layer.data[1]), grey[1])
    Image.fromarray(grey[2]).save(tmp_path / "one.jpg", quality=95)
    [jpg] = viewer_model.open(tmp_path / "one.jpg", plugin=PLUGIN)
    assert jpg.data.shape == (128, 160) and jpg.data.dtype == np.float32
    assert np.abs(np.asarray(jpg.data) - grey[2]).mean() < 2  # lossy, the same picture


def test_points_land_on_the_right_planes_downsampled(viewer_model, synthetic_dir):
    [stack] = viewer_model.open(synthetic_dir["folder"], plugin=PLUGIN)
    stack.metadata["downsample"] = 2
    table = read_coordinates(synthetic_dir["particles"])
    data, kwargs, _ = points_layer_data(table, [stack], source=synthetic_dir["particles"])
    np.testing.assert_array_equal(data[:, 0], _planes(table, synthetic_dir["set"].names))
    np.testing.assert_allclose(data[:, 1:], table[["y", "x"]].to_numpy() / 2)
    assert kwargs["metadata"]["downsample"] == 2.0
    assert kwargs["metadata"]["micrograph_names"] == synthetic_dir["set"].names
    assert list(kwargs["features"].columns) == ["score", "micrograph"]
    layer = viewer_model.add_points(data, **kwargs)
    # the writer's helper undoes the binning: back to original micrograph pixels
    back = points_to_table(layer.data, {"name": layer.name, "metadata": layer.metadata}, layer.features)
    np.testing.assert_allclose(back[["x", "y"]].to_numpy(), table[["x", "y"]].to_numpy())
    assert list(back.micrograph) == list(table.micrograph)


def test_points_on_a_single_image_and_partial_matches(viewer_model, synthetic_dir):
    [image] = viewer_model.open(synthetic_dir["micrographs"][0], plugin=PLUGIN)
    table = read_coordinates(synthetic_dir["particles"])
    with pytest.warns(UserWarning, match="left out"):
        data, kwargs, _ = points_layer_data(table, [image], source="particles.star")
    mine = table[table.micrograph == "synth_0"]
    assert data.shape == (len(mine), 2)
    np.testing.assert_array_equal(data, mine[["y", "x"]].to_numpy())
    # without any micrograph layer: one micrograph gives (y, x), several give (plane, y, x)
    data, _, _ = points_layer_data(mine, [], source="x.star")
    assert data.shape == (len(mine), 2)
    data, kwargs, _ = points_layer_data(table, [], source="x.star")
    assert data.shape == (len(table), 3) and kwargs["metadata"]["micrograph_names"] == ["synth_0", "synth_1",
                                                                                          "synth_2"]


def test_coordinate_errors_against_the_open_stack(viewer_model, synthetic_dir):
    [stack] = viewer_model.open(synthetic_dir["folder"], plugin=PLUGIN)
    other = pd.DataFrame({"micrograph": ["elsewhere"], "x": [1.0], "y": [1.0], "score": [0.0]})
    with pytest.raises(CoordinateError, match=r"other\.star: 1 point\(s\) on micrographs that are not open: "
                                              r"elsewhere.*synth_0"):
        points_layer_data(other, [stack], source="other.star")
    outside = pd.DataFrame({"micrograph": ["synth_1"], "x": [500.0], "y": [1.0], "score": [0.0]})
    with pytest.raises(CoordinateError, match=r"far\.star: 1 point\(s\) fall outside.*synth_1 \(128 x 160"):
        points_layer_data(outside, [stack], source="far.star")


@pytest.mark.parametrize("ext", [".star", ".csv", ".txt", ".box"])
def test_writers_through_npe2(tmp_path, pupick_plugin, ext):
    from napari.layers import Points
    from napari.plugins.io import save_layers

    names = ["mic_a", "mic_b"]
    table = pd.DataFrame({"micrograph": ["mic_a", "mic_b", "mic_b"], "x": [10.0, 20.5, 30.0],
                          "y": [5.0, 6.0, 7.25], "score": [1.5, -2.0, 0.25]})
    if ext == ".box":  # one micrograph per box file
        table = table[table.micrograph == "mic_b"].reset_index(drop=True)
    data = np.column_stack([_planes(table, names), table.y / 2, table.x / 2])
    layer = Points(data, name="picks", features=table[["score"]],
                   metadata={"micrograph_names": names, "downsample": 2, "radius": 8})
    # a .box file has no name column: its file name says which micrograph it holds
    path = tmp_path / ("mic_b.box" if ext == ".box" else f"out{ext}")
    written = save_layers(str(path), [layer], plugin=PLUGIN)
    assert written == [str(path)]
    back = read_coordinates(path)
    assert list(back.micrograph) == list(table.micrograph)
    np.testing.assert_allclose(back[["x", "y", "score"]].to_numpy(), table[["x", "y", "score"]].to_numpy(),
                               atol=1e-6)
    if ext == ".csv":  # ours, not napari's built-in points CSV (index, axis-0, ...)
        assert path.read_text().startswith("micrograph,x,y,score")
    if ext == ".box":  # box = 2 x radius
        assert path.read_text().split("\t")[2] == "16"


def test_points_to_table_names_and_errors():
    feats = pd.DataFrame({"score": [1.0, 2.0], "micrograph": ["f1", "f2"]})
    t = points_to_table(np.array([[1.0, 2.0], [3.0, 4.0]]), {"name": "layer", "metadata": {}}, feats)
    assert list(t.micrograph) == ["f1", "f2"] and list(t.x) == [2.0, 4.0] and list(t.score) == [1.0, 2.0]
    t = points_to_table(np.array([[1.0, 2.0]]), {"name": "mic_z", "metadata": {}})
    assert list(t.micrograph) == ["mic_z"] and t.score.isna().all()
    with pytest.raises(CoordinateError, match=r"layer: points on a stack but no micrograph names"):
        points_to_table(np.array([[0.0, 1.0, 2.0]]), {"name": "layer", "metadata": {}})
    with pytest.raises(CoordinateError, match=r"1 point\(s\) on planes outside 0\.\.1"):
        points_to_table(np.array([[5.0, 1.0, 2.0]]), {"name": "l", "metadata": {"micrograph_names": ["a", "b"]}})


def test_write_points_per_micrograph(tmp_path):
    data = np.array([[0, 10.0, 20.0], [1, 30.0, 40.0], [1, 50.0, 60.0]])
    meta = {"name": "picks", "metadata": {"micrograph_names": ["m0", "m1"]},
            "features": pd.DataFrame({"score": [0.1, 0.2, 0.3]})}
    written = write_points_per_micrograph(tmp_path / "relion", data, meta, suffix="_autopick")
    assert sorted(p.rsplit("/", 1)[-1] for p in written) == ["m0_autopick.star", "m1_autopick.star"]
    back = read_coordinates(tmp_path / "relion")
    assert sorted(back.micrograph) == ["m0", "m1", "m1"]
    np.testing.assert_allclose(back.sort_values("x")[["x", "y", "score"]].to_numpy(),
                               [[20, 10, 0.1], [40, 30, 0.2], [60, 50, 0.3]], atol=1e-6)


def test_sample_data_through_npe2(viewer_model):
    layers = viewer_model.open_sample(PLUGIN, "synthetic")
    image, positives, truth = layers
    assert image.data.shape == (4, 512, 512)
    names = image.metadata["micrograph_names"]
    assert len(names) == 4 and image.metadata["pixel_size"] > 0
    assert positives.name == "positives" and positives.data.shape[1] == 3 and len(positives.data) > 0
    assert positives.metadata["micrograph_names"] == names and positives.metadata["radius"] == 12.0
    assert np.all(positives.size == 24.0)
    assert truth.name == "ground truth" and not truth.visible and len(truth.data) > len(positives.data)


def test_bad_files_raise_clean_errors_in_the_model(viewer_model, tmp_path):
    bad = tmp_path / "bad.mrc"
    bad.write_text("not an mrc\n" * 200)
    with pytest.raises(MicrographError, match=r"bad\.mrc: not an MRC file"):
        viewer_model.open(bad, plugin=PLUGIN)
    star = tmp_path / "ctf.star"
    star.write_text("data_\n\nloop_\n_rlnMicrographName #1\n_rlnDefocusU #2\na.mrc 1\n")
    with pytest.raises(CoordinateError, match="rlnCoordinateX"):
        viewer_model.open(star, plugin=PLUGIN)
    assert len(viewer_model.layers) == 0


# ---------------------------------------------------------------------------------------------------------------
# A real Qt viewer (pytest-qt + pytest-xvfb): the coordinate reader finds the open stack by itself.
# ---------------------------------------------------------------------------------------------------------------


def test_qt_viewer_stack_then_coordinates_then_bad_file(make_napari_viewer, synthetic_dir, tmp_path):
    viewer = make_napari_viewer()
    [stack] = viewer.open(synthetic_dir["folder"], plugin=PLUGIN)
    assert stack.data.shape == (3, 128, 160)
    [points] = viewer.open(synthetic_dir["particles"], plugin=PLUGIN)
    table = read_coordinates(synthetic_dir["particles"])
    assert points.data.shape == (len(table), 3)
    np.testing.assert_array_equal(points.data[:, 0], _planes(table, stack.metadata["micrograph_names"]))
    np.testing.assert_allclose(points.data[:, 1:], table[["y", "x"]].to_numpy())
    assert points.name == "particles" and points.metadata["source"] == str(synthetic_dir["particles"])
    assert list(points.features["micrograph"]) == list(table.micrograph)

    # bad input: a clean error, and the viewer keeps working
    bad = tmp_path / "broken.mrc"
    with mrcfile.new(bad) as m:
        m.set_data(np.zeros((64, 64), np.float32))
    bad.write_bytes(bad.read_bytes()[:-1000])
    with pytest.raises(MicrographError, match="truncated"):
        viewer.open(bad, plugin=PLUGIN)
    elsewhere = tmp_path / "elsewhere.csv"
    write_coordinates(pd.DataFrame({"micrograph": ["nothing_open"], "x": [1.0], "y": [2.0]}), elsewhere)
    with pytest.raises(CoordinateError, match="nothing_open"):
        viewer.open(elsewhere, plugin=PLUGIN)
    assert [layer.name for layer in viewer.layers] == ["micrographs", "particles"]
    viewer.dims.set_current_step(0, 2)
    [single] = viewer.open(synthetic_dir["micrographs"][0], plugin=PLUGIN)
    assert single.data.shape == (128, 160) and len(viewer.layers) == 3


def test_importing_the_plugin_does_not_import_torch():
    code = (
        "import sys\n"
        "import napari_pupick, napari_pupick._reader, napari_pupick._writer, napari_pupick._sample_data\n"
        "import napari_pupick.io, napari_pupick.synthetic\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
