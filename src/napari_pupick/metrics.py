"""Evaluation of picks against ground truth: matching, precision-recall, average precision, thresholds.

Conventions:

- Picks and truth are DataFrames with columns ``x``, ``y`` (pixels) and optionally ``micrograph``; picks also have
  ``score`` (without it, picks are taken in table order). When both tables have ``micrograph``, a pick can only
  match a particle of the same micrograph; picks on a micrograph that has no truth rows are false positives (to
  evaluate a subset of micrographs, filter both tables first).
- Ranking: by score descending; equal scores keep their table order (stable sort).
- Matching: going down the ranking, each pick matches the nearest still-unmatched true particle at distance
  ``<= radius`` (equal distances: the earlier truth row); each particle is matched at most once.
- Average precision: ``AP = sum_k Pr(k) (Re(k) - Re(k-1))`` over the ranked picks, ``Re(0) = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from napari_pupick.errors import CoordinateError

__all__ = ["PRCurve", "average_precision", "evaluate", "fbeta_threshold", "match_picks", "precision_at_recall",
           "precision_recall"]


def _check_table(df: pd.DataFrame, what: str) -> None:
    missing = [c for c in ("x", "y") if c not in df.columns]
    if missing:
        raise CoordinateError(f"{what} table lacks column(s) {missing} (has {list(df.columns)})")


def _rank(picks: pd.DataFrame) -> np.ndarray:
    """Positions of the picks in ranked order (score descending, stable)."""
    if "score" not in picks.columns:
        return np.arange(len(picks))
    scores = picks["score"].to_numpy(dtype=np.float64)
    return np.argsort(-scores, kind="stable")


def _points(df: pd.DataFrame, codes: np.ndarray | None, sep: float) -> np.ndarray:
    xy = df[["x", "y"]].to_numpy(dtype=np.float64)
    if codes is None:
        return xy
    # A third coordinate that puts different micrographs more than the match radius apart.
    return np.column_stack([xy, codes.astype(np.float64) * sep])


def match_picks(picks: pd.DataFrame, truth: pd.DataFrame, radius: float) -> np.ndarray:
    """Whether each pick matches a true particle (see the module docstring for the rules).

    Parameters
    ----------
    picks : DataFrame
        Columns ``x, y`` and optionally ``score``, ``micrograph``.
    truth : DataFrame
        Columns ``x, y`` and optionally ``micrograph``.
    radius : float
        Match radius in pixels (inclusive).

    Returns
    -------
    ndarray of bool, shape (len(picks),)
        One flag per pick, in the order of the input table.
    """
    from scipy.spatial import cKDTree

    _check_table(picks, "picks")
    _check_table(truth, "truth")
    if not radius >= 0:
        raise ValueError(f"match radius must be >= 0, got {radius!r}")
    matched = np.zeros(len(picks), dtype=bool)
    if len(picks) == 0 or len(truth) == 0:
        return matched
    codes_p = codes_t = None
    if "micrograph" in picks.columns and "micrograph" in truth.columns:
        names = pd.Index(pd.unique(pd.concat([truth["micrograph"], picks["micrograph"]], ignore_index=True)
                                   .astype(str)))
        codes_t = names.get_indexer(truth["micrograph"].astype(str))
        codes_p = names.get_indexer(picks["micrograph"].astype(str))
    sep = 4.0 * float(radius) + 1.0
    order = _rank(picks)
    rank_of = np.empty(len(picks), dtype=np.int64)
    rank_of[order] = np.arange(len(picks))
    tree_p = cKDTree(_points(picks, codes_p, sep))
    tree_t = cKDTree(_points(truth, codes_t, sep))
    pairs = tree_p.sparse_distance_matrix(tree_t, float(radius), output_type="ndarray")
    if pairs.size == 0:
        return matched
    i, j, d = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64), pairs["v"]
    # Pairs in matching order: pick rank, then distance, then truth row.
    o = np.lexsort((j, d, rank_of[i]))
    i, j = i[o], j[o]
    taken_t = np.zeros(len(truth), dtype=bool)
    done_p = np.zeros(len(picks), dtype=bool)
    for pi, tj in zip(i.tolist(), j.tolist()):
        if done_p[pi] or taken_t[tj]:
            continue
        done_p[pi] = True
        taken_t[tj] = True
    matched[done_p] = True
    return matched


@dataclass
class PRCurve:
    """Precision and recall after each ranked pick.

    Attributes
    ----------
    precision, recall : ndarray, shape (n_picks,)
        ``Pr(k)`` and ``Re(k)`` for the top k = 1..n picks (recall is 0 when there is no truth).
    thresholds : ndarray, shape (n_picks,)
        The k-th pick's score (keeping picks with ``score >= thresholds[k-1]`` keeps at least the top k).
    n_true : int
        Number of true particles.
    """

    precision: np.ndarray
    recall: np.ndarray
    thresholds: np.ndarray
    n_true: int


def precision_recall(picks: pd.DataFrame, truth: pd.DataFrame, radius: float) -> PRCurve:
    """Precision-recall curve of the ranked picks (see :func:`match_picks`)."""
    hit = match_picks(picks, truth, radius)
    order = _rank(picks)
    tp = np.cumsum(hit[order])
    k = np.arange(1, len(picks) + 1)
    n_true = len(truth)
    precision = tp / k if len(picks) else np.zeros(0)
    recall = tp / n_true if n_true else np.zeros(len(picks))
    if "score" in picks.columns:
        thresholds = picks["score"].to_numpy(dtype=np.float64)[order]
    else:
        thresholds = np.full(len(picks), np.nan)
    return PRCurve(precision=precision.astype(np.float64), recall=np.asarray(recall, dtype=np.float64),
                   thresholds=thresholds, n_true=int(n_true))


def _ap(curve: PRCurve) -> float:
    if curve.n_true == 0:
        return float("nan")
    if curve.recall.size == 0:
        return 0.0
    gain = np.diff(curve.recall, prepend=0.0)
    return float(np.sum(curve.precision * gain))


def average_precision(picks: pd.DataFrame, truth: pd.DataFrame, radius: float) -> float:
    """``sum_k Pr(k) (Re(k) - Re(k-1))`` over the ranked picks; NaN when there is no truth, 0 with no picks."""
    return _ap(precision_recall(picks, truth, radius))


def precision_at_recall(curve: PRCurve, recall: float = 0.9) -> float:
    """Highest precision over the ranks where recall ``>= recall``; 0 if that recall is never reached."""
    reached = curve.recall >= recall - 1e-12
    if not reached.any():
        return 0.0
    return float(curve.precision[reached].max())


def fbeta_threshold(curve: PRCurve, beta: float = 2.0) -> tuple[float, float]:
    """The score threshold maximising F-beta, and that F-beta.

    Only thresholds at which ``score >= threshold`` keeps exactly the top k picks are considered (the last pick
    of a run of equal scores). Ties of F-beta go to the higher threshold. With no picks or no match, returns
    ``(inf, 0.0)`` (keep nothing).

    Returns
    -------
    (threshold, fbeta) : (float, float)
    """
    p, r = curve.precision, curve.recall
    if p.size == 0:
        return float("inf"), 0.0
    b2 = beta * beta
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where(p + r > 0, (1 + b2) * p * r / (b2 * p + r), 0.0)
    t = curve.thresholds
    last_of_run = np.ones(p.size, dtype=bool)
    if p.size > 1:
        last_of_run[:-1] = t[:-1] != t[1:]
    f = np.where(last_of_run, f, -1.0)
    k = int(np.argmax(f))
    if not f[k] > 0:
        return float("inf"), 0.0
    return float(t[k]), float(f[k])


def evaluate(picks: pd.DataFrame, truth: pd.DataFrame, radius: float, beta: float = 2.0) -> dict:
    """Summary metrics of picks against the truth.

    Returns
    -------
    dict
        ``ap`` (average precision), ``precision_at_90`` (best precision at recall >= 0.9), ``recall_max`` (recall
        with every pick kept), ``threshold`` and ``fbeta`` (the F-beta-optimal score threshold and its F-beta),
        ``beta``, ``n_picks``, ``n_true``, ``n_matched``.
    """
    curve = precision_recall(picks, truth, radius)
    threshold, fb = fbeta_threshold(curve, beta)
    n_matched = int(round(curve.recall[-1] * curve.n_true)) if curve.recall.size and curve.n_true else 0
    return {
        "ap": _ap(curve),
        "precision_at_90": precision_at_recall(curve, 0.9),
        "recall_max": float(curve.recall[-1]) if curve.recall.size else 0.0,
        "threshold": threshold,
        "fbeta": fb,
        "beta": float(beta),
        "n_picks": int(len(picks)),
        "n_true": int(curve.n_true),
        "n_matched": n_matched,
    }

