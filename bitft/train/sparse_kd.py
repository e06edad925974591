"""Sparse logits distillation: the KL against the teacher's top-k next-token probabilities only.

The teacher keeps, per position, its K most likely tokens with their log-probabilities at
temperature τ, log p_T(i) for i ∈ K; the rest of its mass r_T = 1 − Σ_K p_T is one "tail" class.
The student's distribution is coarsened the same way (its own top-K is not used: its mass on the
teacher's K, and its tail r_S = Σ_{j∉K} p_S(j)), and the loss is the exact KL between the two
(K + 1)-class distributions, τ²-scaled like the full KD:

    KL_K = Σ_{i∈K} p_T(i) · (log p_T(i) − log p_S(i))  +  r_T · (log r_T − log r_S)   ≤ KL(p_T ‖ p_S)

(the data-processing inequality: merging classes never raises a KL). Its gradient in the student's
logits is τ·(p_S − q), where q = p_T on K and q = r_T · p_S / r_S off K: the teacher's tail mass
spread in the student's own proportions. K = the whole vocabulary gives the full KL exactly.
This is the "tail as one class" treatment of sparse KD (e.g. Sparse Logit Sampling, arXiv 2503.16870,
which reports naive top-k renormalization biased and the tail-aware forms not).

Why: top-k log-probs are what a teacher-logits cache can store (bitft.train.teacher_cache:
K·6 bytes per token instead of V·4) so that a run trains with no teacher in memory or time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_chunks(mask: torch.Tensor, chunk_size: int):
    """(row, start) of every chunk of CHUNK_SIZE positions that holds a masked position."""
    for b in range(mask.shape[0]):
        for i in range(0, mask.shape[1], chunk_size):
            if mask[b, i:i + chunk_size].any():
                yield b, i


@torch.inference_mode()
def teacher_top_k(hidden: torch.Tensor, lm_head: torch.nn.Module, k: int, temperature: float = 1.0,
                  chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-K log-probabilities at τ and their token ids, [B, T, K] each (float32, int64),
    from its last hidden states [B, T, H]; the full logits exist one chunk of positions at a time."""
    b, t, _ = hidden.shape
    logp = torch.empty(b, t, k, dtype=torch.float32, device=hidden.device)
    ids = torch.empty(b, t, k, dtype=torch.long, device=hidden.device)
    for r in range(b):
        for i in range(0, t, chunk_size):
            z = lm_head(hidden[r, i:i + chunk_size]).float() / temperature
            top, idx = z.topk(k, dim=-1)
            logp[r, i:i + chunk_size] = top - torch.logsumexp(z, dim=-1, keepdim=True)
            ids[r, i:i + chunk_size] = idx
    return logp, ids


def _chunk_terms(z_s: torch.Tensor, t_logp: torch.Tensor, t_ids: torch.Tensor, tau: float):
    """KL_K per position and its gradient in z_s/τ (p_S − q), for one chunk [n, V] / [n, K]."""
    log_p_s = F.log_softmax(z_s.float() / tau, dim=-1)
    p_s = log_p_s.exp()
    p_t = t_logp.exp()
    r_t = (1.0 - p_t.sum(-1)).clamp_min(0.0)
    r_s = p_s.scatter(-1, t_ids, 0.0).sum(-1)  # the tail summed directly: no 1 − (≈1) cancellation
    log_p_s_k = log_p_s.gather(-1, t_ids)
    head = (p_t * (t_logp - log_p_s_k)).sum(-1)
    has_tail = r_t > 0
    tail = torch.where(has_tail, r_t * (torch.log(r_t.clamp_min(1e-30)) - torch.log(r_s.clamp_min(1e-30))), 0.0)
    scale = torch.where(has_tail, r_t / r_s.clamp_min(1e-30), 0.0)
    grad = p_s * (1.0 - scale)[:, None]  # off K: p_S − r_T·p_S/r_S
    grad.scatter_(-1, t_ids, log_p_s_k.exp() - p_t)
    return head + tail, grad


class _SparseKD(torch.autograd.Function):
    """τ² Σ KL_K one chunk at a time; each chunk's gradient τ·(p_S − q) kept from the forward pass."""

    @staticmethod
    def forward(ctx, student_logits, t_logp, t_ids, mask, temperature, chunk_size):
        total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        grad = torch.zeros_like(student_logits)
        for b, i in masked_chunks(mask, chunk_size):
            sl = slice(i, i + chunk_size)
            kl, g = _chunk_terms(student_logits[b, sl], t_logp[b, sl].float(), t_ids[b, sl].long(), temperature)
            m = mask[b, sl]
            total += (kl * m).sum()
            grad[b, sl] = (g * (temperature * m[:, None])).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total * temperature ** 2

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None, None


def sparse_kd_sum(student_logits: torch.Tensor, teacher_logp: torch.Tensor, teacher_ids: torch.Tensor,
                  mask: torch.Tensor, temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """τ² · Σ over masked positions of KL_K (the module docstring): [B, T, V] student logits, the teacher's
    [B, T, K] top-k log-probabilities at τ and token ids, [B, T] mask."""
    if teacher_logp.shape != teacher_ids.shape or teacher_logp.shape[:2] != student_logits.shape[:2]:
        raise ValueError(f"teacher top-k {tuple(teacher_logp.shape)} / {tuple(teacher_ids.shape)} does not match "
                         f"the student's logits {tuple(student_logits.shape)}")
    return _SparseKD.apply(student_logits, teacher_logp.detach(), teacher_ids.detach(), mask.bool(),
                           float(temperature), int(chunk_size))
