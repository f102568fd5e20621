"""Exceptions raised by napari-pupick: each message names the file (or object) and the problem."""


class PupickError(Exception):
    """Base class of every error napari-pupick raises on purpose."""


class MicrographError(PupickError, ValueError):
    """A micrograph file or array that cannot be used (not MRC, truncated, wrong dimensionality, NaN pixels...)."""


class CoordinateError(PupickError, ValueError):
    """A coordinate file or table that cannot be used (missing columns, points outside the image, unknown names)."""


class TrainingError(PupickError, RuntimeError):
    """Training cannot start or had to stop (no labels, diverging loss...)."""


class ModelError(PupickError, ValueError):
    """A model checkpoint that cannot be loaded or does not fit the data."""


class WriteError(PupickError, OSError):
    """A file could not be written (read-only or full disk, a folder in the way...); the target is unchanged."""


class UsageError(PupickError, ValueError):
    """A command-line argument that cannot be used (``pupick`` exits with status 2)."""
