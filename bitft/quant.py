"""BitNet b1.58 quantization math (W1.58A8), in one place.

Weights, per tensor (absmean):    s = max(mean|W|, 1e-5),   q(W) = clamp(round(W / s), -1, 1) · s
Activations, per token (absmax):  a = 127 / max(max_j |x_j|, 1e-5),
                                  q(x) = clamp(round(x · a), -128, 127) / a
λ-blend with a straight-through estimator (STE):
                                  blend(t, λ) = t + λ · (q(t) − t).detach()
The forward value is lerp(t, q(t), λ), exact at both ends (λ=0 gives t, λ=1 gives q(t) bit for
bit); the gradient with respect to t is the identity, as the detach in the formula says.

The arithmetic (float32, multiply by 1/s then divide by 1/s) is the same as transformers'
`integrations/bitnet.py` AutoBitLinear. These are the reference values: BitLinear's own forward
(`bitft.bitlinear`, `bitft.kernels`) computes the same codes faster and, at λ=1, multiplies the
codes and applies the scales after, in the packed export's order.
"""

from __future__ import annotations

import torch

EPS = 1e-5
ACT_QMAX = 127
ACT_QMIN = -128


def weight_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, inv): int8 codes clamp(round(W·inv), -1, 1) and inv = 1/s (float32), q(W) = codes / inv."""
    wf = w.detach().float()
    inv = 1.0 / wf.abs().mean().clamp(min=EPS)
    codes = (wf * inv).round_().clamp_(-1, 1)
    return codes.to(torch.int8), inv


def ternarize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer codes {-1, 0, 1} (int8) of W and their scale s, with q(W) = codes · s."""
    codes, inv = weight_codes(w)
    return codes, 1.0 / inv


def packed_weight_scale(inv: torch.Tensor) -> torch.Tensor:
    """The packed export's `weight_scale` 1/s for s = 1/inv, rounded exactly as the export computes it."""
    return 1.0 / (1.0 / inv)


def quantize_weight(w: torch.Tensor) -> torch.Tensor:
    """q(W): ternary values times one absmean scale, in W's dtype (no gradient)."""
    codes, inv = weight_codes(w)
    return (codes / inv).to(w.dtype)


def activation_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, a): int8 codes clamp(round(x·a), -128, 127) per token and a = 127/max|x| (float32, [..., 1])."""
    xf = x.detach().float()
    a = ACT_QMAX / xf.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return (xf * a).round_().clamp_(ACT_QMIN, ACT_QMAX).to(torch.int8), a


def quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """q(x): symmetric int8 per token (last dimension), dequantized to x's dtype (no gradient)."""
    codes, a = activation_codes(x)
    return (codes / a).to(x.dtype)


class _STEBlend(torch.autograd.Function):
    """Forward lerp(t, q, λ); backward the identity to t (straight-through)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, q: torch.Tensor, lam: float) -> torch.Tensor:
        if lam == 1.0:
            return q
        return torch.lerp(t, q, lam)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def blend(t: torch.Tensor, q: torch.Tensor, lam: float) -> torch.Tensor:
    """t + λ·(q − t).detach(), computed so that both ends are exact."""
    if lam == 0.0:
        return t
    return _STEBlend.apply(t, q, lam)


# 2-bit packing, transformers' BitNet layout: code = value + 1 in {0, 1, 2}; the rows are cut into
# four contiguous blocks of out/4 rows, and block i sits in bits 2i..2i+1 of each byte.
def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """int codes in {-1, 0, 1}, shape [out, ...] with out % 4 == 0 -> uint8 [out/4, ...]."""
    if codes.shape[0] % 4:
        raise ValueError(f"cannot pack {codes.shape[0]} rows: the packed format needs a multiple of 4")
    u = (codes.to(torch.int16) + 1).to(torch.uint8).reshape(4, codes.shape[0] // 4, *codes.shape[1:])
    return u[0] | (u[1] << 2) | (u[2] << 4) | (u[3] << 6)


def unpack_ternary(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out/4, ...] -> int8 codes in {-1, 0, 1}, shape [out, ...]."""
    return torch.cat([(packed >> (2 * i)) & 3 for i in range(4)]).to(torch.int8) - 1
