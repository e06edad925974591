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
    gptq      s* = mean|W|, and the codes chosen column by column with GPTQ's error compensation
              (Frantar et al. 2022) on the full-precision model's inputs X of a few calibration blocks:
              H = XᵀX + damp·mean(diag H)·I, U = chol(H⁻¹) (upper); for column j, q_j = s·round_clip(w_j/s),
              then the columns after j absorb (w_j − q_j)/U_jj · U_j,>j. The columns' values just before
              their rounding round to the chosen codes; they are the W that is rewritten.

W' = W where the code is 0 (|W| < s*/2 already) and |W'| = max(|W| + d, s*/2) where it is not, with
the one shift d that makes mean|W'| = s* (bisection; mean|W'| grows with d). Only for a run that
trains at λ = 1 from its first step: W' is not the original model at λ = 0.
"""

from __future__ import annotations

import torch

from bitft.errors import ConfigError

RULES = ("absmean", "mse", "gptq")
HESSIAN_BYTES = 2 << 30  # the XᵀX matrices held at once (float32); more layers take more calibration passes
MARGIN = 1e-3  # relative distance kept from the rounding threshold s*/2, so float noise cannot flip a code


def parse_rule(rule: str) -> str | float:
    """'absmean' | 'mse' | 'gptq' | a positive number GAMMA; one clear line otherwise."""
    text = str(rule).strip().lower()
    if text in RULES:
        return text
    try:
        gamma = float(text)
    except ValueError:
        gamma = 0.0
    if not 0 < gamma < float("inf"):
        raise ConfigError(f"ternary_init: {rule!r} is not absmean, mse, gptq or a positive scale factor (e.g. 1.5)")
    return gamma


def target_scale(w: torch.Tensor, rule: str | float, iters: int = 100) -> float:
    """s* for W (float32 arithmetic)."""
    mag = w.detach().float().abs()
    a = mag.mean().item()
    if rule in ("absmean", "gptq"):
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


def rewrite(w: torch.Tensor, s: float, dtype=None, iters: int = 64) -> torch.Tensor:
    """W' in DTYPE (default W's): absmean s, and the absmean codes of W at scale s (module docstring)."""
    dtype = dtype or w.dtype
    wf = w.detach().float()
    mag = wf.abs()
    nonzero = (wf / s).round() != 0  # the quantizer's own rounding (half to even at exactly s/2)
    margin = max(MARGIN, 2 * torch.finfo(dtype).eps)  # bfloat16's rounding must not cross s/2 either
    low, high = s / 2 * (1 + margin), s / 2 * (1 - margin)

    def shifted(d: float) -> torch.Tensor:
        return torch.where(nonzero, (mag + d).clamp(min=low), mag.clamp(max=high))

    lo, hi = -s, s
    while shifted(hi).mean().item() < s:  # a tensor with few nonzero codes needs a larger shift
        hi *= 2
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if shifted(mid).mean().item() < s else (lo, mid)
    return (shifted((lo + hi) / 2) * wf.sign()).to(dtype)


def gptq_columns(w: torch.Tensor, h: torch.Tensor, s: float, damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """W's columns as GPTQ leaves them just before rounding (float32): their codes at scale S are the
    error-compensated ternary codes for inputs with second moment H (in × in)."""
    W = w.detach().float().clone()
    H = h.float().clone()
    dead = H.diagonal() == 0  # inputs that were always 0: any code serves, the weight is kept
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    out = torch.empty_like(W)
    n = W.shape[1]
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, Ub = W[:, i1:i2], U[i1:i2, i1:i2]
        err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = W1[:, i].clone()
            out[:, i1 + i] = col
            q = (col / s).round().clamp(-1, 1) * s
            err[:, i] = (col - q) / Ub[i, i]
            W1[:, i:] -= err[:, i:i + 1] * Ub[i:i + 1, i:]
        W[:, i2:] -= err @ U[i1:i2, i2:]
    out[:, dead] = w.detach().float()[:, dead]
    return out


@torch.no_grad()
def input_moments(model, modules: dict, blocks: torch.Tensor, batch: int = 4) -> dict:
    """{name: XᵀX} of the inputs of MODULES (name -> BitLinear) over BLOCKS (token ids), model at λ=0."""
    from bitft.surgery import get_lambda, set_lambda

    moments = {n: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for n, m in modules.items()}

    def hook(name):
        def add(module, args):  # on the module's device: no transfer per batch
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            moments[name].addmm_(x.T, x)
        return add

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    lam = get_lambda(model)
    device = next(model.parameters()).device
    try:
        set_lambda(model, 0.0)  # the full-precision model's activations (the teacher's)
        for i in range(0, len(blocks), batch):
            model(input_ids=blocks[i:i + batch].to(device))
    finally:
        set_lambda(model, lam)
        for h in handles:
            h.remove()
    return moments


@torch.no_grad()
def apply_ternary_init(model: torch.nn.Module, rule: str | float, calibration: torch.Tensor | None = None) -> dict:
    """Rewrite every BitLinear's master weight by RULE; {"rule", "layers", "mean_gamma"} (s*/absmean).
    gptq needs CALIBRATION, a (blocks, tokens) tensor of token ids."""
    from bitft.bitlinear import clear_weight_cache
    from bitft.surgery import bit_linears

    if rule == "absmean":
        return {"rule": "absmean", "layers": 0, "mean_gamma": 1.0}
    layers = bit_linears(model)
    groups = [dict(layers)]
    if rule == "gptq":
        if calibration is None or not len(calibration):
            raise ConfigError("ternary_init gptq needs calibration blocks (the run's first training blocks)")
        groups, size = [{}], 0  # as many modules per calibration pass as HESSIAN_BYTES holds
        for name, m in layers.items():
            if groups[-1] and size + 4 * m.in_features ** 2 > HESSIAN_BYTES:
                groups.append({})
                size = 0
            groups[-1][name] = m
            size += 4 * m.in_features ** 2
    gammas, new = [], {}
    for group in groups:  # every pass sees the original model: the rewrites are written after the last
        moments = input_moments(model, group, calibration) if rule == "gptq" else {}
        for name, module in group.items():
            w = module.weight
            a = w.detach().float().abs().mean().item()
            s = target_scale(w, rule)
            values = gptq_columns(w, moments.pop(name), s) if rule == "gptq" else w
            new[name] = rewrite(values, s, w.dtype).cpu()  # held off the device until all are done
            gammas.append(s / a)
    for name, module in layers.items():
        if name in new:
            module.weight.copy_(new.pop(name))  # in place: bumps _version, so cached codes are recomputed
    clear_weight_cache()
    return {"rule": str(rule), "layers": len(gammas), "mean_gamma": sum(gammas) / max(len(gammas), 1)}
