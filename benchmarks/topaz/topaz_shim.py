"""Launch Topaz's command line on a CPU-only torch (benchmark helper, not part of napari-pupick).

torchvision wheels built for another torch cannot load their compiled operators; ``import torchvision`` then
stops at its fake-tensor registrations with "operator torchvision::nms does not exist". Topaz only uses
torchvision's pure-Python image transforms (rotate, flips), so declaring the schemas of the two operators that
torchvision registers fake kernels for at import time (``nms`` and ``qnms``) is enough to import it. The
operators get no real kernel: calling them would still fail, which Topaz never does.

Usage (in the Topaz venv made by ``setup_topaz.sh``)::

    .topaz-venv/bin/python benchmarks/topaz/topaz_shim.py train --help
"""

from __future__ import annotations

import sys

# The two operators torchvision 0.28 registers fake kernels for at import (torchvision/_meta_registrations.py);
# the schemas are those torchvision's C++ extension declares.
TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

_LIBRARY = None  # keep the Library object alive: dropping it would unregister the schemas


def declare_torchvision_ops() -> list:
    """Declare the missing torchvision operator schemas; return the names that were declared.

    Does nothing for an operator that already exists (a torchvision whose compiled ops load fine).
    """
    global _LIBRARY
    import torch

    if _extension_loads():
        return []
    missing = [name for name in TORCHVISION_SCHEMAS if not _schema_exists(f"torchvision::{name}")]
    if missing:
        if _LIBRARY is None:
            _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
        for name in missing:
            _LIBRARY.define(TORCHVISION_SCHEMAS[name])
    return missing


def _schema_exists(qualname: str) -> bool:
    import torch

    try:
        torch._C._get_schema(qualname, "")
    except RuntimeError:
        return False
    return True


def _extension_loads() -> bool:
    """True when torchvision's compiled extension loads (then nothing needs declaring)."""
    import importlib.util
    import os

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.submodule_search_locations is None:
        return False
    folder = list(spec.submodule_search_locations)[0]
    libs = [f for f in os.listdir(folder) if f.startswith("_C") and f.endswith(".so")]
    if not libs:
        return False
    try:
        torch.ops.load_library(os.path.join(folder, libs[0]))
    except (OSError, RuntimeError):
        return False
    return True


def main(argv=None) -> int:
    """Run ``topaz`` with ``argv`` (default: this process's arguments)."""
    declare_torchvision_ops()
    from topaz.main import main as topaz_main

    sys.argv = ["topaz"] + list(sys.argv[1:] if argv is None else argv)
    result = topaz_main()
    return 0 if result is None else int(result)


if __name__ == "__main__":
    sys.exit(main())
