"""napari dock widgets of the picking loop, each a thin shell over :class:`napari_pupick.loop.PickLoop`.

1. :class:`PreprocessWidget`: bin and normalize the micrographs; set the particle size; create the positives layer.
2. :class:`TrainWidget`: train / retrain / cancel with live curves; save and load models.
3. :class:`PredictWidget`: score, heatmap, picks, live threshold over the score histogram, NMS radius, margin.
4. :class:`ExportWidget`: STAR (combined or per micrograph), CSV, Topaz, box.

All widgets of one viewer share one ``PickLoop`` (``PickLoop.for_viewer(viewer)``). Qt and napari are imported only
when a widget is first used.
"""

from __future__ import annotations

import importlib

__all__ = ["ExportWidget", "PredictWidget", "PreprocessWidget", "TrainWidget"]

_MODULES = {"PreprocessWidget": "_preprocess", "TrainWidget": "_train", "PredictWidget": "_predict",
            "ExportWidget": "_export"}


def __getattr__(name):
    if name in _MODULES:
        return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
