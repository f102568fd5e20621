"""Particle extraction from score maps: non-maximum suppression, edge margin, local-contrast filter, scaling.

Conventions (used by every function here):

- A score map is a 2-D array of per-pixel logits, shape (H, W); x = column index, y = row index.
- Greedy non-maximum suppression (NMS): repeatedly take the highest-scoring pixel that is still available, record
  it, and make every pixel at Euclidean distance ``<= radius`` from it unavailable (the bound is inclusive); stop
  when no available pixel has a score strictly greater than ``threshold``.
- Ties are broken by position: among equal scores the pixel with the smaller row, then the smaller column, comes
  first. The result is therefore fully deterministic.
- Edge margin: a pixel whose centre is closer than ``margin`` to the first or last pixel centre of the map
  (``x < margin`` or ``x > W - 1 - margin``, same for y) can neither be picked nor suppress anything: NMS runs as if
  those pixels were absent. The margin is applied before suppression, so a particle just inside the margin is
  never lost to a stronger response just outside it.
- ``radius`` and ``margin`` are in the score map's pixels (binned pixels when the micrograph was downsampled); picks
  are scaled back to original micrograph pixels by :func:`scale_picks` (``x_orig = x * factor``).

The fast NMS is exact, not an approximation: it returns exactly what the naive greedy loop over every pixel
returns (the tests compare both on random maps with many ties). Every available pixel gets a unique priority (its
score, then its position), exact as an integer held in a float64. The map is cut into blocks of side
``s = ceil(radius)``; the best available pixel of a block whose maximum is also the maximum of its 3 x 3
neighbourhood of blocks outranks every available pixel within ``radius`` of it, so greedy NMS is certain to pick
it. All such pixels are picked at once (no two are within ``radius`` of each other), their discs are suppressed,
the blocks whose maximum was suppressed are updated, and the next round starts. Pixels suppressed by a certain
pick are never picked and never suppress anything, so what is left is the same greedy NMS on fewer pixels, and the
rounds (about 10 to 30 on a 1024 x 1024 map) end with exactly the greedy result. Scores are ordered as float32
values for float32 and smaller maps, and as exact float64 values (through their ranks, slower) for float64 maps
that float32 cannot hold exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from napari_pupick.errors import MicrographError

__all__ = ["extract_picks", "local_std", "local_std_filter", "nms", "scale_picks"]

_EMPTY = -1.0  # priority of an unavailable pixel (every available pixel has a priority >= 0)
_BITS_PATH_MAX_PIXELS = 2**21  # float32 bits (32) + pixel index (21) fit the 53-bit mantissa of a float64
_RINGS = 1  # k: blocks of side ceil(radius / k), neighbourhoods of (2k+1)^2 blocks; 1 measured fastest
_SMALL_DTYPES = (np.float32, np.float16, np.int8, np.uint8, np.int16, np.uint16, np.bool_)


def _check_map(score_map) -> np.ndarray:
    m = np.asarray(score_map)
    if m.ndim != 2:
        raise MicrographError(f"score map must be 2-D (H, W), got an array of shape {m.shape}")
    if m.size == 0:
        raise MicrographError("score map is empty")
    if not np.issubdtype(m.dtype, np.number) and m.dtype != np.bool_:
        raise MicrographError(f"score map must be numeric, got dtype {m.dtype}")
    if np.issubdtype(m.dtype, np.floating) and np.isnan(m).any():
        raise MicrographError("score map contains NaN values")
    return m


def _priorities(m: np.ndarray, available: np.ndarray, out: np.ndarray) -> None:
    """Write unique float64 priorities ordering pixels by (score desc, row asc, column asc) into ``out``.

    ``out`` has the map's shape (it may be a view into a padded array); unavailable pixels get -1. The priorities
    are integers below 2**53, hence exact in float64.
    """
    n = m.size
    if not available.any():
        out[...] = _EMPTY
        return
    use_bits = n <= _BITS_PATH_MAX_PIXELS and (
        m.dtype.type in _SMALL_DTYPES
        or (m.dtype == np.float64 and np.array_equal(m.astype(np.float32), m))
    )
    if use_bits:
        # An order-preserving map of float32 values to integers in [0, 2**32) (+0.0 merges -0.0 into +0.0),
        # times 2**21, plus the reversed flat index (row-major: an earlier row, then column, ranks higher).
        f = m + np.float32(0.0) if m.dtype == np.float32 else m.astype(np.float32) + np.float32(0.0)
        b = f.view(np.int32)
        t = b >> 31
        t &= np.int32(0x7FFFFFFF)
        b ^= t
        del t
        out[...] = b
        out += 2.0**31
        out *= 2.0**21
        h, w = m.shape
        out += (2.0**21 - 1 - w * np.arange(h, dtype=np.float64))[:, None]
        out -= np.arange(w, dtype=np.float64)[None, :]
    else:
        # General path (float64 values, or maps over 2**21 pixels): dense ranks of the values.
        _, rank = np.unique(m, return_inverse=True)
        key = rank.reshape(m.shape).astype(np.int64) * n
        key += np.arange(n - 1, -1, -1, dtype=np.int64).reshape(m.shape)
        if int(key.max()) >= 2**53:
            raise MicrographError(f"score map of {n} pixels is too large for exact NMS")
        out[...] = key
    if not available.all():
        np.copyto(out, _EMPTY, where=~available)


def _disc_offsets(radius: float) -> tuple[np.ndarray, np.ndarray]:
    r = int(math.floor(radius))
    d = np.arange(-r, r + 1)
    dy, dx = np.meshgrid(d, d, indexing="ij")
    inside = dy**2 + dx**2 <= radius * radius
    return dy[inside], dx[inside]


def _greedy_nms(m: np.ndarray, available: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices (row-major, into ``m``) of the greedy NMS picks among the ``available`` pixels, and their
    priorities (in no particular order)."""
    h, w = m.shape
    k = _RINGS
    s = max(int(math.ceil(radius / k)), 1)  # k * s >= radius: a disc lies within its (2k+1)^2 block neighbourhood
    pad = k * s  # k rings of empty blocks around the map
    bh, bw = -(-h // s) + 2 * k, -(-w // s) + 2 * k
    wp = bw * s
    a = np.empty((bh * s, wp), dtype=np.float64)
    a[:pad] = _EMPTY
    a[pad + h :] = _EMPTY
    a[:, :pad] = _EMPTY
    a[:, pad + w :] = _EMPTY
    _priorities(m, available, a[pad : pad + h, pad : pad + w])
    if radius < 1.0:  # the disc is the pixel itself: every available pixel is picked
        p = np.flatnonzero(a >= 0)
        prio = a.ravel()[p]
    else:
        p, prio = _block_rounds(a, s, k, radius)
    r, c = np.divmod(p, wp)
    return (r - pad) * w + (c - pad), prio


def _block_rounds(a: np.ndarray, s: int, k: int, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """The rounds of certain picks described in the module docstring; ``a`` (padded priorities) is consumed.

    ``a`` is a grid of (bh, bw) blocks of side ``s`` whose outer ``k`` rings are empty; ``k * s >= radius``.
    Returns the picks' flat indices into ``a`` and their priorities.
    """
    hp, wp = a.shape
    bh, bw = hp // s, wp // s
    flat = a.ravel()
    # Per-block maximum and the flat index of the pixel holding it.
    blocks = a.reshape(bh, s, bw, s).transpose(0, 2, 1, 3).reshape(bh * bw, s * s)
    arg = blocks.argmax(axis=1)
    bmax = blocks[np.arange(bh * bw), arg]
    del blocks
    inner = (np.arange(s)[:, None] * wp + np.arange(s)[None, :]).ravel()  # pixel offsets inside a block
    bi, bj = np.divmod(np.arange(bh * bw), bw)
    block_base = (bi * s) * wp + bj * s
    barg = block_base + inner[arg]

    dy, dx = _disc_offsets(radius)
    disc = dy * wp + dx
    shifts = [(di, dj) for di in range(-k, k + 1) for dj in range(-k, k + 1)]
    nbr = np.array([di * bw + dj for di, dj in shifts])  # flat block-index offsets of the neighbourhood
    bmax2 = bmax.reshape(bh, bw)
    core = bmax2[k:-k, k:-k]
    views = [bmax2[k + di : bh - k + di, k + dj : bw - k + dj] for di, dj in shifts]
    core_ids = (np.arange(k, bh - k)[:, None] * bw + np.arange(k, bw - k)[None, :]).ravel()
    nb = np.empty_like(core)
    mark = np.zeros(bh * bw, dtype=bool)
    picks, prios = [], []
    live = core_ids[bmax[core_ids] >= 0]  # blocks that still hold an available pixel
    while live.size:
        if 4 * live.size > core_ids.size:  # dense: whole-grid maxima over shifted views
            np.copyto(nb, views[0])
            for v in views[1:]:
                np.maximum(nb, v, out=nb)
            sel = core_ids[((core == nb) & (nb >= 0)).ravel()]
        else:  # sparse: only the live blocks
            nbm = bmax[live + nbr[0]]
            for o in nbr[1:]:
                np.maximum(nbm, bmax[live + o], out=nbm)
            sel = live[(bmax[live] == nbm) & (nbm >= 0)]
        new = barg[sel]
        picks.append(new)
        prios.append(bmax[sel])
        flat[(new[:, None] + disc[None, :]).ravel()] = _EMPTY
        # Blocks around the picks whose maximum pixel was just suppressed need a new maximum.
        touched = (sel[:, None] + nbr[None, :]).ravel()
        mark[touched[flat[barg[touched]] < 0]] = True
        stale = np.flatnonzero(mark)
        mark[stale] = False
        pix = block_base[stale][:, None] + inner[None, :]
        vals = flat[pix]
        targ = vals.argmax(axis=1)
        rows = np.arange(stale.size)
        bmax[stale] = vals[rows, targ]
        barg[stale] = pix[rows, targ]
        live = live[bmax[live] >= 0]
    if not picks:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    return np.concatenate(picks), np.concatenate(prios)


def nms(score_map, radius: float, threshold: float = -6.0, margin: float = 0.0, max_picks: int | None = None
        ) -> pd.DataFrame:
    """Greedy non-maximum suppression on a score map (exact, fast).

    Parameters
    ----------
    score_map : array_like, shape (H, W)
        Per-pixel scores (logits). NaN is refused; -inf never gets picked.
    radius : float
        Suppression radius in map pixels: a pick removes every pixel at distance ``<= radius`` (inclusive).
        ``radius < 1`` suppresses only the picked pixel itself.
    threshold : float
        Only pixels with a score strictly greater than ``threshold`` can be picked.
    margin : float
        Pixels with ``x < margin`` or ``x > W - 1 - margin`` (same for y) are ignored entirely (they neither get
        picked nor suppress other pixels).
    max_picks : int, optional
        Keep only the first ``max_picks`` picks (the best ones: greedy picks in descending score order).

    Returns
    -------
    DataFrame
        Columns ``x`` (column), ``y`` (row) as float64 map pixels and ``score`` (float64), one row per pick, sorted
        by score descending, ties by row then column; index 0..n-1.
    """
    m = _check_map(score_map)
    if not np.isfinite(radius) or radius < 0:
        raise ValueError(f"radius must be a finite number >= 0, got {radius!r}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    h, w = m.shape
    available = m > threshold
    if margin > 0:
        lo = int(math.ceil(margin))  # first index >= margin
        hi_r, hi_c = int(math.floor(h - 1 - margin)), int(math.floor(w - 1 - margin))  # last index allowed
        edge = np.ones(m.shape, dtype=bool)
        if lo <= hi_r and lo <= hi_c:
            edge[lo : hi_r + 1, lo : hi_c + 1] = False
        available &= ~edge
    idx, prio = _greedy_nms(m, available, float(radius))
    idx = idx[np.argsort(-prio, kind="stable")]
    if max_picks is not None:
        idx = idx[: max(int(max_picks), 0)]
    y, x = np.divmod(idx, w)
    return pd.DataFrame({"x": x.astype(np.float64), "y": y.astype(np.float64),
                         "score": m.ravel()[idx].astype(np.float64)})


def local_std(image, x, y, radius: float) -> np.ndarray:
    """Standard deviation of the pixels within ``radius`` (inclusive disc) of each point.

    Computed from row-wise cumulative sums of the image and its square: a disc is a stack of ``2 floor(r) + 1``
    horizontal runs, each summed with two look-ups.

    Parameters
    ----------
    image : array_like, shape (H, W)
    x, y : array_like, shape (n,)
        Point coordinates in the image's pixels (rounded to the nearest pixel).
    radius : float
        Disc radius in pixels; pixels outside the image are left out of the disc.

    Returns
    -------
    ndarray, shape (n,), float64
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise MicrographError(f"image must be 2-D (H, W), got an array of shape {img.shape}")
    h, w = img.shape
    xi = np.rint(np.asarray(x, dtype=np.float64)).astype(np.int64).ravel()
    yi = np.rint(np.asarray(y, dtype=np.float64)).astype(np.int64).ravel()
    out = np.zeros(xi.size, dtype=np.float64)
    if xi.size == 0:
        return out
    radius = max(float(radius), 0.0)
    r = int(math.floor(radius))
    dy = np.arange(-r, r + 1)
    half = np.floor(np.sqrt(np.maximum(radius * radius - dy * dy, 0.0))).astype(np.int64)  # run half-widths
    # Row-wise cumulative sums with a leading zero column: the sum of row i over columns [c0, c1] is
    # C[i, c1 + 1] - C[i, c0].
    v = img.astype(np.float64)
    v -= v.mean()  # better conditioned squares
    c1 = np.zeros((h, w + 1))
    np.cumsum(v, axis=1, out=c1[:, 1:])
    v *= v
    c2 = np.zeros((h, w + 1))
    np.cumsum(v, axis=1, out=c2[:, 1:])
    del v
    c1, c2 = c1.ravel(), c2.ravel()
    chunk = max(1, 1_000_000 // dy.size)
    for start in range(0, xi.size, chunk):  # bounded memory
        px, py = xi[start : start + chunk, None], yi[start : start + chunk, None]
        rows = py + dy[None, :]
        lo = np.clip(px - half[None, :], 0, w)  # first column of the run, clipped to the image
        hi = np.clip(px + half[None, :], -1, w - 1)  # last column
        inside = (rows >= 0) & (rows < h) & (hi >= lo)
        base = np.clip(rows, 0, h - 1) * (w + 1)
        i_hi = base + np.clip(hi + 1, 0, w)
        i_lo = base + np.clip(lo, 0, w)
        n = np.where(inside, hi - lo + 1, 0).sum(axis=1)
        s1 = np.where(inside, c1[i_hi] - c1[i_lo], 0.0).sum(axis=1)
        s2 = np.where(inside, c2[i_hi] - c2[i_lo], 0.0).sum(axis=1)
        nn = np.maximum(n, 1)
        mean = s1 / nn
        out[start : start + chunk] = np.sqrt(np.maximum(s2 / nn - mean * mean, 0.0))
    return out


def local_std_filter(image, picks: pd.DataFrame, radius: float, min_z: float | None = None,
                     max_z: float | None = 3.0) -> pd.DataFrame:
    """Drop picks whose local standard deviation is abnormal for this micrograph (carbon edges, contamination).

    The local standard deviation within ``radius`` of every pick is turned into a robust z-score across the picks,
    ``z = (std - median) / (1.4826 * MAD)``, and picks with ``z < min_z`` or ``z > max_z`` are dropped (a limit of
    ``None`` is not applied). With a MAD of 0 (fewer than three distinct values) nothing is dropped.

    Parameters
    ----------
    image : array_like, shape (H, W)
        The image the picks' x, y refer to (the binned, normalized micrograph when used on score-map picks).
    picks : DataFrame
        Columns ``x``, ``y`` (and any others, kept).
    radius : float
        Radius of the disc in the image's pixels (the particle radius).

    Returns
    -------
    DataFrame
        The kept rows, in their original order, index reset.
    """
    if len(picks) == 0:
        return picks.reset_index(drop=True)
    sd = local_std(image, picks["x"].to_numpy(), picks["y"].to_numpy(), radius)
    med = np.median(sd)
    mad = 1.4826 * np.median(np.abs(sd - med))
    if not mad > 0:
        return picks.reset_index(drop=True)
    z = (sd - med) / mad
    keep = np.ones(len(picks), dtype=bool)
    if min_z is not None:
        keep &= z >= min_z
    if max_z is not None:
        keep &= z <= max_z
    return picks.loc[keep].reset_index(drop=True)


def scale_picks(picks: pd.DataFrame, factor: float) -> pd.DataFrame:
    """Return a copy of ``picks`` with ``x`` and ``y`` multiplied by ``factor`` (binned -> original pixels)."""
    out = picks.copy()
    out["x"] = out["x"].astype(np.float64) * float(factor)
    out["y"] = out["y"].astype(np.float64) * float(factor)
    return out


def extract_picks(score_map, radius: float, *, threshold: float = -6.0, margin: float = 0.0, factor: int = 1,
                  micrograph: str | None = None, image=None, std_filter=None, max_picks: int | None = None
                  ) -> pd.DataFrame:
    """Picks from one score map, in original micrograph pixels.

    Parameters
    ----------
    score_map : array_like, shape (h, w)
        Per-pixel logits on the binned micrograph.
    radius, margin : float
        Suppression radius and edge margin in score-map (binned) pixels; see :func:`nms`.
    threshold : float
        Only scores strictly above it are picked.
    factor : int
        Downsampling factor of the score map; coordinates are multiplied by it.
    micrograph : str, optional
        Value of the ``micrograph`` column.
    image : array_like, shape (h, w), optional
        The binned, normalized micrograph, needed by ``std_filter``.
    std_filter : float or (float or None, float or None), optional
        Local-contrast rejection (:func:`local_std_filter` with ``radius``): a float is ``max_z``; a pair is
        ``(min_z, max_z)``. Applied before ``max_picks``.
    max_picks : int, optional
        Keep at most this many picks (the best).

    Returns
    -------
    DataFrame
        Columns ``micrograph, x, y, score``, sorted by score descending.
    """
    picks = nms(score_map, radius, threshold=threshold, margin=margin)
    if std_filter is not None:
        if image is None:
            raise ValueError("std_filter needs the image the score map was computed from (image=...)")
        if np.shape(image) != np.shape(score_map):
            raise MicrographError(f"image of shape {np.shape(image)} does not match the score map of shape "
                                  f"{np.shape(score_map)}")
        if np.ndim(std_filter) == 0:
            min_z, max_z = None, float(std_filter)
        else:
            min_z, max_z = std_filter
        picks = local_std_filter(image, picks, radius, min_z=min_z, max_z=max_z)
    if max_picks is not None:
        picks = picks.iloc[: max(int(max_picks), 0)]
    picks = scale_picks(picks, factor)
    picks.insert(0, "micrograph", micrograph)
    return picks.reset_index(drop=True)
