"""Synthetic cryo-EM micrographs with ground-truth particles.

The images imitate what makes real picking hard: non-globular particles in random in-plane orientations at a low
signal-to-noise ratio, a CTF-like band-pass with fringes, an uneven background, and junk that is not a particle
(ice blobs and small fragments). Everything is drawn from one seeded generator, so the same arguments always give
the same pixels.

Used for napari's sample data, the tests and the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["SHAPES", "SyntheticSet", "make_synthetic", "particle_template"]

#: Particle shapes of :func:`particle_template`.
SHAPES = ("dumbbell", "rod", "ring", "globule", "lobes")


@dataclass
class SyntheticSet:
    """A set of synthetic micrographs and their particles.

    Attributes
    ----------
    micrographs : list of ndarray
        float32 images of shape (H, W).
    names : list of str
        One name per micrograph (used as ``micrograph`` in pick tables).
    particles : DataFrame
        Every particle: columns ``micrograph, x, y, angle`` (x = column, y = row, angle in degrees).
    labels : DataFrame
        The sparse subset a person would have clicked: columns ``micrograph, x, y``.
    junk : DataFrame
        Centres of the junk objects (``micrograph, x, y, kind``), never particles.
    radius : float
        Particle radius in pixels.
    """

    micrographs: list
    names: list
    particles: pd.DataFrame
    labels: pd.DataFrame
    junk: pd.DataFrame
    radius: float
    params: dict = field(default_factory=dict)

    @property
    def stack(self) -> np.ndarray:
        """The micrographs as one (N, H, W) array."""
        return np.stack(self.micrographs)

    def write(self, folder) -> dict:
        """Write the micrographs as MRC files and the coordinates as STAR files.

        Returns a dict with the paths: ``micrographs`` (list), ``particles`` and ``labels`` (STAR files).
        """
        from napari_pupick.io import write_coordinates, write_micrograph

        folder = Path(folder)
        (folder / "micrographs").mkdir(parents=True, exist_ok=True)
        paths = []
        for name, image in zip(self.names, self.micrographs):
            path = folder / "micrographs" / f"{name}.mrc"
            paths.append(write_micrograph(path, image, self.params.get("pixel_size", 1.0)))
        particles = folder / "particles.star"
        labels = folder / "labels.star"
        write_coordinates(self.particles.assign(score=1.0), particles)
        write_coordinates(self.labels.assign(score=1.0), labels)
        return {"micrographs": paths, "particles": particles, "labels": labels}


def particle_template(radius: float, angle: float, shape: str = "dumbbell") -> np.ndarray:
    """Projected density of one particle (positive values), rotated by ``angle`` degrees.

    ``dumbbell`` (default): a large lobe, a smaller lobe and a short arm, so that its orientation matters; ``rod``:
    an elongated body with a knob; ``ring``: the projection of a hollow shell (apoferritin-like); ``globule``: a
    solid sphere's; ``lobes``: three to five Gaussian lobes placed by the radius. Returns a square array of side
    ``2 * ceil(1.3 * radius) + 1``.
    """
    half = int(np.ceil(1.3 * radius))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    t = np.deg2rad(angle)
    u = np.cos(t) * xx + np.sin(t) * yy
    v = -np.sin(t) * xx + np.cos(t) * yy
    r = float(radius)
    if shape in ("ring", "globule"):
        # projections of a solid sphere (globule) or a hollow shell of inner radius 0.6 r (ring, like apoferritin)
        d2 = u * u + v * v
        outer = np.sqrt(np.maximum(r * r - d2, 0.0))
        if shape == "globule":
            return (outer / r).astype(np.float32)
        inner = np.sqrt(np.maximum((0.6 * r) ** 2 - d2, 0.0))
        return ((outer - inner) / r).astype(np.float32)
    if shape == "dumbbell":
        lobes = [(-0.35 * r, 0.0, 0.55 * r, 0.45 * r, 1.0), (0.5 * r, 0.1 * r, 0.38 * r, 0.3 * r, 0.8),
                 (0.1 * r, -0.45 * r, 0.22 * r, 0.35 * r, 0.6)]
    elif shape == "rod":
        lobes = [(0.0, 0.0, 0.85 * r, 0.28 * r, 1.0), (0.55 * r, 0.25 * r, 0.25 * r, 0.25 * r, 0.5)]
    elif shape == "lobes":
        # three to five lobes at fixed pseudo-random places (the same for every particle of a set)
        lobe_rng = np.random.default_rng(int(round(r * 1000)) % 2**32)
        lobes = [(*(lobe_rng.uniform(-0.5, 0.5, 2) * r), *(lobe_rng.uniform(0.2, 0.45, 2) * r),
                  lobe_rng.uniform(0.5, 1.0)) for _ in range(int(lobe_rng.integers(3, 6)))]
    else:
        raise ValueError(f"unknown particle shape {shape!r} (use one of {', '.join(SHAPES)})")
    density = np.zeros_like(u)
    for cu, cv, su, sv, amp in lobes:
        density += amp * np.exp(-0.5 * (((u - cu) / su) ** 2 + ((v - cv) / sv) ** 2))
    return density


def _place(rng, n, shape, min_dist, margin, avoid=(), avoid_dist=None):
    """Rejection-sample up to ``n`` centres at least ``min_dist`` apart, and ``avoid_dist`` from ``avoid``."""
    h, w = shape
    pts: list = []
    placed = np.zeros((0, 2))
    avoid = np.asarray(avoid, dtype=float).reshape(-1, 2)
    avoid_dist = min_dist if avoid_dist is None else avoid_dist
    tries = 0
    while len(pts) < n and tries < 200 * max(n, 1):
        tries += 1
        p = np.array([rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)])
        if placed.size and np.min(np.sum((placed - p) ** 2, axis=1)) < min_dist**2:
            continue
        if avoid.size and np.min(np.sum((avoid - p) ** 2, axis=1)) < avoid_dist**2:
            continue
        pts.append(p)
        placed = np.vstack([placed, p])
    return np.array(pts).reshape(-1, 2)


def _ctf(shape, defocus_scale: float, rng) -> np.ndarray:
    """A CTF-like radial filter: oscillating with squared frequency, damped by an envelope, no DC."""
    ky = np.fft.fftfreq(shape[0])[:, None]
    kx = np.fft.rfftfreq(shape[1])[None, :]
    k2 = kx**2 + ky**2
    phase = np.pi * defocus_scale * k2 * 900.0 + 0.1
    ctf = -np.sin(phase) * np.exp(-k2 * 60.0)
    ctf[0, 0] = 0.0
    return ctf.astype(np.float32)


def _smooth_field(rng, shape, sigma_px: float) -> np.ndarray:
    noise = rng.standard_normal(shape).astype(np.float32)
    ky = np.fft.fftfreq(shape[0])[:, None]
    kx = np.fft.rfftfreq(shape[1])[None, :]
    g = np.exp(-2 * (np.pi * sigma_px) ** 2 * (kx**2 + ky**2))
    f = np.fft.irfft2(np.fft.rfft2(noise) * g, s=shape)
    return (f / (f.std() + 1e-12)).astype(np.float32)


def _carbon(rng, shape, noise_sd: float, yy, xx) -> np.ndarray:
    """A carbon film behind a curved edge: a brighter, textured region and a dark rim along the edge."""
    h, w = shape
    t = rng.uniform(0, 2 * np.pi)
    big = rng.uniform(1.5, 4.0) * max(h, w)  # radius of the film's edge (a circle far larger than the image)
    cut = rng.uniform(0.15, 0.5) * min(h, w)  # how deep the film reaches into the micrograph
    cx = w / 2 + np.cos(t) * (big + min(h, w) / 2 - cut)
    cy = h / 2 + np.sin(t) * (big + min(h, w) / 2 - cut)
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) - big  # < 0 on the film
    film = 1.0 / (1.0 + np.exp(np.clip(d / 1.5, -50, 50)))
    rim = np.exp(-0.5 * (d / rng.uniform(1.5, 3.0)) ** 2)
    texture = _smooth_field(rng, shape, 6.0)
    sign = 1.0 if rng.random() < 0.5 else -1.0  # thicker (darker) or brighter than the ice, by the imaging
    out = noise_sd * (sign * rng.uniform(1.0, 3.0) * film + 0.5 * film * texture - rng.uniform(2.0, 4.0) * rim)
    return out.astype(np.float32)


def make_synthetic(
    n_micrographs: int = 4,
    shape: tuple = (512, 512),
    n_particles: int = 60,
    radius: float = 12.0,
    snr: float = 0.1,
    n_labels: int | None = None,
    label_micrographs: int | None = None,
    junk: bool = True,
    particle_shape: str = "dumbbell",
    pixel_size: float = 1.0,
    seed: int = 0,
    name_prefix: str = "synth",
    spacing: float = 2.1,
    radius_jitter: float = 0.0,
    carbon: bool = False,
    quantize: int | None = None,
) -> SyntheticSet:
    """Make ``n_micrographs`` synthetic micrographs with ground truth.

    Parameters
    ----------
    n_micrographs, shape : number and (H, W) size of the micrographs.
    n_particles : particles per micrograph (fewer if they do not fit without overlap).
    radius : particle radius in pixels.
    snr : signal-to-noise ratio per pixel over the particle (variance of the filtered particle signal inside the
        particle discs divided by the noise variance). Real micrographs are around 0.01-0.1.
    n_labels : how many particles to mark as sparse positives (default: a quarter of those in the labelled
        micrographs), drawn at random from the first ``label_micrographs`` micrographs (default: all).
    junk : add ice blobs (large, dark, smooth) and small fragments (smaller than a particle).
    particle_shape : one of :data:`SHAPES`.
    seed : the seed of the only random generator used.
    spacing : particle centres are at least ``spacing * radius`` apart (2.1: touching at most; below 2: crowded
        particles overlap).
    radius_jitter : each particle's radius is ``radius * (1 + radius_jitter * u)``, u uniform in [-1, 1].
    carbon : a carbon film over part of each micrograph: a brighter, thicker region behind a curved edge with a
        dark rim (particles sit on both sides, sparser on the carbon).
    quantize : convert each micrograph to this many grey levels (as an 8-bit image with a narrow range does).

    Returns
    -------
    SyntheticSet
    """
    if n_micrographs < 1:
        raise ValueError("n_micrographs must be at least 1")
    rng = np.random.default_rng(seed)
    h, w = int(shape[0]), int(shape[1])
    images, names, rows, junk_rows = [], [], [], []
    width = len(str(n_micrographs - 1))
    for m in range(n_micrographs):
        name = f"{name_prefix}_{m:0{width}d}"
        names.append(name)
        # Junk first, so particles keep clear of ice blobs.
        blobs = _place(rng, int(rng.integers(1, 3)), (h, w), 8 * radius, 2 * radius) if junk else np.zeros((0, 2))
        centres = _place(rng, n_particles, (h, w), spacing * radius, 1.5 * radius, avoid=blobs,
                         avoid_dist=4 * radius)
        angles = rng.uniform(0, 360, len(centres))
        radii = (radius * (1 + radius_jitter * rng.uniform(-1, 1, len(centres))) if radius_jitter
                 else np.full(len(centres), float(radius)))
        density = np.zeros((h, w), np.float32)
        mask = np.zeros((h, w), bool)
        yy, xx = np.mgrid[0:h, 0:w]
        for (x, y), a, rad in zip(centres, angles, radii):
            tpl = particle_template(rad, a, particle_shape)
            half = tpl.shape[0] // 2
            xi, yi = int(round(x)), int(round(y))
            y0, y1 = max(yi - half, 0), min(yi + half + 1, h)
            x0, x1 = max(xi - half, 0), min(xi + half + 1, w)
            density[y0:y1, x0:x1] += tpl[y0 - yi + half : y1 - yi + half, x0 - xi + half : x1 - xi + half]
            sl = (slice(y0, y1), slice(x0, x1))
            mask[sl] |= (yy[sl] - y) ** 2 + (xx[sl] - x) ** 2 <= radius**2
            rows.append((name, float(x), float(y), float(a)))
        # Small fragments: compact blobs, a third of the particle's size, same material.
        n_frag = int(rng.integers(n_particles // 4, n_particles // 2 + 1)) if junk else 0
        frags = _place(rng, n_frag, (h, w), 1.5 * radius, radius, avoid=centres, avoid_dist=1.6 * radius)
        for x, y in frags:
            s = rng.uniform(0.15, 0.3) * radius
            density += (rng.uniform(1.5, 2.5) * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / s**2)).astype(
                np.float32)
            junk_rows.append((name, float(x), float(y), "fragment"))
        # Phase contrast: particles appear through a CTF-like filter (fringes around every object).
        ctf = _ctf((h, w), rng.uniform(0.8, 1.2), rng)
        signal = np.fft.irfft2(np.fft.rfft2(density) * ctf, s=(h, w)).astype(np.float32)
        sig_var = float(signal[mask].var()) if mask.any() else float(signal.var())
        noise_sd = np.sqrt(max(sig_var, 1e-12) / snr)
        image = signal + rng.standard_normal((h, w)).astype(np.float32) * noise_sd
        # Uneven background: a tilt and slow thickness variations of the ice.
        gy, gx = rng.normal(0, 1.0, 2)
        image += noise_sd * (0.6 * _smooth_field(rng, (h, w), max(h, w) / 8) + gy * (yy / h - 0.5)
                             + gx * (xx / w - 0.5)).astype(np.float32)
        # Ice blobs: large, dark, smooth, far stronger than the particles.
        for x, y in blobs:
            rb = rng.uniform(1.5, 3.0) * radius
            d2 = ((xx - x) ** 2 + (yy - y) ** 2) / rb**2
            image -= (3.0 * noise_sd / (1 + np.exp(np.minimum((d2 - 1) * 8, 50.0)))).astype(np.float32)
            junk_rows.append((name, float(x), float(y), "ice"))
        if carbon:
            image += _carbon(rng, (h, w), noise_sd, yy, xx)
        # Intensities are counts: a positive mean level proportional to the dose, and a dose (gain) that differs
        # per micrograph - the per-micrograph scale factor that GMM normalization estimates and undoes.
        image = (image + 10.0 * noise_sd) * rng.uniform(0.7, 1.4)
        if quantize:
            lo, hi = np.percentile(image, [0.5, 99.5])
            levels = np.clip(np.round((image - lo) / max(hi - lo, 1e-12) * (int(quantize) - 1)), 0, int(quantize) - 1)
            image = 84.0 + levels  # an 8-bit image's narrow range, as in EMPIAR-10947's conversion
        images.append(image.astype(np.float32))

    particles = pd.DataFrame(rows, columns=["micrograph", "x", "y", "angle"])
    junk_df = pd.DataFrame(junk_rows, columns=["micrograph", "x", "y", "kind"])
    lab_names = names[: label_micrographs or n_micrographs]
    pool = particles[particles.micrograph.isin(lab_names)]
    if n_labels is None:
        n_labels = max(1, len(pool) // 4)
    n_labels = min(int(n_labels), len(pool))
    pick = np.sort(rng.choice(len(pool), size=n_labels, replace=False))
    labels = pool.iloc[pick][["micrograph", "x", "y"]].reset_index(drop=True)
    params = dict(n_micrographs=n_micrographs, shape=(h, w), n_particles=n_particles, radius=radius, snr=snr,
                  junk=junk, particle_shape=particle_shape, pixel_size=pixel_size, seed=seed)
    return SyntheticSet(images, names, particles, labels, junk_df, float(radius), params)
