"""BitLinear: an nn.Linear whose forward runs BitNet b1.58 (ternary weights, int8 activations).

    y = blend(x', λ) · blend(W, λ)ᵀ + b,     x' = RMSNorm(x) with SubLN, else x

`blend` and the quantizers are in `bitft.quant`. The full-precision master weight stays in
`.weight` (so optimizers, peft, DeepSpeed ZeRO-3 and checkpoints see a plain Linear); the ternary
weight is recomputed from it on every forward (online quantization, as in QAT). λ=0 runs the
original nn.Linear exactly; λ=1 is the ternary model.

The optional SubLN norm is transformers' LlamaRMSNorm under the name `rms_norm`, the name and
math of transformers' own AutoBitLinear(use_rms_norm=True), so such checkpoints stay loadable
by stock transformers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from bitft.quant import blend, quantize_activation, quantize_weight


def check_lambda(value: float) -> float:
    """λ as a float in [0, 1], or a ValueError that names the problem."""
    try:
        lam = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"λ must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= lam <= 1.0:  # also rejects NaN
        raise ValueError(f"λ must be in [0, 1] (0 = original model, 1 = ternary), got {value!r}")
    return lam


class BitLinear(nn.Linear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        lam: float = 1.0,
        subln: bool = False,
        rms_norm_eps: float = 1e-6,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.lam = check_lambda(lam)
        self.rms_norm = LlamaRMSNorm(in_features, eps=rms_norm_eps).to(device=device, dtype=dtype) if subln else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, lam: float = 1.0, subln: bool = False, rms_norm_eps: float = 1e-6):
        """A BitLinear that shares `linear`'s weight and bias Parameters (no copy)."""
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, bias=False, device="meta", dtype=w.dtype,
                  lam=lam, subln=False)
        new.weight = w
        new.bias = linear.bias
        if subln:
            new.rms_norm = LlamaRMSNorm(linear.in_features, eps=rms_norm_eps).to(device=w.device, dtype=w.dtype)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        lam = self.lam
        if lam == 0.0:
            return F.linear(x, self.weight, self.bias)
        x = blend(x, quantize_activation(x), lam)
        w = blend(self.weight, quantize_weight(self.weight), lam)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lam={self.lam:g}, subln={self.rms_norm is not None}"
