"""The ternary start: master weights whose absmean codes and scale are a better ternary model.

BitLinear keeps the format fixed: s = mean|W|, codes = clamp(round(W/s), -1, 1). Only the master
weights W can change. `ternary_init` picks a target scale s* per tensor and rewrites W into W' with

    mean|W'| = s*   and   clamp(round(W'/s*), -1, 1) = clamp(round(W/s*), -1, 1)

so that the absmean quantizer itself (online, in a packed or GGUF export, in stock transformers'
online load) finds the codes and scale of s*. The rules for s*:

    absmean   s* = mean|W| (no change)
    mse       the scale of the 3-level quantizer {-s, 0, s} with threshold s/2 that is a fixed point of
              Lloyd's iteration s <- mean(|W| over |W| > s/2): the least-squares levels for its own
              nearest-level assignment (for Gaussian W about 1.5-1.7x the absmean)
    a number  s* = GAMMA * mean|W|

W' = W where the code is 0 (|W| < s*/2 already) and |W'| = max(|W| + d, s*/2) where it is not, with
the one shift d that makes mean|W'| = s* (bisection; mean|W'| grows with d). Only for a run that
trains at λ = 1 from its first step: W' is not the original model at λ = 0.
"""

from __future__ import annotations

import torch

from bitft.errors import ConfigError

RULES = ("absmean", "mse")
MARGIN = 1e-3  # relative distance kept from the rounding threshold s*/2, so float noise cannot flip a code


def parse_rule(rule: str) -> str | float:
    """'absmean' | 'mse' | a positive number GAMMA; one clear line otherwise."""
    text = str(rule).strip().lower()
    if text in RULES:
        return text
    try:
        gamma = float(text)
    except ValueError:
        gamma = 0.0
    if not gamma > 0:
        raise ConfigError(f"ternary_init: {rule!r} is not absmean, mse or a positive scale factor (e.g. 1.5)")
    return gamma


def target_scale(w: torch.Tensor, rule: str | float, iters: int = 100) -> float:
    """s* for W (float32 arithmetic)."""
    mag = w.detach().float().abs()
    a = mag.mean().item()
    if rule == "absmean":
        return a
    if rule != "mse":
        return float(rule) * a
    s = a
    for _ in range(iters):
        above = mag[mag > s / 2]
        new = above.mean().item() if above.numel() else s
        if abs(new - s) <= 1e-6 * s:
            return new
        s = new
    return s


def rewrite(w: torch.Tensor, s: float, iters: int = 64) -> torch.Tensor:
    """W' (W's dtype): absmean s, and the absmean codes of W at scale s (see the module docstring)."""
    wf = w.detach().float()
    mag = wf.abs()
    nonzero = mag >= s / 2
    low, high = s / 2 * (1 + MARGIN), s / 2 * (1 - MARGIN)

    def shifted(d: float) -> torch.Tensor:
        return torch.where(nonzero, (mag + d).clamp(min=low), mag.clamp(max=high))

    lo, hi = -s, s
    while shifted(hi).mean().item() < s:  # a tensor with few nonzero codes needs a larger shift
        hi *= 2
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if shifted(mid).mean().item() < s else (lo, mid)
    return (shifted((lo + hi) / 2) * wf.sign()).to(w.dtype)


@torch.no_grad()
def apply_ternary_init(model: torch.nn.Module, rule: str | float) -> dict:
    """Rewrite every BitLinear's master weight by RULE; {"rule", "layers", "mean_gamma"} (s*/absmean)."""
    from bitft.bitlinear import clear_weight_cache
    from bitft.surgery import bit_linears

    if rule == "absmean":
        return {"rule": "absmean", "layers": 0, "mean_gamma": 1.0}
    gammas = []
    for module in bit_linears(model).values():
        w = module.weight
        a = w.detach().float().abs().mean().item()
        s = target_scale(w, rule)
        w.copy_(rewrite(w, s))  # in place: bumps _version, so cached codes are recomputed
        gammas.append(s / a)
    clear_weight_cache()
    return {"rule": str(rule), "layers": len(gammas), "mean_gamma": sum(gammas) / max(len(gammas), 1)}
