"""Micrograph preprocessing: Fourier downsampling and normalization (affine, or the dataset-wide GMM).

The GMM normalization follows Bepler et al. (2019): the pixels of K micrographs are modelled by ONE two-component
Gaussian mixture shared by all micrographs, each micrograph k having its own scale factor a_k::

    x | z ~ N(a_k mu_z, a_k^2 s_z^2),   P(z = 1) = p

fit by expectation-maximization, and a pixel is normalized as ``x' = (x / a_k - mu) / s`` with ``(mu, s)`` the
dominant component (``(mu0, s0)`` if ``p < 0.5`` else ``(mu1, s1)``).

How it is fit here, deterministic and cheap:

- Each micrograph is reduced to a histogram (``bins`` bins of equal width over a robust range: the 0.1 % and
  99.9 % quantiles of a regular subsample of its pixels, widened by 25 % of their distance on each side; pixels
  outside are left out, which drops saturated detector values). Integer-valued images whose range spans fewer
  levels than ``bins`` get one bin per integer level. EM then runs on the bin centres weighted by the counts.
- One EM iteration is an E-step (responsibilities) followed by two conditional M-steps (ECM): the mixture
  parameters in closed form given the scales, then each scale given the mixture. For ``b = 1 / a_k`` the expected
  complete-data log-likelihood of micrograph k is ``n_k log b - sum_i sum_z r_iz (b x_i - mu_z)^2 / (2 s_z^2)``,
  maximised by the positive root of ``A b^2 - B b - n_k = 0`` with ``A = sum r_iz x_i^2 / s_z^2`` and
  ``B = sum r_iz x_i mu_z / s_z^2``. No step can decrease the likelihood.
- Acceleration: every two ECM steps are followed by a squared extrapolation (SQUAREM), kept only when it does
  not lower the likelihood; with heavily overlapping components (real micrographs) plain EM needs hundreds of
  steps, this a few dozen.
- Scale ambiguity: multiplying every a_k by c and (mu_z, s_z) by c leaves the likelihood unchanged; after each
  iteration the scales are renormalized to a geometric mean of 1.
- Initialisation from quantiles of the pooled data: three deterministic starts (quartiles; 5 %/50 %; 50 %/95 %)
  each run for a few iterations, the best one is run to convergence.
- Standard deviations are floored at one histogram bin (which also stops a component collapsing onto one
  grey level of quantized data).
- Components are reported with ``mu0 <= mu1``.
- Degenerate data: when two components do not beat one Gaussian by the BIC (``2 * delta loglik < 3 log n``),
  the fit collapses to one component: ``p = 0`` and ``(mu0, s0) = (mu1, s1)`` = the single Gaussian. A unimodal
  image then normalizes to zero mean and unit variance, as the affine normalization would.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from napari_pupick.errors import MicrographError, ModelError

__all__ = [
    "GMM",
    "GMMFit",
    "Preprocessor",
    "affine_normalize",
    "downsample",
    "estimate_scale",
    "fit_gmm",
    "gmm_normalize",
    "mixture_curve",
    "pixel_histogram",
]

METHODS = ("gmm", "affine", "none")
_SUBSAMPLE = 1 << 15  # pixels used to choose the histogram range
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_N_INIT_ITER = 3  # EM steps (one accelerated round) given to each start before choosing one


# ----------------------------------------------------------------------------------------------------------------
# Validation and downsampling


def _as_image(image, what: str = "image") -> np.ndarray:
    """A 2-D, finite, non-empty array (not copied when possible)."""
    x = np.asarray(image)
    if x.ndim != 2:
        raise MicrographError(f"{what} must be a 2-D array (H, W), got shape {x.shape}")
    if x.size == 0:
        raise MicrographError(f"{what} is empty (shape {x.shape})")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise MicrographError(f"{what} must be numeric, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.complexfloating):
        raise MicrographError(f"{what} must be real, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise MicrographError(f"{what} contains {bad} NaN or infinite pixel(s)")
    return x


def _check_factor(factor) -> int:
    if isinstance(factor, bool) or not isinstance(factor, numbers.Integral):
        raise ValueError(f"downsampling factor must be an integer >= 1, got {factor!r}")
    if factor < 1:
        raise ValueError(f"downsampling factor must be an integer >= 1, got {factor!r}")
    return int(factor)


def downsample(image, factor: int) -> np.ndarray:
    """Downsample an image by an integer factor by Fourier cropping.

    The image is first cropped to a multiple of ``factor`` (at most ``factor - 1`` trailing rows and columns are
    dropped), so the binned pixel i lies exactly at original pixel ``i * factor``. Its spectrum is then cropped to
    the frequencies the binned grid can hold (the two Nyquist halves of an even size are averaged) and
    transformed back; the mean intensity is kept.

    Parameters
    ----------
    image : array_like, shape (H, W)
    factor : int
        ``>= 1``; 1 returns a float32 copy.

    Returns
    -------
    ndarray, shape (H // factor, W // factor), float32
    """
    factor = _check_factor(factor)
    return _fourier_bin(_as_image(image), factor)


def _fourier_bin(x: np.ndarray, factor: int) -> np.ndarray:
    """:func:`downsample` of an image already checked by ``_as_image``."""
    if factor == 1:
        return np.array(x, dtype=np.float32, copy=True)
    from scipy import fft

    big_h, big_w = x.shape
    h, w = big_h // factor, big_w // factor
    if h < 1 or w < 1:
        raise MicrographError(f"image of shape {x.shape} is too small to downsample by {factor}")
    big_h, big_w = h * factor, w * factor
    # Separable and pruned: the real transform along rows, keep the columns' low frequencies, and only then the
    # transform along columns (on 1/factor of the data). Same numbers as cropping the full 2-D spectrum.
    spec = fft.rfft(np.asarray(x[:big_h, :big_w], dtype=np.float32), axis=1)[:, : w // 2 + 1]
    spec = fft.fft(spec, axis=0, overwrite_x=True)
    top = (h + 1) // 2  # frequencies 0 .. ceil(h/2) - 1
    bottom = h // 2  # frequencies -floor(h/2) .. -1
    crop = np.empty((h, w // 2 + 1), dtype=spec.dtype)
    crop[:top] = spec[:top]
    crop[top:] = spec[big_h - bottom :]
    if h % 2 == 0:  # the Nyquist row of the binned grid receives +h/2 and -h/2 equally
        crop[top] = 0.5 * (spec[top] + spec[big_h - bottom])
    out = fft.irfft2(crop, s=(h, w), overwrite_x=True)
    out *= 1.0 / (factor * factor)
    return out.astype(np.float32, copy=False)


def affine_normalize(image) -> np.ndarray:
    """``(x - mean) / std`` of one image, as float32.

    Raises
    ------
    MicrographError
        If the image is constant (standard deviation 0).
    """
    x = _as_image(image)
    xf = x.astype(np.float64) if x.dtype != np.float64 else x
    mean = float(xf.mean())
    std = float(xf.std())
    if not std > 0:
        raise MicrographError("cannot normalize a constant image (standard deviation 0)")
    out = x.astype(np.float32)
    out -= np.float32(mean)
    out *= np.float32(1.0 / std)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Histograms


def _histogram(x: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Counts over a robust range: ``(centres (B,) float64, counts (B,) float64, bin width)``."""
    flat = x.ravel()
    step = max(1, flat.size // _SUBSAMPLE)
    sub = flat[::step]
    n = sub.size
    k_lo, k_hi = int(0.001 * (n - 1)), int(math.ceil(0.999 * (n - 1)))
    part = np.partition(sub, [k_lo, k_hi])
    q_lo, q_hi = float(part[k_lo]), float(part[k_hi])
    if not q_hi > q_lo:  # more than 99.8 % of the subsample is one value: fall back to the full range
        q_lo, q_hi = float(flat.min()), float(flat.max())
        if not q_hi > q_lo:
            raise MicrographError("image is constant: its pixel histogram has a single value")
    pad = 0.25 * (q_hi - q_lo)
    lo, hi = q_lo - pad, q_hi + pad
    integer = np.issubdtype(x.dtype, np.integer) or bool(np.all(sub == np.round(sub)))
    if integer and hi - lo <= bins:
        lo, hi = math.floor(lo) - 0.5, math.ceil(hi) + 0.5
        bins = int(round(hi - lo))
    width = (hi - lo) / bins
    # Bin index + 1, clipped to [0, bins + 1]: 0 and bins + 1 collect the pixels outside the range.
    t = np.empty(flat.shape, dtype=np.float32)
    if flat.dtype == np.float32:
        np.subtract(flat, np.float32(lo), out=t)
    else:
        np.subtract(flat, lo, out=t, casting="unsafe")
    t *= np.float32(1.0 / width)
    t += np.float32(1.0)
    np.clip(t, np.float32(0.0), np.float32(bins + 1), out=t)
    counts = np.bincount(t.astype(np.int32), minlength=bins + 2)[1 : bins + 1].astype(np.float64)
    centres = lo + (np.arange(bins) + 0.5) * width
    return centres, counts, width


def pixel_histogram(image, bins: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Pixel histogram of one image over its robust range (see the module docstring).

    Returns
    -------
    centres : ndarray, shape (B,)
        Bin centres (``B = bins``, or fewer for integer images with few levels).
    counts : ndarray, shape (B,)
        Pixel counts.
    """
    centres, counts, _ = _histogram(_as_image(image), int(bins))
    return centres, counts


# ----------------------------------------------------------------------------------------------------------------
# The mixture


@dataclass
class GMM:
    """A two-component Gaussian mixture on scale-normalized pixels ``y = x / a_k``.

    Attributes
    ----------
    p : float
        Weight of component 1 (component 0 has weight ``1 - p``); ``p = 0`` means a single component.
    mu0, mu1 : float
        Means (``mu0 <= mu1`` for a fitted mixture).
    s0, s1 : float
        Standard deviations (> 0).
    """

    p: float
    mu0: float
    mu1: float
    s0: float
    s1: float

    def __post_init__(self):
        for name in ("p", "mu0", "mu1", "s0", "s1"):
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise ModelError(f"GMM parameter {name} must be finite, got {value}")
            setattr(self, name, value)
        if not 0.0 <= self.p <= 1.0:
            raise ModelError(f"GMM weight p must lie in [0, 1], got {self.p}")
        if not (self.s0 > 0 and self.s1 > 0):
            raise ModelError(f"GMM standard deviations must be > 0, got s0={self.s0}, s1={self.s1}")

    @property
    def dominant(self) -> tuple[float, float]:
        """``(mu, s)`` of the dominant component: ``(mu0, s0)`` if ``p < 0.5`` else ``(mu1, s1)``."""
        return (self.mu0, self.s0) if self.p < 0.5 else (self.mu1, self.s1)

    def to_dict(self) -> dict:
        """Plain floats (safe inside a ``torch.load(weights_only=True)`` checkpoint)."""
        return {"p": self.p, "mu0": self.mu0, "mu1": self.mu1, "s0": self.s0, "s1": self.s1}

    @classmethod
    def from_dict(cls, d: dict) -> GMM:
        missing = [k for k in ("p", "mu0", "mu1", "s0", "s1") if k not in d]
        if missing:
            raise ModelError(f"GMM parameters are missing {missing} (got keys {sorted(d)})")
        return cls(p=d["p"], mu0=d["mu0"], mu1=d["mu1"], s0=d["s0"], s1=d["s1"])

    def _params(self):
        return np.array([1.0 - self.p, self.p]), np.array([self.mu0, self.mu1]), np.array([self.s0, self.s1])


@dataclass
class GMMFit:
    """The result of :func:`fit_gmm`.

    Attributes
    ----------
    gmm : GMM
    scales : ndarray, shape (K,)
        Scale factor a_k of each micrograph (geometric mean 1).
    loglik : list of float
        Mean log-likelihood per pixel (histogram approximation) before each EM iteration of the chosen start
        (non-decreasing).
    n_iter : int
        EM iterations of the chosen start (including its share of the initial short runs).
    converged : bool
        Whether the change of ``loglik`` fell below ``tol`` before ``max_iter``.
    collapsed : bool
        True when one Gaussian explained the data as well (BIC) and the mixture was collapsed to it (``p = 0``).
    """

    gmm: GMM
    scales: np.ndarray
    loglik: list
    n_iter: int
    converged: bool
    collapsed: bool = False


def _as_image_list(images) -> list:
    if isinstance(images, np.ndarray) or hasattr(images, "__array__") and not isinstance(images, (list, tuple)):
        arr = np.asarray(images)
        if arr.ndim == 2:
            return [arr]
        if arr.ndim == 3:
            return list(arr)
        raise MicrographError(f"expected one (H, W) image or an (N, H, W) stack, got shape {arr.shape}")
    out = list(images)
    if not out:
        raise MicrographError("no micrographs given")
    return out


def _log_weights(w):
    """log of the mixing weights, with log 0 replaced by a huge negative number (no -inf, no warnings)."""
    return np.log(np.maximum(w, 1e-300))


def _e_step(c, n, a, w, mu, s):
    """Responsibilities of both components, shape (2, K, B), the scaled bin centres ``y = c / a_k`` (K, B), and
    the mean log-likelihood per pixel.

    The density of a pixel x of image k is ``sum_z w_z N(x / a_k; mu_z, s_z^2) / a_k``.
    """
    y = c * (1.0 / a)[:, None]
    d = (y[None] - mu[:, None, None]) * (1.0 / s)[:, None, None]
    log_p = (_log_weights(w) - np.log(s))[:, None, None] - 0.5 * (d * d)
    lse = np.logaddexp(log_p[0], log_p[1])
    r = np.exp(log_p - lse)
    n_k = n.sum(axis=1)
    ll = (float(np.vdot(n, lse)) - float(n_k @ np.log(a))) / float(n_k.sum()) - _LOG_SQRT_2PI
    return r, y, ll


def _scale_step(c, n, wz, mu, s):
    """The closed-form maximisation over b = 1/a_k given the weighted counts ``wz = n * r`` (2, K, B) and the
    mixture: new a (K,)."""
    iv = 1.0 / (s * s)
    A = iv @ np.einsum("zkb,kb->zk", wz, c * c)
    B = (mu * iv) @ np.einsum("zkb,kb->zk", wz, c)
    N = n.sum(axis=1)
    b = (B + np.sqrt(B * B + 4.0 * A * N)) / (2.0 * A)
    return 1.0 / b


def _ecm_step(c, n, floor, theta, fixed_mixture):
    """One ECM iteration from ``theta = (a, w, mu, s)``: the new parameters and the log-likelihood at the old ones."""
    a, w, mu, s = theta
    r, y, ll = _e_step(c, n, a, w, mu, s)
    wz = n * r
    if not fixed_mixture:
        tot = wz.sum(axis=(1, 2))
        n_tot = float(tot.sum())
        flat = wz.reshape(2, -1)
        yv = y.ravel()
        keep = tot > 1e-9 * n_tot  # an empty component keeps its parameters (and weight ~0)
        safe = np.where(keep, tot, 1.0)
        new_mu = (flat @ yv) / safe
        dev = yv[None, :] - new_mu[:, None]  # centred, so a large offset costs no precision
        var = np.einsum("zi,zi->z", flat, dev * dev) / safe
        w = tot / n_tot
        mu = np.where(keep, new_mu, mu)
        s = np.where(keep, np.maximum(np.sqrt(var), floor), s)
    a = _scale_step(c, n, wz, mu, s)
    if not fixed_mixture:
        a, mu, s = _renormalize(a, mu, s)
    return (a, w, mu, s), ll


def _renormalize(a, mu, s):
    """Scales to geometric mean 1, the mixture rescaled so that the likelihood is unchanged."""
    g = math.exp(float(np.log(a).mean()))
    return a / g, mu * g, s * g


def _pack(theta, fixed_mixture, unit):
    """Parameters as one unconstrained vector (log scales; logit weight, means in ``unit``s, log sds)."""
    a, w, mu, s = theta
    if fixed_mixture:
        return np.log(a)
    p = min(max(float(w[1]), 1e-12), 1.0 - 1e-12)
    return np.concatenate([np.log(a), [math.log(p / (1.0 - p))], mu / unit, np.log(s)])


def _unpack(v, theta, fixed_mixture, unit, floor):
    K = theta[0].size
    a = np.exp(v[:K])
    if fixed_mixture:
        return (a,) + tuple(theta[1:])
    p = 1.0 / (1.0 + math.exp(-float(v[K])))
    return a, np.array([1.0 - p, p]), v[K + 1 : K + 3] * unit, np.maximum(np.exp(v[K + 3 : K + 5]), floor)


def _em(c, n, floor, a, w, mu, s, max_iter, tol, fixed_mixture=False, accelerate=True):
    """Run ECM from (a, w, mu, s) for at most ``max_iter`` steps, until the mean log-likelihood per pixel changes
    by less than ``tol``. Returns (a, w, mu, s, loglik before each step, steps taken, converged).

    With ``accelerate``, every two ECM steps are followed by a squared extrapolation (SQUAREM, Varadhan & Roland
    2008): from theta0 -> theta1 -> theta2, with ``r = theta1 - theta0`` and ``v = theta2 - 2 theta1 + theta0``
    (in the unconstrained parametrisation of :func:`_pack`), the point ``theta0 - 2 alpha r + alpha^2 v``,
    ``alpha = -|r| / |v|``, is kept only if its log-likelihood is at least that of theta1; otherwise the run
    goes on from theta2. Overlapping components make plain EM crawl for hundreds of steps; this cuts the steps
    several-fold and keeps the recorded log-likelihood non-decreasing. Rejected extrapolations are not counted
    as steps.
    """
    theta = (a, w, mu, s)
    unit = float(np.max(s)) if not fixed_mixture else 1.0
    lls: list = []

    def step(th):
        """ECM from th; True when the log-likelihood at th ends the run (recorded either way)."""
        new, ll = _ecm_step(c, n, floor, th, fixed_mixture)
        done = bool(lls) and abs(ll - lls[-1]) < tol
        lls.append(ll)
        return new, done

    while len(lls) < max_iter:
        th1, done = step(theta)
        if done:
            break
        if len(lls) >= max_iter:
            theta = th1
            break
        if not accelerate:
            theta = th1
            continue
        th2, done = step(th1)
        if done:
            theta = th1
            break
        v0, v1, v2 = (_pack(t, fixed_mixture, unit) for t in (theta, th1, th2))
        r, v = v1 - v0, v2 - 2.0 * v1 + v0
        nr, nv = float(np.linalg.norm(r)), float(np.linalg.norm(v))
        alpha = max(-nr / nv, -64.0) if nv > 0 and math.isfinite(nr / nv) else -1.0
        theta = th2
        if alpha < -1.0 and len(lls) < max_iter:
            trial = _unpack(v0 - 2.0 * alpha * r + alpha * alpha * v, theta, fixed_mixture, unit, floor)
            if all(np.all(np.isfinite(x)) for x in trial) and np.all(trial[0] > 0):
                new, ll = _ecm_step(c, n, floor, trial, fixed_mixture)
                if math.isfinite(ll) and ll >= lls[-1]:
                    done = abs(ll - lls[-1]) < tol
                    lls.append(ll)
                    theta = trial if done else new
                    if done:
                        break
    converged = len(lls) >= 2 and abs(lls[-1] - lls[-2]) < tol
    a, w, mu, s = theta
    return a, w, mu, s, lls, len(lls), converged


def _weighted_quantile(values, weights, q):
    order = np.argsort(values, kind="stable")
    v, cw = values[order], np.cumsum(weights[order])
    return np.interp(np.asarray(q) * cw[-1], cw, v)


def _single_gaussian(c, n, a, floor, iters=100, tol=1e-9):
    """Fit one Gaussian with per-image scales: (a, mu, s, mean loglik)."""
    mu = s = None
    ll_prev = None
    N = n.sum()
    for _ in range(iters):
        y = c / a[:, None]
        mu = float((n * y).sum() / N)
        s = max(math.sqrt(float((n * (y - mu) ** 2).sum() / N)), floor)
        a = _scale_step(c, n, np.stack([n, np.zeros_like(n)]), np.array([mu, mu]), np.array([s, s]))
        g = math.exp(float(np.mean(np.log(a))))
        a, mu, s = a / g, mu * g, s * g
        y = c / a[:, None]
        ll = float((n * (-_LOG_SQRT_2PI - math.log(s) - np.log(a)[:, None] - 0.5 * ((y - mu) / s) ** 2)).sum() / N)
        if ll_prev is not None and abs(ll - ll_prev) < tol:
            break
        ll_prev = ll
    return a, mu, s, ll


def fit_gmm(images, *, bins: int = 256, max_iter: int = 200, tol: float = 1e-7, init: GMM | None = None
            ) -> GMMFit:
    """Fit the shared two-component mixture with one scale factor per micrograph (see the module docstring).

    Parameters
    ----------
    images : array_like (H, W) or (K, H, W), or a sequence of K arrays (H_k, W_k)
        The micrographs (already downsampled if they will be).
    bins : int
        Histogram bins per micrograph.
    max_iter : int
        Maximum EM iterations.
    tol : float
        Convergence: change of the mean log-likelihood per pixel between iterations.
    init : GMM, optional
        Start from this mixture (one start) instead of the quantile starts.

    Returns
    -------
    GMMFit
    """
    imgs = [_as_image(im, f"micrograph {i}") for i, im in enumerate(_as_image_list(images))]
    hists = [_histogram(im, int(bins)) for im in imgs]
    nb = max(h[0].size for h in hists)
    K = len(hists)
    c = np.zeros((K, nb))
    n = np.zeros((K, nb))
    for k, (ck, nk, _) in enumerate(hists):
        c[k, : ck.size] = ck
        c[k, ck.size :] = ck[-1]  # padding bins with zero counts
        n[k, : nk.size] = nk
    n_tot = float(n.sum())
    if n_tot <= 0:
        raise MicrographError("no pixels to fit")

    # Initial scales: root mean square per image, geometric mean 1.
    rms = np.sqrt((n * c * c).sum(axis=1) / n.sum(axis=1))
    if not np.all(rms > 0):
        raise MicrographError("cannot fit a GMM to an all-zero micrograph")
    widths = np.array([h[2] for h in hists])

    if init is not None:
        w0, mu0, s0 = init._params()
        a0 = rms / math.sqrt(float(np.sum(w0 * (mu0**2 + s0**2))))
        starts = [(a0, w0, mu0, s0)]
    else:
        a0 = rms / math.exp(float(np.mean(np.log(rms))))
        y0 = c / a0[:, None]
        yv, yw = y0.ravel(), n.ravel()
        q = _weighted_quantile(yv, yw, [0.05, 0.25, 0.5, 0.75, 0.95])
        mean = float((yw * yv).sum() / n_tot)
        sd = math.sqrt(float((yw * (yv - mean) ** 2).sum() / n_tot))
        starts = [
            (a0, np.array([0.5, 0.5]), np.array([q[1], q[3]]), np.array([sd, sd]) * 0.5),
            (a0, np.array([0.8, 0.2]), np.array([q[2], q[4]]), np.array([sd, sd]) * 0.5),
            (a0, np.array([0.2, 0.8]), np.array([q[0], q[2]]), np.array([sd, sd]) * 0.5),
        ]
    floor = float(np.max(widths / a0))
    best = None
    for a, w, mu, s in starts:
        s = np.maximum(s, floor)
        res = _em(c, n, floor, a, w, mu, s, min(_N_INIT_ITER, max_iter), tol)
        if best is None or res[4][-1] > best[4][-1]:
            best = res
    a, w, mu, s, lls, steps, converged = best
    if not converged and steps < max_iter:
        a, w, mu, s, more, more_steps, converged = _em(c, n, floor, a, w, mu, s, max_iter - steps, tol)
        lls = lls + more
        steps += more_steps

    # Degenerate data: does one Gaussian do as well (BIC, 3 extra parameters)?
    a1, m1, sd1, ll1 = _single_gaussian(c, n, a0.copy(), floor)
    collapsed = 2.0 * (lls[-1] - ll1) * n_tot < 3.0 * math.log(n_tot)
    if collapsed:
        gmm = GMM(p=0.0, mu0=m1, mu1=m1, s0=sd1, s1=sd1)
        a = a1
    else:
        if mu[0] > mu[1]:
            w, mu, s = w[::-1], mu[::-1], s[::-1]
        gmm = GMM(p=float(w[1]), mu0=float(mu[0]), mu1=float(mu[1]), s0=float(s[0]), s1=float(s[1]))
    return GMMFit(gmm=gmm, scales=np.asarray(a, dtype=np.float64), loglik=[float(v) for v in lls],
                  n_iter=int(steps), converged=bool(converged), collapsed=bool(collapsed))


def estimate_scale(image, gmm: GMM, *, bins: int = 256, max_iter: int = 200, tol: float = 1e-9) -> float:
    """Scale factor a of a new micrograph under a fitted mixture (EM over a alone, the mixture fixed).

    Parameters
    ----------
    image : array_like, shape (H, W)
    gmm : GMM

    Returns
    -------
    float
        ``a > 0``.
    """
    x = _as_image(image)
    centres, counts, _ = _histogram(x, int(bins))
    c, n = centres[None, :], counts[None, :]
    w, mu, s = gmm._params()
    rms = math.sqrt(float((n * c * c).sum() / n.sum()))
    if not rms > 0:
        raise MicrographError("cannot estimate the scale of an all-zero micrograph")
    a = np.array([rms / math.sqrt(float(np.sum(w * (mu**2 + s**2))))])
    a, *_ = _em(c, n, 0.0, a, w, mu, s, max_iter, tol, fixed_mixture=True)
    return float(a[0])


def gmm_normalize(image, gmm: GMM, scale: float | None = None) -> np.ndarray:
    """Normalize one micrograph: ``x' = (x / a - mu) / s`` with (mu, s) the dominant component.

    Parameters
    ----------
    image : array_like, shape (H, W)
    gmm : GMM
    scale : float, optional
        The micrograph's scale factor a; estimated with :func:`estimate_scale` when not given.

    Returns
    -------
    ndarray, shape (H, W), float32
    """
    x = _as_image(image)
    a = estimate_scale(x, gmm) if scale is None else float(scale)
    if not a > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    mu, s = gmm.dominant
    out = x.astype(np.float32)
    out *= np.float32(1.0 / (a * s))
    out -= np.float32(mu / s)
    return out


def mixture_curve(images, gmm: GMM, scales=None, bins: int = 256, span: float = 4.0):
    """What a widget plots: the pooled histogram of normalized pixels and the two fitted components over it.

    Parameters
    ----------
    images : array_like (H, W) or (K, H, W), or a sequence of arrays
        Micrographs as given to the fit (downsampled, not normalized).
    gmm : GMM
    scales : array_like, shape (K,), optional
        Their scale factors (estimated per image when not given).
    bins : int
        Histogram bins.
    span : float
        The x range covers every component's mean +- ``span`` of its standard deviation.

    Returns
    -------
    centres : ndarray, shape (bins,)
        Bin centres in normalized units.
    density : ndarray, shape (bins,)
        Histogram of the normalized pixels, as a density (integrates to the fraction of pixels in range).
    pdf0, pdf1 : ndarray, shape (bins,)
        The weighted component densities ``(1 - p) N(.)`` and ``p N(.)`` in normalized units (their sum is the
        mixture density).
    """
    imgs = _as_image_list(images)
    if scales is None:
        scales = [estimate_scale(im, gmm) for im in imgs]
    scales = np.asarray(scales, dtype=np.float64).ravel()
    if scales.size != len(imgs):
        raise ValueError(f"got {scales.size} scales for {len(imgs)} images")
    mu, s = gmm.dominant
    w, mus, sds = gmm._params()
    m_norm = (mus - mu) / s
    s_norm = sds / s
    used = w > 0
    lo = float(np.min((m_norm - span * s_norm)[used]))
    hi = float(np.max((m_norm + span * s_norm)[used]))
    width = (hi - lo) / bins
    counts = np.zeros(bins + 2)
    total = 0
    for im, a in zip(imgs, scales):
        v = gmm_normalize(im, gmm, scale=a).ravel()
        t = (v - np.float32(lo)) * np.float32(1.0 / width) + np.float32(1.0)
        np.clip(t, 0, bins + 1, out=t)
        counts += np.bincount(t.astype(np.intp), minlength=bins + 2)
        total += v.size
    centres = lo + (np.arange(bins) + 0.5) * width
    density = counts[1 : bins + 1] / (total * width)
    pdfs = [w[z] * np.exp(-0.5 * ((centres - m_norm[z]) / s_norm[z]) ** 2) / (s_norm[z] * math.sqrt(2 * math.pi))
            for z in range(2)]
    return centres, density, pdfs[0], pdfs[1]


# ----------------------------------------------------------------------------------------------------------------
# The preprocessor stored with a model


@dataclass
class Preprocessor:
    """Downsampling and normalization settings, fit once and applied to every micrograph.

    Attributes
    ----------
    downsample : int
        Integer binning factor (1 = none).
    method : str
        ``"gmm"`` (dataset-wide mixture), ``"affine"`` ((x - mean) / std per image) or ``"none"``.
    gmm : GMM, optional
        The fitted mixture (``method == "gmm"`` only; set by :meth:`fit`).
    """

    downsample: int = 1
    method: str = "gmm"
    gmm: GMM | None = None
    scales_: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.downsample = _check_factor(self.downsample)
        if self.method not in METHODS:
            raise ValueError(f"unknown normalization method {self.method!r} (use one of {', '.join(METHODS)})")

    def _bin(self, image, what="image") -> np.ndarray:
        return _fourier_bin(_as_image(image, what), self.downsample)

    def fit(self, images) -> Preprocessor:
        """Fit the normalization on raw micrographs (downsampled first). Returns ``self``."""
        if self.method == "gmm":
            binned = [self._bin(im, f"micrograph {i}") for i, im in enumerate(_as_image_list(images))]
            result = fit_gmm(binned)
            self.gmm = result.gmm
            self.scales_ = result.scales
        return self

    def _normalize(self, binned: np.ndarray, scale: float | None = None) -> np.ndarray:
        if self.method == "gmm":
            if self.gmm is None:
                raise ModelError("this GMM preprocessor has not been fit: call fit(micrographs) first")
            return gmm_normalize(binned, self.gmm, scale)
        if self.method == "affine":
            return affine_normalize(binned)
        return binned.astype(np.float32, copy=False)

    def transform(self, image) -> np.ndarray:
        """Downsample then normalize one raw micrograph: float32 of shape (H // downsample, W // downsample)."""
        if self.method == "gmm" and self.gmm is None:
            raise ModelError("this GMM preprocessor has not been fit: call fit(micrographs) first")
        return self._normalize(self._bin(image))

    def fit_transform(self, images) -> list:
        """Fit on the micrographs, then return them transformed (using their fitted scale factors).

        ``images`` may be an iterator (for example of micrographs read one by one): each raw micrograph is
        downsampled as it comes and only the binned images are kept, so a large dataset is read once and never
        held in memory at full size.
        """
        imgs = images if not isinstance(images, np.ndarray) else _as_image_list(images)
        if self.method != "gmm":
            return [self.transform(im) for im in imgs]
        binned = [self._bin(im, f"micrograph {i}") for i, im in enumerate(imgs)]
        if not binned:
            raise MicrographError("no micrographs given")
        result = fit_gmm(binned)
        self.gmm, self.scales_ = result.gmm, result.scales
        return [self._normalize(b, float(a)) for b, a in zip(binned, result.scales)]

    def to_dict(self) -> dict:
        """Plain Python types only (stored in model checkpoints)."""
        return {"downsample": int(self.downsample), "method": str(self.method),
                "gmm": None if self.gmm is None else self.gmm.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessor:
        try:
            gmm = d.get("gmm")
            return cls(downsample=int(d.get("downsample", 1)), method=str(d.get("method", "gmm")),
                       gmm=None if gmm is None else GMM.from_dict(gmm))
        except (TypeError, ValueError, AttributeError) as exc:
            raise ModelError(f"invalid preprocessing settings {d!r}: {exc}") from exc
