"""npe2 writer contributions: Points layers -> RELION STAR, CSV, Topaz and EMAN box coordinate files.

Every writer writes *all* points of the layer (filtering by score is the widgets' job), in original micrograph
pixels: layer coordinates are multiplied by the layer metadata's ``downsample`` factor. Writes are atomic (see
:func:`napari_pupick.io.coords.write_coordinates`).

npe2 single-layer writers are called as ``writer(path, data, meta)`` where ``data`` is the layer data and
``meta`` the layer state (``layer.as_layer_data_tuple()[1]``: keys ``name``, ``metadata``, ``features``,
``size``...). They return the list of paths written.

RELION's per-micrograph STAR files (one ``<micrograph>.star`` per micrograph in a folder) have no file extension
for napari to dispatch on, so they are not an npe2 writer: call :func:`write_points_per_micrograph` (the export
widget does).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from napari_pupick.errors import CoordinateError
from napari_pupick.io.coords import write_coordinates

__all__ = [
    "box_size_for",
    "points_to_table",
    "write_box",
    "write_csv",
    "write_points_per_micrograph",
    "write_star",
    "write_topaz",
]


def _layer_metadata(meta: dict) -> dict:
    return dict(meta.get("metadata") or {})


def points_to_table(data, meta: dict, features=None, micrograph_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Turn Points layer data into a pick table in original micrograph pixels.

    Parameters
    ----------
    data : array, shape (n, 2) or (n, 3)
        (y, x) on one micrograph, or (plane, y, x) on a stack, in layer pixels.
    meta : dict
        The layer state as npe2 writers receive it: ``metadata`` (with ``micrograph_names``, ``downsample``),
        ``name``, and optionally ``features``. A widget can pass ``{"name": layer.name, "metadata":
        layer.metadata}``.
    features : DataFrame, optional
        Per-point features (default ``meta["features"]``); its ``score`` column becomes the score (NaN if
        absent), its ``micrograph`` column is a fallback for names.
    micrograph_names : sequence of str, optional
        Micrograph of each plane; default ``meta["metadata"]["micrograph_names"]``.

    Returns
    -------
    DataFrame
        Columns ``micrograph, x, y, score``; x = column, y = row, multiplied by the ``downsample`` factor.

    Notes
    -----
    Names: for (plane, y, x) data, ``micrograph_names[plane]``; without names, the ``micrograph`` feature.
    For (y, x) data: the single entry of ``micrograph_names``, else the ``micrograph`` feature, else the layer
    name.
    """
    layer_meta = _layer_metadata(meta)
    label = meta.get("name") or "points layer"
    data = np.asarray(data, dtype=float)
    if data.ndim != 2 or data.shape[1] not in (2, 3):
        raise CoordinateError(f"{label}: points of shape {data.shape}; expected (n, 2) as (y, x) or (n, 3) as "
                              "(plane, y, x)")
    n = len(data)
    if features is None:
        features = meta.get("features")
    features = pd.DataFrame(features) if features is not None else pd.DataFrame(index=range(n))
    if len(features) != n:
        features = pd.DataFrame(index=range(n))
    names = list(micrograph_names) if micrograph_names is not None else list(layer_meta.get("micrograph_names") or [])
    feature_names = features["micrograph"].astype(str).to_numpy() if "micrograph" in features else None
    if data.shape[1] == 3:
        plane = np.rint(data[:, 0]).astype(int)
        if names:
            bad = (plane < 0) | (plane >= len(names))
            if bad.any():
                raise CoordinateError(
                    f"{label}: {int(bad.sum())} point(s) on planes outside 0..{len(names) - 1} "
                    f"(the {len(names)} micrograph names in the layer metadata)"
                )
            micrograph = [str(names[p]) for p in plane]
        elif feature_names is not None:
            micrograph = list(feature_names)
        else:
            raise CoordinateError(
                f"{label}: points on a stack but no micrograph names: the layer metadata needs 'micrograph_names'"
            )
    elif len(names) == 1:
        micrograph = [str(names[0])] * n
    elif feature_names is not None:
        micrograph = list(feature_names)
    else:
        micrograph = [str(label)] * n
    s = float(layer_meta.get("downsample", 1) or 1)
    score = pd.to_numeric(features["score"], errors="coerce").to_numpy(float) if "score" in features else np.nan
    return pd.DataFrame({
        "micrograph": pd.Series(micrograph, dtype=str),
        "x": data[:, -1] * s,
        "y": data[:, -2] * s,
        "score": np.broadcast_to(score, (n,)).astype(float),
    })


def box_size_for(meta: dict) -> float:
    """Box side (original pixels) for EMAN files: metadata ``box_size``, else 2 x metadata ``radius``, else the
    points' displayed size (diameter, layer pixels) times ``downsample``."""
    layer_meta = _layer_metadata(meta)
    if layer_meta.get("box_size"):
        return float(layer_meta["box_size"])
    if layer_meta.get("radius"):
        return 2.0 * float(layer_meta["radius"])
    size = np.asarray(meta.get("size", 20.0), dtype=float)
    size = float(np.median(size)) if size.size else 20.0
    return size * float(layer_meta.get("downsample", 1) or 1)


def _write(path: str, data, meta: dict, fmt: str, **kwargs) -> list[str]:
    table = points_to_table(data, meta)
    written = write_coordinates(table, path, fmt, **kwargs)
    return [str(p) for p in (written if isinstance(written, list) else [written])]


def write_star(path: str, data, meta: dict) -> list[str]:
    """Write a Points layer as one RELION STAR file (all micrographs; ``rlnMicrographName`` = ``<name>.mrc``)."""
    return _write(path, data, meta, "star")


def write_csv(path: str, data, meta: dict) -> list[str]:
    """Write a Points layer as CSV with columns ``micrograph,x,y,score``."""
    return _write(path, data, meta, "csv")


def write_topaz(path: str, data, meta: dict) -> list[str]:
    """Write a Points layer as a Topaz tab-separated file (``image_name x_coord y_coord score``)."""
    return _write(path, data, meta, "topaz")


def write_box(path: str, data, meta: dict) -> list[str]:
    """Write the Points of one micrograph as an EMAN ``.box`` file (box size: see :func:`box_size_for`)."""
    return _write(path, data, meta, "box", box_size=box_size_for(meta))


def write_points_per_micrograph(path, data, meta: dict, *, suffix: str = "", format: str = "star",
                                box_size: float | None = None) -> list[str]:
    """Write one coordinate file per micrograph into the folder ``path`` (created if needed).

    Files are named ``<micrograph><suffix>.star`` (e.g. ``suffix="_autopick"`` for RELION's AutoPick naming), or
    with the extension of ``format`` ('star', 'csv', 'topaz', 'box'; box size default from
    :func:`box_size_for`). Returns the paths written.
    """
    table = points_to_table(data, meta)
    if format == "box" and box_size is None:
        box_size = box_size_for(meta)
    written = write_coordinates(table, path, format, per_micrograph=True, suffix=suffix, box_size=box_size)
    return [str(p) for p in written]
