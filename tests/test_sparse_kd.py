"""Sparse (top-k + tail) distillation: exact against a direct autograd formula, the full KL at K = V,
a lower bound of it that tightens with K."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bitft.train.distill import kd_loss_sum
from bitft.train.sparse_kd import sparse_kd_sum, teacher_top_k


def direct_sparse_kd(student_logits, teacher_logits, k, mask, tau):
    """τ² Σ_masked KL over the teacher's top-k classes plus one tail class, in one differentiable piece (float64)."""
    log_t = F.log_softmax(teacher_logits.double() / tau, -1)
    log_s = F.log_softmax(student_logits.double() / tau, -1)
    top, ids = log_t.topk(k, -1)
    p_t_head, log_s_head = top.exp(), log_s.gather(-1, ids)
    r_t = 1 - p_t_head.sum(-1)
    r_s = 1 - log_s_head.exp().sum(-1)
    kl = (p_t_head * (top - log_s_head)).sum(-1)
    kl = kl + torch.where(r_t > 0, r_t * (r_t.clamp_min(1e-300).log() - r_s.clamp_min(1e-300).log()), 0.0)
    return (kl * mask).sum() * tau ** 2


def case(seed=0, v=40):
    torch.manual_seed(seed)
    head = torch.nn.Linear(16, v)
    hidden = torch.randn(2, 9, 16)
    logits = torch.randn(2, 9, v, requires_grad=True)
    mask = torch.rand(2, 9) > 0.3
    return head, hidden, logits, mask


@pytest.mark.parametrize("chunk", [1, 4, 1024])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("k", [1, 5, 39])
def test_sparse_kd_equals_the_direct_formula_value_and_gradient(k, tau, chunk):
    head, hidden, logits, mask = case()
    logp, ids = teacher_top_k(hidden, head, k, tau, chunk)
    got = sparse_kd_sum(logits, logp, ids, mask, tau, chunk)
    (g_got,) = torch.autograd.grad(got * 3.0, logits)
    want = direct_sparse_kd(logits, head(hidden).detach(), k, mask.double(), tau)
    (g_want,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got / 3.0, g_want, rtol=1e-4, atol=1e-7)
    assert g_got[~mask].abs().max() == 0


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_top_k_of_the_whole_vocabulary_is_the_full_kd(tau):
    head, hidden, logits, mask = case(1)
    full = kd_loss_sum(logits, hidden, head, mask, tau)
    (g_full,) = torch.autograd.grad(full, logits)
    logp, ids = teacher_top_k(hidden, head, 40, tau)
    got = sparse_kd_sum(logits, logp, ids, mask, tau)
    (g_got,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got, g_full, rtol=1e-4, atol=1e-6)


def test_sparse_kd_is_a_lower_bound_that_tightens_with_k():
    head, hidden, logits, mask = case(2, v=200)
    logits = logits.detach()
    full = float(kd_loss_sum(logits, hidden, head, mask))
    values = [float(sparse_kd_sum(logits, *teacher_top_k(hidden, head, k), mask)) for k in (1, 4, 16, 64, 200)]
    assert all(a <= b + 1e-4 for a, b in zip(values, values[1:])), values
    assert values[-1] == pytest.approx(full, rel=1e-5) and values[0] < full


def test_mismatched_teacher_shapes_are_named():
    head, hidden, logits, mask = case()
    logp, ids = teacher_top_k(hidden[:, :5], head, 4)
    with pytest.raises(ValueError, match="does not match the student's logits"):
        sparse_kd_sum(logits, logp, ids, mask)
