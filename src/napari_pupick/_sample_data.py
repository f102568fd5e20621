"""npe2 sample data: a small synthetic micrograph stack with sparse labels and the full ground truth."""

from __future__ import annotations

import numpy as np

from napari_pupick._reader import POINTS_STYLE
from napari_pupick.synthetic import make_synthetic

__all__ = ["make_sample_data"]


def _points(table, names, radius):
    """(plane, y, x) array of a table's rows on the stack whose planes are ``names``."""
    index = {n: i for i, n in enumerate(names)}
    plane = table["micrograph"].map(index).to_numpy(float)
    return np.column_stack([plane, table["y"].to_numpy(float), table["x"].to_numpy(float)]).reshape(-1, 3)


def make_sample_data(n_micrographs: int = 4, shape=(512, 512), seed: int = 0) -> list:
    """Synthetic micrographs as napari layers.

    Returns
    -------
    list of LayerData
        - Image "synthetic micrographs": (n_micrographs, H, W) float32, metadata ``micrograph_names``,
          ``pixel_size``;
        - Points "positives": the sparse labels a person would click, (plane, y, x), size 2 x radius, metadata
          ``micrograph_names`` and ``radius``;
        - Points "ground truth": every particle, hidden.
    """
    syn = make_synthetic(n_micrographs=n_micrographs, shape=tuple(shape), seed=seed)
    names = list(syn.names)
    pixel_size = float(syn.params.get("pixel_size", 1.0))
    meta = {"micrograph_names": names, "radius": float(syn.radius)}
    image = (syn.stack, {"name": "synthetic micrographs", "colormap": "gray",
                         "metadata": {"micrograph_names": names, "pixel_size": pixel_size}}, "image")
    positives = (_points(syn.labels, names, syn.radius),
                 {"name": "positives", "ndim": 3, "size": 2 * syn.radius, "metadata": dict(meta),
                  **{**POINTS_STYLE, "border_color": "#33ff66"}}, "points")
    truth = (_points(syn.particles, names, syn.radius),
             {"name": "ground truth", "ndim": 3, "size": 2 * syn.radius, "visible": False,
              "metadata": dict(meta), **{**POINTS_STYLE, "border_color": "#33ccff"}}, "points")
    return [image, positives, truth]
