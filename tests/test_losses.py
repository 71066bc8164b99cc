"""Logit distances against independent step-by-step computations."""
import math

import pytest
import torch

from bkd_core import dkd_loss, kd_loss, kd_ls_loss


def softmax_rows(z, T):
    return [[math.exp(v / T) / sum(math.exp(u / T) for u in row) for v in row] for row in z.tolist()]


def kl_rows(p, q):
    return [sum(pi * math.log(pi / qi) for pi, qi in zip(pr, qr)) for pr, qr in zip(p, q)]


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g) * 3, torch.tensor([0, 3, 6, 2, 2])


def test_kd_matches_hand_computation(logits):
    s, t, _ = logits
    T = 4.0
    expected = sum(kl_rows(softmax_rows(t, T), softmax_rows(s, T))) / 5 * T * T
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_ls_is_kd_on_zscored_logits(logits):
    s, t, _ = logits
    z = lambda v: (v - v.mean(1, keepdim=True)) / v.std(1, keepdim=True)  # noqa: E731
    assert kd_ls_loss(s, t, 2.0).item() == pytest.approx(kd_loss(z(s), z(t), 2.0).item(), rel=1e-5)
    # invariant to per-sample shift and scale of the logits
    assert kd_ls_loss(3 * s + 5, t, 2.0).item() == pytest.approx(kd_ls_loss(s, t, 2.0).item(), rel=1e-4)


def test_dkd_matches_hand_computation(logits):
    s, t, y = logits
    T, a, b = 2.0, 1.5, 8.0
    ps, pt = softmax_rows(s, T), softmax_rows(t, T)
    tckd, nckd = 0.0, 0.0
    for i, yi in enumerate(y.tolist()):
        bs, bt = [ps[i][yi], 1 - ps[i][yi]], [pt[i][yi], 1 - pt[i][yi]]
        tckd += sum(p * math.log(p / q) for p, q in zip(bt, bs))
        qs = [v for j, v in enumerate(ps[i]) if j != yi]
        qt = [v for j, v in enumerate(pt[i]) if j != yi]
        qs, qt = [v / sum(qs) for v in qs], [v / sum(qt) for v in qt]
        nckd += sum(p * math.log(p / q) for p, q in zip(qt, qs))
    expected = (a * tckd / 5 + b * nckd / 5) * T * T
    assert dkd_loss(s, t, y, a, b, T).item() == pytest.approx(expected, rel=1e-5)


def test_dkd_finite_for_extreme_logits():
    s = torch.tensor([[500.0, -500.0, 0.0], [-800.0, 800.0, 3.0]], requires_grad=True)
    t = torch.tensor([[-700.0, 700.0, 1.0], [900.0, -900.0, 0.0]])
    y = torch.tensor([0, 1])
    loss = dkd_loss(s, t, y, 1.0, 8.0, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    half = dkd_loss(s.detach().half(), t.half(), y, 1.0, 8.0, 4.0)
    assert torch.isfinite(half)
