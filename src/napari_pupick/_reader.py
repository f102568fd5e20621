"""npe2 reader contributions: micrographs -> Image layers, coordinate files -> Points layers.

Thin wrappers over :mod:`napari_pupick.io`. Errors (bad files, unknown micrograph names, points outside the
image) are raised as :class:`~napari_pupick.errors.PupickError` subclasses; napari reports them to the user.

Layer conventions (shared with the writers and the widgets)
-----------------------------------------------------------
- Micrograph Image layers hold one micrograph (H, W) or a stack (N, H, W), in pixels, with metadata
  ``micrograph_names`` (one per plane), ``pixel_size`` (Angstrom, 0.0 = unknown) and ``paths``. A binned
  (downsampled) image carries ``downsample`` = s in its metadata.
- Points layers hold (y, x) for one micrograph or (plane, y, x) for a stack, in the pixels of the image they sit
  on; their metadata carries ``micrograph_names`` (of the planes), ``downsample`` (s; coordinates in the
  original micrograph are s times the layer's), ``source`` (the file read); their features carry ``score`` and
  ``micrograph``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from napari_pupick.io.coords import FORMATS, match_micrographs, read_coordinates, validate_in_bounds
from napari_pupick.io.mrc import (
    MICROGRAPH_EXTENSIONS,
    micrograph_info,
    micrograph_name,
    open_stack,
    read_micrograph,
)

__all__ = [
    "COORDINATE_EXTENSIONS",
    "POINTS_STYLE",
    "get_coordinate_reader",
    "FOLDER_PATTERN",
    "get_micrograph_reader",
    "open_folders_with_pupick",
    "opens_folders",
    "points_layer_data",
    "read_micrographs",
    "read_points",
]

#: Extensions the coordinate reader claims.
COORDINATE_EXTENSIONS = tuple(e for exts in FORMATS.values() for e in exts)

#: Default look of pick layers: hollow yellow circles.
POINTS_STYLE = {
    "face_color": "transparent",
    "border_color": "#ffd200",
    "border_width": 0.12,
    "border_width_is_relative": True,
    "symbol": "o",
}
DEFAULT_POINT_SIZE = 20.0


#: napari's reader preference pattern that matches every folder (napari tests ``<real path>/`` against it).
FOLDER_PATTERN = "*" + os.sep


def open_folders_with_pupick(enable: bool = True) -> None:
    """Make napari open folders (File > Open Folder, ``viewer.open(folder)``) with this plugin, without the "Choose
    reader" dialog (``enable=False``: undo that).

    napari offers its builtin reader for every folder too, so without a preference it asks each time and
    preselects its own, which cannot read MRC files. This stores the preference in napari's settings
    (``plugins.extension2reader``, as the dialog's "Remember this choice" does, but for every folder). A folder
    this plugin cannot read (no micrographs, no coordinate files) then shows napari's dialog with the others.
    """
    from napari.settings import get_settings

    plugins = get_settings().plugins
    prefs = dict(plugins.extension2reader)
    if enable:
        prefs[FOLDER_PATTERN] = "napari-pupick"
    elif prefs.get(FOLDER_PATTERN) == "napari-pupick":
        del prefs[FOLDER_PATTERN]
    plugins.extension2reader = prefs


def opens_folders() -> bool:
    """Whether napari opens folders with this plugin (see :func:`open_folders_with_pupick`)."""
    from napari.settings import get_settings

    return get_settings().plugins.extension2reader.get(FOLDER_PATTERN) == "napari-pupick"


def _as_list(path) -> list[str]:
    if isinstance(path, (str, os.PathLike)):
        return [os.fspath(path)]
    return [os.fspath(p) for p in path]


def _folder_has(folder: str, extensions) -> bool:
    try:
        with os.scandir(folder) as it:
            return any(
                e.is_file() and not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in extensions
                for e in it
            )
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------------------
# Micrographs
# ----------------------------------------------------------------------------------------------------------------


def get_micrograph_reader(path):
    """Return :func:`read_micrographs` if ``path`` is micrograph files or a folder holding some, else None.

    ``path`` is a str or a list of str: ``.mrc``, ``.mrcs``, ``.tif``, ``.tiff``, ``.png``, ``.jpg``, ``.jpeg``
    files, or one folder.
    """
    paths = _as_list(path)
    if not paths:
        return None
    if len(paths) == 1 and os.path.isdir(paths[0]):
        return read_micrographs if _folder_has(paths[0], MICROGRAPH_EXTENSIONS) else None
    if all(os.path.splitext(p)[1].lower() in MICROGRAPH_EXTENSIONS for p in paths):
        return read_micrographs
    return None


def read_micrographs(path) -> list:
    """Read micrographs as one Image layer.

    Parameters
    ----------
    path : str or list of str
        One file: a 2-D micrograph read into memory (an ``.mrcs`` with several sections becomes a lazy stack).
        A folder or several files: one lazy dask stack (N, H, W) named after the folder; only headers are read.

    Returns
    -------
    list of LayerData
        ``[(data, kwargs, "image")]`` with metadata ``micrograph_names``, ``pixel_size``, ``paths``.
    """
    paths = _as_list(path)
    info = micrograph_info(paths[0]) if len(paths) == 1 and not os.path.isdir(paths[0]) else None
    if info is not None and info["n_sections"] == 1:
        data = read_micrograph(paths[0])
        names, files, pixel_size, data_range = [micrograph_name(paths[0])], [paths[0]], info["pixel_size"], None
        name = names[0]
    else:
        stack = open_stack(paths if len(paths) > 1 else paths[0])
        data, names, pixel_size, data_range = stack.data, stack.names, stack.pixel_size, stack.data_range
        files = [str(p) for p in stack.paths]
        if len(paths) == 1 and os.path.isdir(paths[0]):
            name = Path(paths[0]).resolve().name
        elif len(paths) == 1:
            name = micrograph_name(paths[0])
        else:
            parents = {str(Path(p).resolve().parent) for p in paths}
            name = Path(parents.pop()).name if len(parents) == 1 else "micrographs"
    kwargs = {
        "name": name,
        "colormap": "gray",
        "metadata": {"micrograph_names": list(names), "pixel_size": float(pixel_size), "paths": files},
    }
    if data_range is not None:
        # From the headers: saves napari from reading pixels to find the range of a lazy stack.
        kwargs["contrast_limits"] = [float(data_range[0]), float(data_range[1])]
    return [(data, kwargs, "image")]


# ----------------------------------------------------------------------------------------------------------------
# Coordinates
# ----------------------------------------------------------------------------------------------------------------


def get_coordinate_reader(path):
    """Return :func:`read_points` for coordinate files (.star .csv .txt .tsv .box), or a folder holding some
    and no micrographs (a folder of per-micrograph files); else None."""
    paths = _as_list(path)
    if not paths:
        return None
    if len(paths) == 1 and os.path.isdir(paths[0]):
        folder = paths[0]
        if _folder_has(folder, COORDINATE_EXTENSIONS) and not _folder_has(folder, MICROGRAPH_EXTENSIONS):
            return read_points
        return None
    if all(os.path.splitext(p)[1].lower() in COORDINATE_EXTENSIONS for p in paths):
        return read_points
    return None


def _viewer_layers() -> list:
    """Layers of the current napari viewer, or [] when there is none (headless use, no Qt)."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # no Qt, no application: read as if no viewer were open
        return []
    return list(viewer.layers) if viewer is not None else []


def read_points(path) -> list:
    """Read coordinate files as Points layers, placed on the matching planes of an open micrograph layer.

    The target is looked up in the current napari viewer (``napari.current_viewer()``): the Image layer with
    ``micrograph_names`` metadata that matches the most points. See :func:`points_layer_data`.
    """
    layers = _viewer_layers()
    out = []
    for p in _as_list(path):
        table = read_coordinates(p)
        out.append(points_layer_data(table, layers, source=p))
    return out


def _micrograph_layers(layers) -> list:
    found = []
    for layer in layers:
        meta = getattr(layer, "metadata", None) or {}
        data = getattr(layer, "data", None)
        if meta.get("micrograph_names") and getattr(data, "ndim", 0) in (2, 3) and not _is_points(layer):
            found.append(layer)
    return found


def _is_points(layer) -> bool:
    return type(layer).__name__ == "Points" or getattr(layer, "_type_string", "") == "points"


def points_layer_data(table: pd.DataFrame, layers=(), source=None, name: str | None = None) -> tuple:
    """Turn a pick table into Points LayerData that lands on the right micrograph.

    Parameters
    ----------
    table : DataFrame
        Pick table (``micrograph, x, y, score``), original micrograph pixels.
    layers : sequence of napari layers
        Candidates: Image layers whose metadata has ``micrograph_names`` (one per plane for (N, H, W) data, one
        for (H, W) data). The one matching the most points wins (the topmost among equals).
    source : str or Path, optional
        The file read (layer name and metadata ``source``; named in errors).
    name : str, optional
        Layer name (default: the file's stem).

    Returns
    -------
    LayerData
        ``(data, kwargs, "points")``: data (n, 3) as (plane, y, x) on a stack, (n, 2) as (y, x) on one image,
        divided by the target's ``downsample`` factor. Without a target, one micrograph gives (y, x) and several
        give (plane, y, x) with planes in sorted name order.

    Raises
    ------
    CoordinateError
        If no point matches the target's micrographs, or points fall outside their micrograph. Points of other
        micrographs than the target's are dropped with a warning.
    """
    candidates = _micrograph_layers(layers)
    target, best = None, -1
    for layer in reversed(candidates):
        n = int(table["micrograph"].isin(list(layer.metadata["micrograph_names"])).sum())
        if n > best:
            target, best = layer, n
    meta: dict = {"source": None if source is None else str(source)}
    radius = None
    if target is not None:
        names = [str(n) for n in target.metadata["micrograph_names"]]
        s = float(target.metadata.get("downsample", 1) or 1)
        stack = target.data.ndim == 3
        plane = match_micrographs(table, names, source, allow_partial=True)
        keep = plane >= 0
        if not keep.all():
            dropped = sorted(set(table.loc[~keep, "micrograph"]))
            warnings.warn(
                f"{source}: {int((~keep).sum())} point(s) on micrographs not in layer {target.name!r} were left "
                f"out ({', '.join(dropped[:5])}{' ...' if len(dropped) > 5 else ''})",
                stacklevel=2,
            )
        table, plane = table[keep].reset_index(drop=True), plane[keep]
        h, w = target.data.shape[-2:]
        slack = 0 if s == 1 else 1  # binned shapes are floored
        scaled = table.assign(x=table["x"] / s, y=table["y"] / s)
        validate_in_bounds(scaled, {n: (h + slack, w + slack) for n in names}, source)
        meta["pixel_size"] = float(target.metadata.get("pixel_size", 0.0) or 0.0)
        radius = target.metadata.get("radius")
    else:
        names = list(pd.unique(table["micrograph"])) if len(table) else []
        names = sorted(names)
        s, stack = 1.0, len(names) > 1
        plane = match_micrographs(table, names, source) if len(table) else np.zeros(0, int)
    y, x = table["y"].to_numpy(float) / s, table["x"].to_numpy(float) / s
    data = np.column_stack([plane.astype(float), y, x]) if stack else np.column_stack([y, x])
    data = data.reshape(-1, 3 if stack else 2)
    meta.update({"micrograph_names": names, "downsample": s})
    if radius:
        meta["radius"] = float(radius)
    size = 2 * float(radius) / s if radius else DEFAULT_POINT_SIZE
    features = pd.DataFrame({"score": table["score"].to_numpy(float), "micrograph": table["micrograph"].astype(str)})
    kwargs = {
        "name": name or (Path(source).stem if source is not None else "picks"),
        "ndim": data.shape[1],
        "features": features,
        "size": size,
        "metadata": meta,
        **POINTS_STYLE,
    }
    return (data, kwargs, "points")
