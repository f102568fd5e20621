"""Defaults a microscopist should not have to choose: binning, edge margin, particle count and threshold.

Everything here is plain numpy/pandas over pick tables (no torch, no napari), so the command line, the napari
session and scripts derive the same defaults from the same data.

- :func:`choose_downsample`: the binning factor that puts the particle radius where the models work best.
- :func:`default_margin`, :func:`label_margin`: the edge margin picks are dropped within (one particle radius,
  less when the labels show particles closer to the border).
- :func:`initial_expected` : a first guess of the particles per micrograph from the particle and micrograph size.
- :func:`calibrate`: the particle count and the threshold, estimated without ground truth from labels that were
  held out of training (positive-unlabeled mixture-proportion estimation; see docs/method.md).
- :func:`threshold_for_count`: the threshold that keeps a given number of picks (carries a calibration over to
  a model trained again with every label).

Lengths are in ORIGINAL micrograph pixels unless a name says ``binned``.

The count and the threshold (:func:`calibrate`)
-----------------------------------------------
A model trained on labels L1 scores the training micrographs; NMS gives candidates down to a floor logit. The
candidates matched to L1 are set aside (known particles); the rest, U, hold every unlabeled particle, among them
the labels H that were held out of training. Assumption: H is a random sample of the unlabeled particles (the
person clicked particles without favouring the easy ones), so the scores of H's candidates are a sample of the
particles' score distribution, and the fraction of H with no candidate at all (``1 - r_max``) is the fraction of
particles NMS never proposes.

The scores of U are modelled as a mixture ``w f_p + (1 - w) f_b``: ``f_p``, the particles' score density, is a
kernel density estimate of H's scores (a wide kernel, twice Silverman's bandwidth, so that a few dozen labels give
a smooth shape), and ``f_b``, the background's, is a gamma density of the score above the floor (it covers both
the decaying background of a good model and the bump of a poor one). Only ``w`` and the gamma's two parameters
are fit, by maximum likelihood over the thousands of candidates of U, which is what makes the count precise: the
held-out labels alone (``n_U <= N_U(t) / R(t)``) bound it only to within 20-40 % with 33 labels. Then

    n_U = w |U| / r_max,   R(t) = r_max S_p(t),   P(t) = min(1, w |U| S_p(t) / N_U(t))

(``S_p`` the survival function of ``f_p``, ``N_U(t)`` the candidates of U at or above t), and the calibrated
threshold maximises the estimated F1 = 2 P R / (P + R). On the shared sets the F1 of a good model falls by 0.02-0.03
when the number of picks is 10 % off its optimum, which sets the precision the count needs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

__all__ = [
    "BINNED_RADIUS_RANGE",
    "TARGET_BINNED_RADIUS",
    "Binning",
    "Calibration",
    "binning_warning",
    "calibrate",
    "choose_downsample",
    "default_margin",
    "model_margin",
    "initial_expected",
    "label_margin",
    "label_scores",
    "parse_downsample",
    "threshold_for_count",
]

#: The binned particle radius (pixels) the automatic binning aims at, and the range outside which a factor given
#: by hand gets a warning. Measured with ``benchmarks/bench_defaults.py binning`` on the three shared sets (conv3
#: with stem stride 2, receptive field 43 px): AP is flat for binned radii 10-15 px, 0.005-0.05 lower at 7.5, 0.02-0.14 lower at 6,
#: and collapses at 30 (0.38 on apoferritin). See docs/benchmarks.md.
TARGET_BINNED_RADIUS = 12.0
BINNED_RADIUS_RANGE = (8.0, 18.0)
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
        """One line for a log or a tooltip, e.g. ``binning 2 (auto): particle radius 30 px -> 15 binned px``."""
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


def binning_warning(factor: int, radius: float, suggest: bool = True) -> str | None:
    """A warning when ``radius / factor`` lies outside :data:`BINNED_RADIUS_RANGE` (else None)."""
    r = _check_radius(radius)
    f = int(factor)
    binned = r / f
    lo, hi = BINNED_RADIUS_RANGE
    if lo <= binned <= hi:
        return None
    side = "large" if binned > hi else "small"
    text = (f"binning {f} makes the particle radius {binned:.3g} binned px, too {side} for the network (it works "
            f"best at {lo:g}-{hi:g} px)")
    best = choose_downsample(r).factor if suggest else f
    if best != f:
        text += f"; binning {best} gives {r / best:.3g} px"
    return text


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
        :data:`BINNED_RADIUS_RANGE`); ``'auto'`` or None chooses the factor whose binned radius is nearest to
        :data:`TARGET_BINNED_RADIUS` on a log scale (1 to :data:`MAX_AUTO_FACTOR`), so every radius from 8 px up
        lands in the range.

    Returns
    -------
    Binning
    """
    r = _check_radius(radius)
    px = float(pixel_size) if pixel_size and math.isfinite(float(pixel_size)) and float(pixel_size) > 0 else None
    if factor is None or (isinstance(factor, str) and factor.strip().lower() == "auto"):
        f = min(range(1, MAX_AUTO_FACTOR + 1), key=lambda k: abs(math.log(r / (k * TARGET_BINNED_RADIUS))))
        return Binning(f, r, r / f, px, auto=True, warning=binning_warning(f, r, suggest=False))
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


def model_margin(metrics: dict | None, radius: float | None) -> float:
    """A model's edge margin in original pixels: ``metrics["margin"]`` (chosen at training by
    :func:`label_margin`), else :func:`default_margin` of ``radius`` (0 when the radius is unknown)."""
    m = (metrics or {}).get("margin")
    if m is not None and np.isfinite(float(m)):
        return float(m)
    return default_margin(radius) if radius else 0.0


def label_margin(labels: pd.DataFrame, shapes: dict, radius: float) -> float:
    """The edge margin the labels allow: one particle radius, or less when a label lies closer to a border.

    Parameters
    ----------
    labels : DataFrame
        ``micrograph, x, y`` (pixels).
    shapes : dict
        ``name -> (H, W)`` of each micrograph (same pixels).
    radius : float
        Particle radius (same pixels).

    Returns
    -------
    float
        ``min(radius, distance of the label nearest to a border)``, at least 0. A person who clicks a particle at
        the border says such particles count; one who clicks none there leaves the full margin, which drops the
        stripes and half particles many micrographs carry along their borders.
    """
    m = default_margin(radius)
    for name, rows in labels.groupby("micrograph"):
        if name not in shapes or len(rows) == 0:
            continue
        h, w = shapes[name][-2:]
        x, y = rows["x"].to_numpy(float), rows["y"].to_numpy(float)
        d = np.minimum.reduce([x, y, (w - 1) - x, (h - 1) - y])
        m = min(m, float(np.max([d.min(), 0.0])))
    return m


def initial_expected(radius: float, shape: tuple, coverage: float = 0.25) -> float:
    """A first guess of particles per micrograph: ``coverage`` of the micrograph area covered by particle discs.

    Used only to start training when no count is given; the count is then estimated from the trained model.
    The shared real sets cover 0.20 (ribosome), 0.31 (apoferritin) and 0.50 (EMPIAR-10947) of their area.
    """
    r = _check_radius(radius)
    h, w = (float(shape[-2]), float(shape[-1]))
    return max(1.0, coverage * h * w / (math.pi * r * r))


def max_particles(radius: float, shape: tuple) -> float:
    """The most particles of ``radius`` that fit on a micrograph of ``shape`` (hexagonal packing of discs)."""
    r = _check_radius(radius)
    return 0.9069 * float(shape[-2]) * float(shape[-1]) / (math.pi * r * r)


# ----------------------------------------------------------------------------------------------------------------
# Count and threshold from held-out labels


@dataclass
class Calibration:
    """What :func:`calibrate` estimated (counts per micrograph, thresholds as logits).

    Attributes
    ----------
    threshold : float
        The calibrated logit threshold (maximum of the estimated F1).
    expected_particles : float
        Estimated particles per micrograph (labelled ones included).
    label_recall : float
        Recall of the held-out labels at ``threshold``.
    precision : float
        Estimated precision at ``threshold``.
    f1 : float
        Estimated F1 at ``threshold``.
    picks_per_micrograph : float
        Candidates at or above ``threshold`` per training micrograph (labelled ones included).
    mixture_weight : float
        The fitted mixture weight ``w`` of particles among the unlabeled candidates.
    n_heldout : int
        Held-out labels the estimate rests on.
    n_micrographs : int
        Micrographs the candidates came from.
    """

    threshold: float
    expected_particles: float
    label_recall: float
    precision: float
    f1: float
    picks_per_micrograph: float
    mixture_weight: float
    n_heldout: int
    n_micrographs: int

    def to_dict(self) -> dict:
        return {k: float(v) if isinstance(v, (float, np.floating)) else int(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def label_scores(candidates: pd.DataFrame, labels: pd.DataFrame, radius: float) -> np.ndarray:
    """The best candidate score within ``radius`` of each label, on the label's micrograph (-inf if none).

    Parameters
    ----------
    candidates : DataFrame
        ``micrograph, x, y, score``.
    labels : DataFrame
        ``micrograph, x, y``.
    radius : float
        Match radius (pixels of both tables).

    Returns
    -------
    ndarray, shape (len(labels),)
    """
    from scipy.spatial import cKDTree

    out = np.full(len(labels), -np.inf)
    if len(labels) == 0 or len(candidates) == 0:
        return out
    lab_names = labels["micrograph"].astype(str).to_numpy()
    cand_names = candidates["micrograph"].astype(str).to_numpy()
    for name in np.unique(lab_names):
        rows = np.flatnonzero(lab_names == name)
        sel = cand_names == name
        if not sel.any():
            continue
        xy = candidates.loc[sel, ["x", "y"]].to_numpy(float)
        score = candidates.loc[sel, "score"].to_numpy(float)
        tree = cKDTree(xy)
        for r, near in zip(rows, tree.query_ball_point(labels.iloc[rows][["x", "y"]].to_numpy(float), radius)):
            if near:
                out[r] = float(np.max(score[near]))
    return out


def _unmatched(candidates: pd.DataFrame, labels: pd.DataFrame | None, radius: float) -> pd.DataFrame:
    """The candidates left after the best candidate near each label is set aside."""
    from napari_pupick.metrics import match_picks

    if labels is None or len(labels) == 0 or len(candidates) == 0:
        return candidates
    hit = match_picks(candidates, labels, radius)
    return candidates.loc[~hit]


#: The mixture's count is trusted when within this factor of the labels' own estimate (:func:`label_bound`).
FALLBACK_RATIO = 2.5


def label_bound(u_scores: np.ndarray, h_scores: np.ndarray, n_heldout: int) -> float:
    """Unlabeled particles (with or without a candidate), from the held-out labels alone (noisy: 20-40 % with 33
    labels).

    With the held-out labels' scores ``h`` sorted down, ``k (n_h + 1) / N_U(h_k)`` estimates the share of
    particles among the top candidates where they are pure; the counts are pooled over the top ``k <= K`` labels
    (sums, not ratios, so the few labels at the very top do not dominate) and the smallest pooled estimate with
    ``K >= max(3, n_h / 4)`` is returned. It is an estimate of ``n_U`` (an upper bound where no score range is pure).
    """
    h = np.sort(np.asarray(h_scores, float)[np.isfinite(h_scores)])[::-1]
    if h.size == 0:
        return 0.0
    u = np.sort(np.asarray(u_scores, float))
    k = np.arange(1, h.size + 1, dtype=float)
    n_u = np.maximum(u.size - np.searchsorted(u, h, side="left"), k)
    pooled = np.cumsum(n_u) / np.cumsum(k) * (n_heldout + 1)
    k0 = min(max(3, int(math.ceil(n_heldout / 4))), h.size)
    return float(pooled[k0 - 1 :].min())


def _kde(points: np.ndarray, floor: float, widen: float = 2.0):
    """Density and survival function of a Gaussian KDE of ``points``, truncated to scores above ``floor``."""
    from scipy import stats

    pts = np.asarray(points, float)
    sd = float(np.std(pts)) if pts.size > 1 else 1.0
    iqr = float(np.subtract(*np.percentile(pts, [75, 25]))) / 1.349 if pts.size > 1 else sd
    spread = min(sd, iqr) if iqr > 0 else sd
    bw = widen * 0.9 * max(spread, 0.1) * pts.size ** -0.2
    mass = float(stats.norm.sf((floor - pts) / bw).mean())

    def pdf(x):
        x = np.asarray(x, float)
        return stats.norm.pdf((x[..., None] - pts) / bw).mean(-1) / (bw * mass)

    def sf(x):
        x = np.asarray(x, float)
        return stats.norm.sf((x[..., None] - pts) / bw).mean(-1) / mass

    return pdf, sf


def _mixture_weight(u: np.ndarray, fp_u: np.ndarray, floor: float) -> float:
    """Maximum-likelihood weight ``w`` of the particle density in ``w f_p + (1 - w) gamma(u - floor)``."""
    from scipy import optimize, stats

    y = np.maximum(u - floor, 1e-6)

    def nll(th):
        w = 1.0 / (1.0 + math.exp(-th[0]))
        fb = stats.gamma.pdf(y, math.exp(th[1]), scale=math.exp(th[2]))
        return -float(np.log(w * fp_u + (1 - w) * fb + 1e-300).sum())

    med = float(np.median(y))
    best = None
    for w0, a0 in ((-2.0, 1.0), (0.0, 1.0), (-1.0, 4.0)):
        res = optimize.minimize(nll, [w0, math.log(a0), math.log(max(med / a0, 0.05))], method="L-BFGS-B",
                                bounds=[(-12, 12), (-4, 6), (-8, 6)])
        if best is None or res.fun < best.fun:
            best = res
    return 1.0 / (1.0 + math.exp(-best.x[0]))


def calibrate(candidates: pd.DataFrame, heldout: pd.DataFrame, trained: pd.DataFrame | None, radius: float,
              n_micrographs: int, *, floor: float = -6.0, max_expected: float | None = None) -> Calibration:
    """Estimate the particle count and the F1-optimal threshold from labels held out of training.

    Parameters
    ----------
    candidates : DataFrame
        ``micrograph, x, y, score``: every NMS candidate (scores above ``floor``) of the micrographs the labels lie
        on, from a model that did not train on ``heldout``.
    heldout : DataFrame
        ``micrograph, x, y``: labels held out of the training (at least 1).
    trained : DataFrame or None
        Labels the model trained on (their candidates are set aside as known particles).
    radius : float
        Match radius (a label is found by a candidate this close).
    n_micrographs : int
        Micrographs the candidates come from.
    floor : float
        The NMS threshold the candidates were extracted with (their scores are above it).
    max_expected : float, optional
        Cap of the estimated particles per micrograph (e.g. :func:`max_particles`).

    Returns
    -------
    Calibration
    """
    n_h = len(heldout)
    if n_h == 0:
        raise ValueError("calibration needs at least one held-out label")
    n_mics = max(int(n_micrographs), 1)
    n_trained = 0 if trained is None else len(trained)
    unl = _unmatched(candidates, trained, radius)
    u = unl["score"].to_numpy(float)
    h_all = label_scores(unl, heldout, radius)
    h = h_all[np.isfinite(h_all)]
    all_scores = candidates["score"].to_numpy(float)
    if h.size == 0 or u.size < 2:  # no held-out label has a candidate: nothing to go on; keep every candidate
        lowest = float(u.min()) if u.size else float(floor)
        return Calibration(lowest, float(len(unl) + n_trained) / n_mics, 0.0, 0.0, 0.0,
                           float(len(candidates)) / n_mics, 0.0, n_h, n_mics)
    r_max = h.size / n_h
    pdf, sf = _kde(h, floor)
    w = _mixture_weight(u, pdf(u), floor)
    n_cand = w * u.size  # particles among U's candidates
    bound = label_bound(u, h, n_h) * r_max
    if not bound / FALLBACK_RATIO <= n_cand <= bound * FALLBACK_RATIO:
        # the mixture found no particle component the labels agree with (a model that barely separates
        # particles): fall back on the labels alone
        n_cand = min(bound, float(u.size))
        w = n_cand / u.size
    n_particles_u = n_cand / r_max
    expected = (n_particles_u + n_trained) / n_mics
    if max_expected is not None and expected > max_expected:
        expected = float(max_expected)
        n_cand = max(expected * n_mics - n_trained, 0.0) * r_max
    # F1 estimate on a grid of thresholds spanning the candidates' scores
    grid = np.unique(np.quantile(u, np.linspace(0.0, 1.0, 401)))
    s_p = sf(grid)
    n_u = np.searchsorted(np.sort(u), grid, side="left")
    n_u = (u.size - n_u).astype(float)  # candidates of U with score >= t
    recall = r_max * s_p
    precision = np.minimum(n_cand * s_p / np.maximum(n_u, 1.0), 1.0)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    best = int(len(f1) - 1 - np.argmax(f1[::-1]))  # ties: the higher threshold
    threshold = float(grid[best])
    label_recall = float(np.count_nonzero(h_all >= threshold)) / n_h
    picks = float(np.count_nonzero(all_scores >= threshold)) / n_mics
    return Calibration(threshold=threshold, expected_particles=float(expected), label_recall=label_recall,
                       precision=float(precision[best]), f1=float(f1[best]), picks_per_micrograph=picks,
                       mixture_weight=float(w), n_heldout=n_h, n_micrographs=n_mics)


def threshold_for_count(scores, n_picks: float) -> float:
    """The logit that keeps the ``n_picks`` best of ``scores`` (``score >= threshold``).

    The threshold lies halfway between the last kept and the first dropped score, so it does not sit on a score.
    """
    s = np.sort(np.asarray(scores, float))[::-1]
    n = int(round(float(n_picks)))
    if s.size == 0:
        return 0.0
    if n <= 0:
        return float(s[0]) + 1e-3
    if n >= s.size:
        return float(s[-1])
    return float(0.5 * (s[n - 1] + s[n]))
