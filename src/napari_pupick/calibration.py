"""Defaults a microscopist should not have to choose: binning, edge margin, particle count and threshold.

Everything here is plain numpy/pandas over pick tables (no torch, no napari), so the command line, the napari
session and scripts derive the same defaults from the same data.

- :func:`choose_downsample`: the binning factor that puts the particle radius where the models work best.
- :func:`default_margin`: the edge margin picks are dropped within.
- :func:`initial_expected` : a first guess of the particles per micrograph from the particle and micrograph size.

Lengths are in ORIGINAL micrograph pixels unless a name says ``binned``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "BINNED_RADIUS_RANGE",
    "TARGET_BINNED_RADIUS",
    "Binning",
    "binning_warning",
    "choose_downsample",
    "default_margin",
    "initial_expected",
    "parse_downsample",
]

#: The binned particle radius (pixels) the automatic binning aims at, and the range outside which a factor given
#: by hand gets a warning. Measured with ``benchmarks/bench_defaults.py binning`` (see docs/benchmarks.md).
TARGET_BINNED_RADIUS = 8.0
BINNED_RADIUS_RANGE = (5.0, 12.0)
#: The largest factor the automatic rule chooses (beyond it micrographs lose the detail particles need).
MAX_AUTO_FACTOR = 16


@dataclass(frozen=True)
class Binning:
    """A binning factor and what it gives.

    Attributes
    ----------
    factor : int
        Integer binning factor (1 = none).
    radius : float
        Particle radius in original pixels.
    binned_radius : float
        ``radius / factor``: the particle radius the network sees.
    pixel_size : float or None
        Original pixel size in Angstrom (None or 0: unknown).
    auto : bool
        Whether the factor was chosen by :func:`choose_downsample`.
    warning : str or None
        Set when the binned radius falls outside :data:`BINNED_RADIUS_RANGE`.
    """

    factor: int
    radius: float
    binned_radius: float
    pixel_size: float | None = None
    auto: bool = True
    warning: str | None = None

    @property
    def binned_pixel_size(self) -> float | None:
        """Angstrom per binned pixel (None when the pixel size is unknown)."""
        return self.pixel_size * self.factor if self.pixel_size else None

    def describe(self) -> str:
        """One line for a log or a tooltip, e.g. ``binning 4 (auto): particle radius 30 px -> 7.5 binned px``."""
        how = "auto" if self.auto else "given"
        text = f"binning {self.factor} ({how}): particle radius {self.radius:g} px -> {self.binned_radius:.3g} binned px"
        if self.pixel_size:
            text += f" ({self.radius * self.pixel_size:.0f} A; {self.binned_pixel_size:.3g} A per binned pixel)"
        return text


def _check_radius(radius) -> float:
    r = float(radius)
    if not math.isfinite(r) or r <= 0:
        raise ValueError(f"particle radius must be a positive number of pixels, not {radius!r}")
    return r


def binning_warning(factor: int, radius: float) -> str | None:
    """A warning when ``radius / factor`` lies outside :data:`BINNED_RADIUS_RANGE` (else None)."""
    r = _check_radius(radius)
    f = int(factor)
    binned = r / f
    lo, hi = BINNED_RADIUS_RANGE
    if lo <= binned <= hi:
        return None
    best = choose_downsample(r).factor
    side = "large" if binned > hi else "small"
    return (f"binning {f} makes the particle radius {binned:.3g} binned px, too {side} for the network (it works "
            f"best at {lo:g}-{hi:g} px); binning {best} gives {r / best:.3g} px")


def choose_downsample(radius: float, pixel_size: float | None = None, factor: int | str | None = "auto"
                      ) -> Binning:
    """The binning factor for a particle of ``radius`` original pixels.

    Parameters
    ----------
    radius : float
        Particle radius in original pixels.
    pixel_size : float, optional
        Angstrom per original pixel (only reported: the rule works on pixels, which is what the network sees).
    factor : int, 'auto' or None
        A factor chosen by hand is kept (with a warning when it puts the binned radius outside
        :data:`BINNED_RADIUS_RANGE`); ``'auto'`` or None chooses ``round(radius / TARGET_BINNED_RADIUS)``, at least
        1 and at most :data:`MAX_AUTO_FACTOR`.

    Returns
    -------
    Binning
    """
    r = _check_radius(radius)
    px = float(pixel_size) if pixel_size and math.isfinite(float(pixel_size)) and float(pixel_size) > 0 else None
    if factor is None or (isinstance(factor, str) and factor.strip().lower() == "auto"):
        f = int(min(max(round(r / TARGET_BINNED_RADIUS), 1), MAX_AUTO_FACTOR))
        return Binning(f, r, r / f, px, auto=True, warning=binning_warning(f, r) if f > 1 else None)
    f = parse_downsample(factor)
    return Binning(f, r, r / f, px, auto=False, warning=binning_warning(f, r))


def parse_downsample(value) -> int | str:
    """``'auto'`` or a positive integer factor from a command-line or widget value; ValueError otherwise."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"binning must be 'auto' or a positive integer, not {value!r}") from None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"binning must be 'auto' or a positive integer, not {value!r}") from None
    if not math.isfinite(f) or f < 1 or f != int(f):
        raise ValueError(f"binning must be 'auto' or a positive integer, not {value!r}")
    return int(f)


def default_margin(radius: float) -> float:
    """Edge margin in original pixels: one particle radius.

    A particle centred closer to the border than its radius is cut by the edge (and borders often carry stripes
    and half particles); extraction of such a box fails in RELION and cryoSPARC anyway.
    """
    return _check_radius(radius)


def initial_expected(radius: float, shape: tuple, coverage: float = 0.25) -> float:
    """A first guess of particles per micrograph: ``coverage`` of the micrograph area covered by particle discs.

    Used only to start training when no count is given; the count is then estimated from the trained model.
    The shared real sets cover 0.20 (ribosome), 0.31 (apoferritin) and 0.50 (EMPIAR-10947) of their area.
    """
    r = _check_radius(radius)
    h, w = (float(shape[-2]), float(shape[-1]))
    return max(1.0, coverage * h * w / (math.pi * r * r))
