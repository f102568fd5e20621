"""PU objectives checked against values worked out by hand on tiny inputs.

Shared inputs (chosen so that the probabilities are round numbers):

- positives: logits [0, ln 3]        -> g = [0.5, 0.75]
  L(g, 1) = -ln g = [ln 2, ln 4/3] = [0.693147, 0.287682], mean 0.490415
  L(g, 0) = -ln(1 - g) = [ln 2, ln 4] = [0.693147, 1.386294], mean 1.039721
- unlabeled: logits [0, -ln 3, -ln 4] -> g = [0.5, 0.25, 0.2]
  L(g, 0) = [ln 2, ln 4/3, ln 5/4] = [0.693147, 0.287682, 0.223144], mean 0.401324
"""

import math

import pytest
import torch

from napari_pupick.objectives import (
    OBJECTIVES,
    compute_loss,
    ge_binomial_loss,
    ge_kl_loss,
    negative_loss,
    nnpu_loss,
    pn_loss,
)

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)
P_MEAN_POS = (LN2 + math.log(4 / 3)) / 2  # E_P[L(g, 1)] = 0.490415
P_MEAN_NEG = (LN2 + LN4) / 2  # E_P[L(g, 0)] = 1.039721
U_MEAN_NEG = (LN2 + math.log(4 / 3) + math.log(5 / 4)) / 3  # E_U[L(g, 0)] = 0.401324


def _p(requires_grad=False):
    return torch.tensor([0.0, LN3], dtype=torch.float64, requires_grad=requires_grad)


def _u(requires_grad=False):
    return torch.tensor([0.0, -LN3, -LN4], dtype=torch.float64, requires_grad=requires_grad)


def test_hand_constants():
    # Sanity of the hand arithmetic above.
    assert P_MEAN_POS == pytest.approx(0.490415, abs=1e-6)
    assert P_MEAN_NEG == pytest.approx(1.039721, abs=1e-6)
    assert U_MEAN_NEG == pytest.approx(0.401324, abs=1e-6)


def test_pn_by_hand():
    # 0.2 * 0.490415 + 0.8 * 0.401324 = 0.098083 + 0.321059 = 0.419142
    assert float(pn_loss(_p(), _u(), 0.2)) == pytest.approx(0.419142, abs=1e-6)


def test_nnpu_non_negative_branch():
    # R_p+ = 0.2 * 0.490415 = 0.098083; R_n = 0.401324 - 0.2 * 1.039721 = 0.193380 >= 0: loss = 0.291463
    assert float(nnpu_loss(_p(), _u(), 0.2)) == pytest.approx(0.291463, abs=1e-6)


def test_nnpu_negative_risk_gradient_trick():
    # pi = 0.5: R_p+ = 0.245207; R_n = 0.401324 - 0.5 * 1.039721 = -0.118537 < 0 = -beta.
    # Reported value: R_p+. Gradient: that of -R_n:
    #   d(-R_n)/dz_u = -sigmoid(z_u) / 3 = -[0.5, 0.25, 0.2] / 3
    #   d(-R_n)/dz_p = +pi * sigmoid(z_p) / 2 = 0.5 * [0.5, 0.75] / 2 = [0.125, 0.1875]
    p, u = _p(True), _u(True)
    loss = nnpu_loss(p, u, 0.5)
    assert float(loss.detach()) == pytest.approx(0.5 * P_MEAN_POS, abs=1e-6)
    loss.backward()
    assert u.grad.tolist() == pytest.approx([-0.5 / 3, -0.25 / 3, -0.2 / 3], abs=1e-9)
    assert p.grad.tolist() == pytest.approx([0.125, 0.1875], abs=1e-9)
    # With beta above the violation, the ordinary risk is used: R_p+ + R_n = 0.245207 - 0.118536 = 0.126671
    expected = 0.5 * P_MEAN_POS + (U_MEAN_NEG - 0.5 * P_MEAN_NEG)
    assert expected == pytest.approx(0.126671, abs=1e-6)
    assert float(nnpu_loss(_p(), _u(), 0.5, beta=0.2)) == pytest.approx(expected, abs=1e-9)


def test_ge_kl_by_hand():
    # q = mean(0.5, 0.25, 0.2) = 0.95 / 3 = 0.316667; pi = 0.2
    # KL = 0.2 ln(0.2 / q) + 0.8 ln(0.8 / (1 - q)) = 0.2 * (-0.459532) + 0.8 * 0.157629 = 0.034197
    q = 0.95 / 3
    kl = 0.2 * math.log(0.2 / q) + 0.8 * math.log(0.8 / (1 - q))
    assert kl == pytest.approx(0.034197, abs=1e-6)
    assert float(ge_kl_loss(_p(), _u(), 0.2, lam=10.0)) == pytest.approx(P_MEAN_POS + 10 * kl, abs=1e-6)
    # KL is 0 when the mean prediction equals pi
    assert float(ge_kl_loss(_p(), _u(), q, lam=10.0)) == pytest.approx(P_MEAN_POS, abs=1e-6)


def _hand_h(gs, pi):
    """H(q, p) for one group, written out: Binomial pmf by math.comb, Gaussian weights by math.exp."""
    n = len(gs)
    mu = sum(gs)
    var = sum(g * (1 - g) for g in gs)
    w = [math.exp(-((k - mu) ** 2) / (2 * var)) for k in range(n + 1)]
    q = [x / sum(w) for x in w]
    p = [math.comb(n, k) * pi**k * (1 - pi) ** (n - k) for k in range(n + 1)]
    return -sum(qk * math.log(pk) for qk, pk in zip(q, p))


def test_ge_binomial_by_hand():
    # N = 3, pi = 0.2: p = [0.512, 0.384, 0.096, 0.008]
    # mu = 0.95, var = 0.25 + 0.1875 + 0.16 = 0.5975
    # q ~ exp(-(k - 0.95)^2 / 1.195) = exp([-0.755230, -0.002092, -0.922594, -3.516736]), normalised
    p = [0.512, 0.384, 0.096, 0.008]
    w = [math.exp(-0.755230), math.exp(-0.002092), math.exp(-0.922594), math.exp(-3.516736)]
    q = [x / sum(w) for x in w]
    h = -sum(qk * math.log(pk) for qk, pk in zip(q, p))
    assert h == pytest.approx(_hand_h([0.5, 0.25, 0.2], 0.2), abs=1e-5)
    assert float(ge_binomial_loss(_p(), _u(), 0.2, lam=1.0)) == pytest.approx(P_MEAN_POS + h, abs=1e-5)
    assert float(ge_binomial_loss(_p(), _u(), 0.2, lam=2.5)) == pytest.approx(P_MEAN_POS + 2.5 * h, abs=1e-5)


def test_ge_binomial_groups():
    # Six equal unlabeled logits in groups of 3: every grouping gives the N = 3 value; one group gives N = 6.
    z = torch.full((6,), -LN3, dtype=torch.float64)  # g = 0.25
    g3 = _hand_h([0.25] * 3, 0.1)
    g6 = _hand_h([0.25] * 6, 0.1)
    assert g3 != pytest.approx(g6, abs=1e-3)
    empty = torch.zeros(0, dtype=torch.float64)
    assert float(ge_binomial_loss(empty, z, 0.1, group=3)) == pytest.approx(g3, abs=1e-6)
    assert float(ge_binomial_loss(empty, z, 0.1, group=None)) == pytest.approx(g6, abs=1e-6)
    # Seven logits: two groups of three, the leftover one unused this call.
    z7 = torch.full((7,), -LN3, dtype=torch.float64)
    assert float(ge_binomial_loss(empty, z7, 0.1, group=3)) == pytest.approx(g3, abs=1e-6)
    # A per-region prior: each group uses its mean (here 0.1 everywhere).
    pis = torch.full((6,), 0.1, dtype=torch.float64)
    assert float(ge_binomial_loss(empty, z, pis, group=3)) == pytest.approx(g3, abs=1e-6)


def test_ge_binomial_grouping_is_seeded():
    z = torch.randn(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = ge_binomial_loss(z[:0], z, 0.05, group=256, generator=torch.Generator().manual_seed(3))
    b = ge_binomial_loss(z[:0], z, 0.05, group=256, generator=torch.Generator().manual_seed(3))
    assert float(a) == float(b)


def test_negative_loss_by_hand():
    # mean(-ln(1 - 0.5), -ln(1 - 0.75)) = (ln 2 + ln 4) / 2 = 1.039721
    assert float(negative_loss(_p())) == pytest.approx(1.039721, abs=1e-6)
    assert float(negative_loss(torch.zeros(0))) == 0.0


def test_empty_positives_contribute_zero():
    empty = torch.zeros(0, dtype=torch.float64)
    # PN: only (1 - pi) E_U[L(g, 0)] = 0.8 * 0.401324
    assert float(pn_loss(empty, _u(), 0.2)) == pytest.approx(0.8 * U_MEAN_NEG, abs=1e-6)
    assert float(ge_binomial_loss(empty, _u(), 0.2)) == pytest.approx(_hand_h([0.5, 0.25, 0.2], 0.2), abs=1e-5)


def test_compute_loss_adds_weighted_negatives():
    neg = torch.tensor([0.0, LN3], dtype=torch.float64)  # mean L(g, 0) = 1.039721
    loss, terms = compute_loss("pn", _p(), _u(), 0.2, logit_n=neg, negative_weight=2.0)
    assert float(loss) == pytest.approx(0.419142 + 2 * 1.039721, abs=1e-6)
    assert terms["loss"] == pytest.approx(float(loss))
    assert terms["objective"] == pytest.approx(0.419142, abs=1e-6)
    assert terms["negative"] == pytest.approx(1.039721, abs=1e-6)
    assert terms["positive"] == pytest.approx(P_MEAN_POS, abs=1e-6)
    assert terms["unlabeled_mean_g"] == pytest.approx(0.95 / 3, abs=1e-6)
    # Unused settings are ignored, so one dict serves every objective.
    for name in OBJECTIVES:
        loss, terms = compute_loss(name, _p(), _u(), 0.2, lam=1.0, group=None, beta=0.0)
        assert math.isfinite(float(loss))
    with pytest.raises(ValueError, match="unknown objective"):
        compute_loss("bogus", _p(), _u(), 0.2)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_extreme_logits_give_finite_gradients(name):
    p = torch.tensor([-80.0, 80.0], requires_grad=True)
    u = torch.tensor([-80.0, 0.0, 80.0, 60.0] * 100, requires_grad=True)
    loss, _ = compute_loss(name, p, u, torch.full((400,), 0.01), group=256)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(p.grad).all() and torch.isfinite(u.grad).all()
