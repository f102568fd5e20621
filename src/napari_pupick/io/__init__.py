"""Reading and writing micrographs (MRC/MRCS/TIFF) and particle coordinates (STAR, CSV, Topaz, EMAN box).

Nothing here imports napari, Qt or torch.
"""

from napari_pupick.io.coords import (
    COLUMNS,
    FORMATS,
    guess_format,
    match_micrographs,
    read_coordinates,
    validate_in_bounds,
    write_coordinates,
)
from napari_pupick.io.mrc import (
    MICROGRAPH_EXTENSIONS,
    MicrographStack,
    list_micrographs,
    micrograph_info,
    micrograph_name,
    open_stack,
    read_micrograph,
    write_micrograph,
)

__all__ = [
    "COLUMNS",
    "FORMATS",
    "MICROGRAPH_EXTENSIONS",
    "MicrographStack",
    "guess_format",
    "list_micrographs",
    "match_micrographs",
    "micrograph_info",
    "micrograph_name",
    "open_stack",
    "read_coordinates",
    "read_micrograph",
    "validate_in_bounds",
    "write_coordinates",
    "write_micrograph",
]
