"""Cross-entropy and logits distillation in one pass over the vocabulary (the loss of bitft.train.distill).

At each position t that has a target y (the next token; -100: none), with s the student's logits,
z = W·h_T + b the teacher's (its last hidden state through its LM head) and τ the temperature:

    CE = lse(s) − s_y                        lse(x) = log Σ_v exp(x_v)
    KL = Σ_v p_v · (log p_v − s_v/τ + lse(s/τ)),      p = softmax(z/τ), log p = z/τ − lse(z/τ)
    L  = w_ce · Σ_t CE  +  w_kd · τ² · Σ_t KL
    ∂L/∂s = w_ce · (softmax(s) − onehot(y))  +  w_kd · τ · (softmax(s/τ) − p)

Written through the log-sum-exps, the cross-entropy costs one log-sum-exp and a gather on top of
the KL (at τ = 1 the two share softmax(s) too), and the model computes no loss of its own. The
teacher's logits are computed CHUNK labelled positions at a time (one matmul each); the rest runs
on blocks of ROWS positions small enough for a CPU core's cache. Done as separate tensor ops over
the whole logits (a log-softmax each, the KL's subtraction and exp, the model's CE forward and
backward), every op streams 25 MB through memory: at SmolLM2's shapes that took as long as the
teacher's whole decoder. KEEP: ∂L/∂s is written in the forward pass into one logits-sized tensor
(rows without a target zeroed); else the backward pass recomputes it, the teacher's LM head included.
"""

from __future__ import annotations

import torch

ROWS_CPU = 8  # 8 × 49,152 floats = 1.5 MiB per temporary (4, 16 and 32 measured no faster; 256: 1.5× slower)


def _block(s: torch.Tensor, z: torch.Tensor, y: torch.Tensor, w_ce: float, w_kd: float, tau: float, want_grad: bool):
    """(CE per row, KL per row, ∂L/∂s or None) for one block: s float32 [R, V] (overwritten), z the
    teacher's float logits [R, V] (overwritten), y [R] targets."""
    lse_s = torch.logsumexp(s, dim=-1)
    ce = lse_s - s.gather(-1, y[:, None]).squeeze(-1)
    z = z.div_(tau) if tau != 1.0 else z
    logp = z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))  # log p, in place
    p = logp.exp()
    lse_st = lse_s if tau == 1.0 else torch.logsumexp(s / tau, dim=-1)
    # Σ p·(log p − log softmax(s/τ)), the difference taken per token: no cancellation between row sums
    kl = torch.linalg.vecdot(p, torch.sub(logp, s, alpha=1 / tau).add_(lse_st[:, None]))
    if not want_grad:
        return ce, kl, None
    if tau == 1.0:  # softmax(s) serves both terms
        g = s.sub_(lse_s[:, None]).exp_().mul_(w_ce + w_kd).sub_(p, alpha=w_kd)
    else:
        g = (s / tau).sub_(lse_st[:, None]).exp_().sub_(p).mul_(w_kd * tau)
        g.add_(s.sub_(lse_s[:, None]).exp_(), alpha=w_ce)
    if w_ce:
        g.scatter_add_(-1, y[:, None], torch.full((len(y), 1), -w_ce, dtype=g.dtype, device=g.device))
    return ce, kl, g


def _run(logits, hidden, weight, bias, targets, w_ce, w_kd, tau, chunk, rows, grad=None):
    """Σ CE, Σ KL (τ² applied) over the positions with a target; with GRAD also ∂L/∂s into it."""
    flat_s, flat_h = logits.reshape(-1, logits.shape[-1]), hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    where = (targets != -100).nonzero().view(-1)
    if grad is not None:
        grad.view(-1, grad.shape[-1])[targets == -100] = 0
    ce_sum = torch.zeros((), dtype=torch.float32, device=logits.device)
    kl_sum = torch.zeros((), dtype=torch.float32, device=logits.device)
    for i in range(0, len(where), chunk):
        idx = where[i:i + chunk]
        z_all = torch.nn.functional.linear(flat_h[idx], weight, bias).float()
        for j in range(0, len(idx), rows):
            at = idx[j:j + rows]
            ce, kl, g = _block(flat_s[at].float(), z_all[j:j + rows], targets[at], w_ce, w_kd, tau, grad is not None)
            ce_sum += ce.sum()
            kl_sum += kl.sum()
            if g is not None:
                grad.view(-1, grad.shape[-1]).index_copy_(0, at, g.to(grad.dtype))
    return ce_sum, kl_sum * tau ** 2


def _grad_dtype(logits: torch.Tensor) -> torch.dtype:
    """float16's range would flush the small weighted terms (and a GradScaler's 65,536 is inf in it): float32."""
    return torch.float32 if logits.dtype == torch.float16 else logits.dtype


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, hidden, weight, bias, targets, w_ce, w_kd, tau, chunk, rows, keep):
        grad = torch.empty(logits.shape, dtype=_grad_dtype(logits), device=logits.device) if keep else None
        ce_sum, kl_sum = _run(logits, hidden, weight, bias, targets, w_ce, w_kd, tau, chunk, rows, grad)
        if keep:
            ctx.save_for_backward(grad)
        else:
            ctx.save_for_backward(logits, hidden, weight, targets, *([] if bias is None else [bias]))
        ctx.args, ctx.keep, ctx.dtype = (w_ce, w_kd, tau, chunk, rows), keep, logits.dtype
        ctx.mark_non_differentiable(ce_sum, kl_sum)
        return w_ce * ce_sum + w_kd * kl_sum, ce_sum, kl_sum

    @staticmethod
    def backward(ctx, grad_out, _ce, _kl):
        if ctx.keep:
            (grad,) = ctx.saved_tensors
        else:
            logits, hidden, weight, targets, *bias = ctx.saved_tensors
            grad = torch.empty(logits.shape, dtype=_grad_dtype(logits), device=logits.device)
            _run(logits, hidden, weight, bias[0] if bias else None, targets, *ctx.args, grad=grad)
        if grad_out.item() != 1.0:  # the usual case (the weights carry the normalization) costs no pass
            grad = grad * grad_out.to(grad.dtype)
        return grad.to(ctx.dtype), None, None, None, None, None, None, None, None, None, None


def ce_and_kd(logits: torch.Tensor, targets: torch.Tensor, teacher_hidden: torch.Tensor, lm_head: torch.nn.Module,
              w_ce: float, w_kd: float, temperature: float = 1.0, chunk_size: int = 1024, keep_grad: bool = True,
              rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w_ce·ΣCE + w_kd·τ²·ΣKL, ΣCE, τ²·ΣKL) over the positions with a target (the module docstring):
    [B, T, V] student logits, [B, T] targets (the token each position predicts, -100: none; for a
    causal LM's labels, `next_token_targets(labels)`), [B, T, H] teacher hidden states. Only the
    first value has a gradient."""
    if logits.shape[:2] != targets.shape or teacher_hidden.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and teacher hidden states "
                         f"{tuple(teacher_hidden.shape)} must share [batch, positions]")
    rows = rows or (ROWS_CPU if logits.device.type == "cpu" else chunk_size)
    bias = None if getattr(lm_head, "bias", None) is None else lm_head.bias.detach()
    return _FusedLoss.apply(logits, teacher_hidden.detach(), lm_head.weight.detach(), bias, targets,
                            float(w_ce), float(w_kd), float(temperature), int(chunk_size), int(rows), bool(keep_grad))


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """A Hugging Face causal LM's labels [B, T] as per-position targets: position t predicts labels[t+1]."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
