"""Distillation losses and the teacher (bitft.train.distill) on tiny random models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bitft
from bitft.bitlinear import BitLinear
from bitft.errors import ConfigError
from bitft.train.distill import build_teacher, kd_loss_sum, plain_copy
from bitft.train.feature_kd import ProjectionCapture, hidden_state_error, relation_kl
from bitft.train.logits_kd import ce_and_kd, next_token_targets
from helpers import tiny_model


def direct_kd(student_logits, teacher_logits, mask, tau):
    """τ² Σ_masked KL(softmax(z_T/τ) ‖ softmax(z_S/τ)), in one piece."""
    p_t = F.softmax(teacher_logits / tau, -1)
    kl = (p_t * (F.log_softmax(teacher_logits / tau, -1) - F.log_softmax(student_logits / tau, -1))).sum(-1)
    return (kl * mask).sum() * tau ** 2


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 1024])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_chunked_kd_equals_the_direct_formula_value_and_gradient(chunk, tau, keep):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40)
    hidden = torch.randn(2, 9, 16)
    logits = torch.randn(2, 9, 40, requires_grad=True)
    mask = torch.rand(2, 9) > 0.3
    got = kd_loss_sum(logits, hidden, head, mask, tau, chunk, keep_grad=keep)
    (g_got,) = torch.autograd.grad(got * 3.0, logits)
    g_got = g_got / 3.0  # the incoming gradient is applied
    want = direct_kd(logits, head(hidden), mask.float(), tau)
    (g_want,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-7)
    assert g_got[~mask].abs().max() == 0  # positions the CE does not count get no KD gradient


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("chunk,rows", [(1, 1), (5, 3), (1024, None), (1024, 1024)])
@pytest.mark.parametrize("tau,w_ce", [(1.0, 0.0), (1.0, 0.5), (2.0, 0.0), (2.0, 0.5)])
def test_fused_ce_and_kd_equal_the_models_cross_entropy_and_the_direct_kl(chunk, rows, tau, w_ce, keep):
    """The recipe's one-pass loss: the CE a Hugging Face causal LM computes from its labels (shifted, -100
    ignored) and the direct KL, values and the gradient of their weighted sum, whatever the blocking."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40)
    hidden = torch.randn(2, 9, 16)
    labels = torch.randint(0, 40, (2, 9))
    labels[0, :3] = -100  # a prompt
    labels[1, 5] = -100
    logits = torch.randn(2, 9, 40, requires_grad=True)
    loss, ce, kl = ce_and_kd(logits, next_token_targets(labels), hidden, head, w_ce, 0.7, tau, chunk, keep, rows)
    (g_got,) = torch.autograd.grad(loss * 3.0, logits)
    shifted = F.cross_entropy(logits[:, :-1].reshape(-1, 40), labels[:, 1:].reshape(-1), reduction="sum")
    mask = F.pad(labels[:, 1:] != -100, (0, 1)).float()
    want_kl = direct_kd(logits, head(hidden), mask, tau)
    (g_want,) = torch.autograd.grad(3.0 * (w_ce * shifted + 0.7 * want_kl), logits)
    torch.testing.assert_close(ce, shifted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, want_kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, w_ce * shifted + 0.7 * want_kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)
    assert g_got[mask == 0].abs().max() == 0 and not ce.requires_grad and not kl.requires_grad


def test_fused_loss_gives_float16_logits_a_finite_gradient_under_a_loss_scale():
    """fp16 training: a GradScaler's 65,536 overflows float16, and α/N-weighted terms underflow it."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40)
    hidden, targets = torch.randn(1, 6, 16), torch.randint(0, 40, (1, 6))
    base = torch.randn(1, 6, 40).half().float()  # the same logits in both dtypes
    grads = []
    for dtype in (torch.float32, torch.float16):
        logits = base.to(dtype).detach().clone().requires_grad_()
        loss = ce_and_kd(logits, targets, hidden, head, 0.5 / 6, 0.5 / 6)[0]
        (loss * 65536.0).backward()
        assert logits.grad.dtype == dtype and torch.isfinite(logits.grad).all()
        grads.append(logits.grad.float())
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-3, atol=1e-2)


def test_a_bfloat16_teacher_gives_the_float32_teachers_kd_to_bfloat16_precision():
    """teacher_dtype: bfloat16 (build_teacher): the teacher's logits in bf16, the KL in float32."""
    student = bitft.convert_model(tiny_model("llama", seed=2), lam=1.0)
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.bool)
    logits = student(ids).logits
    losses, grads = [], []
    for dtype in (None, torch.bfloat16):
        teacher = build_teacher(student, None, dtype=dtype)
        assert all(p.dtype == (dtype or torch.float32) for p in teacher.parameters())
        with torch.inference_mode():
            hidden = teacher.base_model(ids).last_hidden_state
        kd = kd_loss_sum(logits, hidden, teacher.lm_head, mask)
        losses.append(kd.item())
        grads.append(torch.autograd.grad(kd, logits, retain_graph=True)[0].flatten())
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    assert F.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


@pytest.mark.parametrize("subln", [False, True])
def test_teacher_is_the_original_model_in_full_precision_and_frozen(subln):
    original = tiny_model("llama", seed=3)
    ids = torch.randint(0, 128, (2, 12))
    want = original(ids).logits
    student = bitft.convert_model(tiny_model("llama", seed=3), lam=1.0, subln=subln)
    teacher = plain_copy(student)
    assert not any(isinstance(m, BitLinear) for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(teacher.parameters(), student.parameters()))
    assert torch.equal(teacher(ids).logits, want)  # bit for bit, whatever the student's λ and SubLN


def test_kd_and_attention_losses_are_zero_for_the_same_model_at_lambda_0():
    student = bitft.convert_model(tiny_model("llama", seed=1), lam=0.0)
    teacher = plain_copy(student)
    ids = torch.randint(0, 128, (2, 10))
    caps = ProjectionCapture(student, -1), ProjectionCapture(teacher, -1)
    logits = student(ids).logits
    hidden = teacher.base_model(ids).last_hidden_state
    mask = torch.ones(2, 10, dtype=torch.bool)
    # 0 up to float summation order (the chunked teacher logits are a matmul of fewer rows)
    assert abs(kd_loss_sum(logits, hidden, teacher.lm_head, mask, 2.0, 4).item()) < 1e-6
    heads = student.config.num_key_value_heads
    for s, t in zip(caps[0].take(), caps[1].take()):
        assert relation_kl(s, t, heads, mask).abs().item() < 1e-6
    states = student(ids, output_hidden_states=True).hidden_states, teacher(ids, output_hidden_states=True).hidden_states
    assert hidden_state_error(*states, mask).item() < 1e-10
    # and positive once the student is ternary
    bitft.set_lambda(student, 1.0)
    assert kd_loss_sum(student(ids).logits, hidden, teacher.lm_head, mask).item() > 1e-4
    assert hidden_state_error(student(ids, output_hidden_states=True).hidden_states, states[1], mask).item() > 1e-4


def test_relation_kl_ignores_padding():
    torch.manual_seed(0)
    s, t = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    mask = torch.tensor([[True] * 4 + [False] * 2])
    noisy_s, noisy_t = s.clone(), t.clone()
    noisy_s[:, 4:], noisy_t[:, 4:] = 100.0, -100.0  # what the padded positions hold must not matter
    torch.testing.assert_close(relation_kl(s, t, 2, mask), relation_kl(noisy_s, noisy_t, 2, mask))
    torch.testing.assert_close(relation_kl(s, t, 2, mask), relation_kl(s[:, :4], t[:, :4], 2, mask[:, :4]))


def test_hidden_state_error_is_the_layers_mean_relative_error_over_valid_positions():
    torch.manual_seed(0)
    t = tuple(torch.randn(2, 5, 8) * (10.0 ** i) for i in range(4))  # embeddings, then 3 layers, growing norms
    s = tuple(x + 0.1 * x.norm(dim=-1, keepdim=True) / 8 ** 0.5 * torch.randn_like(x) for x in t)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    expected = torch.stack([((a - b).pow(2).sum(-1) / b.pow(2).sum(-1))[mask] for a, b in zip(s[1:], t[1:])]).mean()
    torch.testing.assert_close(hidden_state_error(s, t, mask), expected)
    assert 0.005 < expected.item() < 0.02  # ~0.01 at every depth: no layer's scale dominates
    padded = tuple(x.clone().index_put_((torch.tensor([1]), torch.tensor([4])), torch.tensor(1e6)) for x in s)
    torch.testing.assert_close(hidden_state_error(padded, t, mask), expected)  # padding does not count
    with pytest.raises(ConfigError, match="same depth: the student has 3 decoder layers, the teacher 2"):
        hidden_state_error(s, t[:3], mask)
