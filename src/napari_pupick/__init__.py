"""napari-pupick: positive-unlabeled particle picking for cryo-EM micrographs in napari.

Importing this package is cheap: torch, napari and Qt are imported lazily by the functions that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
