"""Positive-unlabeled objectives on logits.

Every function takes logits (any shape; they are flattened): ``logit_p`` of labelled positive regions,
``logit_u`` of unlabeled regions, and ``pi``, the expected fraction of positives among the unlabeled regions
(a float, or a tensor of the same shape as ``logit_u`` giving each region's prior; objectives that need one
number use its mean, GE-binomial the mean of each group). The classifier is ``g = sigmoid(logit)`` and
``L(g, y)`` is the binary cross-entropy, computed stably from logits: ``L(g, 1) = softplus(-z)``,
``L(g, 0) = softplus(z)``. An empty ``logit_p`` contributes a zero positive term.

Each returns a scalar loss tensor; ``compute_loss`` adds the optional explicit-negative term and also returns the
terms as floats for progress reports.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["OBJECTIVES", "compute_loss", "ge_binomial_loss", "ge_kl_loss", "negative_loss", "nnpu_loss",
           "pn_loss"]

_EPS = 1e-6


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


def _mean_pi(pi) -> torch.Tensor | float:
    if isinstance(pi, torch.Tensor):
        return pi.float().mean()
    return float(pi)


def _bce_pos(z: torch.Tensor) -> torch.Tensor:
    """Mean L(g, 1) over ``z``; 0 when empty."""
    z = _flat(z)
    return F.softplus(-z).mean() if z.numel() else z.sum()


def _bce_neg(z: torch.Tensor) -> torch.Tensor:
    """Mean L(g, 0) over ``z``; 0 when empty."""
    z = _flat(z)
    return F.softplus(z).mean() if z.numel() else z.sum()


def pn_loss(logit_p: torch.Tensor, logit_u: torch.Tensor, pi) -> torch.Tensor:
    """Positive-negative baseline: unlabeled regions are taken as negatives.

    ``pi * E_P[L(g, 1)] + (1 - pi) * E_U[L(g, 0)]``.
    """
    pi = _mean_pi(pi)
    return pi * _bce_pos(logit_p) + (1 - pi) * _bce_neg(logit_u)


def nnpu_loss(logit_p: torch.Tensor, logit_u: torch.Tensor, pi, beta: float = 0.0) -> torch.Tensor:
    """Non-negative PU risk (Kiryo et al. 2017) with the logistic loss (binary cross-entropy).

    With ``R_p+ = pi * E_P[L(g, 1)]`` and the negative risk ``R_n = E_U[L(g, 0)] - pi * E_P[L(g, 0)]``:

    - if ``R_n >= -beta``: the loss is ``R_p+ + R_n`` (value and gradient);
    - otherwise (the estimate has gone too negative, a sign of overfitting) the step follows the gradient of
      ``-R_n`` only, pushing the negative risk back up (their Algorithm 1 with gamma = 1), and the value
      reported is ``R_p+`` (the non-negative risk with ``R_n`` clipped at 0).
    """
    pi = _mean_pi(pi)
    risk_p = pi * _bce_pos(logit_p)
    risk_n = _bce_neg(logit_u) - pi * _bce_neg(logit_p)
    if risk_n.item() >= -beta:
        return risk_p + risk_n
    # Value R_p+ (detached), gradient that of -R_n.
    return risk_p.detach() + (-risk_n - (-risk_n).detach())


def _log_mean_sigmoid(z: torch.Tensor) -> torch.Tensor:
    """log(mean(sigmoid(z))) computed stably."""
    return torch.logsumexp(F.logsigmoid(z), dim=0) - math.log(z.numel())


def ge_kl_loss(logit_p: torch.Tensor, logit_u: torch.Tensor, pi, lam: float = 10.0) -> torch.Tensor:
    """Generalized expectation with the Bernoulli KL: ``E_P[L(g, 1)] + lam * KL(pi || q)``.

    ``q = mean_U g`` and ``KL(pi || q) = pi log(pi / q) + (1 - pi) log((1 - pi) / (1 - q))``; ``log q`` and
    ``log(1 - q)`` are computed from the logits (log-mean-exp of log-sigmoids), so they never overflow.
    """
    pi = float(min(max(float(_mean_pi(pi)), _EPS), 1 - _EPS))
    z = _flat(logit_u)
    log_q = _log_mean_sigmoid(z)
    log_1mq = _log_mean_sigmoid(-z)
    kl = pi * (math.log(pi) - log_q) + (1 - pi) * (math.log(1 - pi) - log_1mq)
    return _bce_pos(logit_p) + lam * kl


def _binomial_logpmf(n: int, pi: torch.Tensor) -> torch.Tensor:
    """log Binomial(k; n, pi) for k = 0..n; ``pi`` of shape (G,) gives (G, n + 1)."""
    k = torch.arange(n + 1, dtype=pi.dtype, device=pi.device)
    log_comb = math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
    pi = pi.clamp(_EPS, 1 - _EPS)[:, None]
    return log_comb + k * torch.log(pi) + (n - k) * torch.log1p(-pi)


def ge_binomial_loss(logit_p: torch.Tensor, logit_u: torch.Tensor, pi, lam: float = 1.0,
                     group: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Generalized expectation with the binomial count prior (the default objective).

    ``E_P[L(g, 1)] + lam * mean over groups of H(q, p)``. For a group of ``N`` unlabeled regions,
    ``p(k) = Binomial(k; N, pi)`` is the prior on the number of positives among them and ``q(k)`` is the
    classifier's distribution of that number, approximated by a Gaussian of mean ``sum_i g_i`` and variance
    ``sum_i g_i (1 - g_i)`` evaluated at ``k = 0..N`` and normalised; ``H(q, p) = -sum_k q(k) log p(k)``.

    Parameters
    ----------
    group : int, optional
        Split the unlabeled logits into random groups of this many (the paper's minibatch: 256) and average
        ``H`` over the groups; the ``M mod group`` left over are not used in this call. ``None``, or fewer
        logits than ``group``, makes one group of all of them.
    generator : torch.Generator, optional
        Source of the random grouping (for reproducible training).
    """
    z = _flat(logit_u)
    m = z.numel()
    pis = (pi.reshape(-1).to(z) if isinstance(pi, torch.Tensor) and pi.numel() > 1
           else torch.full((m,), float(_mean_pi(pi)), dtype=z.dtype, device=z.device))
    if group is not None and m > group:
        perm = torch.randperm(m, generator=generator, device="cpu").to(z.device)
        n_groups = m // group
        keep = perm[: n_groups * group]
        z = z[keep].reshape(n_groups, group)
        pis = pis[keep].reshape(n_groups, group)
    else:
        z = z.reshape(1, m)
        pis = pis.reshape(1, m)
    n = z.shape[1]
    g = torch.sigmoid(z)
    mu = g.sum(dim=1, keepdim=True)
    var = (g * (1 - g)).sum(dim=1, keepdim=True).clamp_min(1e-3)
    k = torch.arange(n + 1, dtype=z.dtype, device=z.device)
    q = torch.softmax(-((k - mu) ** 2) / (2 * var), dim=1)
    log_p = _binomial_logpmf(n, pis.mean(dim=1))
    h = -(q * log_p).sum(dim=1).mean()
    return _bce_pos(logit_p) + lam * h


def negative_loss(logit_n: torch.Tensor) -> torch.Tensor:
    """Explicit negatives (picks a person rejected): ``E_N[L(g, 0)]``; 0 when empty."""
    return _bce_neg(logit_n)


OBJECTIVES = {
    "pn": pn_loss,
    "nnpu": nnpu_loss,
    "ge-kl": ge_kl_loss,
    "ge-binomial": ge_binomial_loss,
}

_KWARGS = {"pn": (), "nnpu": ("beta",), "ge-kl": ("lam",), "ge-binomial": ("lam", "group", "generator")}


def compute_loss(name: str, logit_p: torch.Tensor, logit_u: torch.Tensor, pi, logit_n: torch.Tensor | None = None,
                 negative_weight: float = 1.0, **kw) -> tuple:
    """The named objective plus ``negative_weight * negative_loss(logit_n)``.

    Parameters
    ----------
    name : str
        A key of ``OBJECTIVES``: ``"pn"``, ``"nnpu"``, ``"ge-kl"`` or ``"ge-binomial"``.
    logit_p, logit_u, pi
        As for the objectives.
    logit_n : Tensor, optional
        Logits of explicitly negative regions.
    **kw
        Keyword arguments of the objective (``beta``; ``lam``; ``lam, group, generator``); others are ignored, so
        one dict of settings serves every objective.

    Returns
    -------
    loss : Tensor
        Scalar to minimise.
    terms : dict of str -> float
        ``loss``, ``objective`` (the PU part), ``positive`` (mean L(g, 1) over labelled positives),
        ``unlabeled_mean_g`` (mean predicted probability over unlabeled regions), and ``negative`` when given.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}: choose one of {sorted(OBJECTIVES)}")
    args = {key: kw[key] for key in _KWARGS[name] if key in kw and kw[key] is not None}
    objective = OBJECTIVES[name](logit_p, logit_u, pi, **args)
    loss = objective
    terms = {}
    if logit_n is not None and logit_n.numel():
        neg = negative_loss(logit_n)
        loss = loss + negative_weight * neg
        terms["negative"] = float(neg.detach())
    with torch.no_grad():
        terms["positive"] = float(_bce_pos(logit_p))
        zu = _flat(logit_u)
        terms["unlabeled_mean_g"] = float(torch.sigmoid(zu).mean()) if zu.numel() else float("nan")
    terms = {"loss": float(loss.detach()), "objective": float(objective.detach()), **terms}
    return loss, terms
