"""BitLinear: an nn.Linear whose forward runs BitNet b1.58 (ternary weights, int8 activations).

    y = blend(x', λ) · blend(W, λ)ᵀ + b,     x' = RMSNorm(x) with SubLN, else x

`blend` and the quantizers are in `bitft.quant`. The full-precision master weight stays in
`.weight` (so optimizers, peft, DeepSpeed ZeRO-3 and checkpoints see a plain Linear). λ=0 runs the
original nn.Linear exactly; λ=1 is the ternary model.

The λ > 0 forward and backward are one autograd function (`BitLinearFunction`):

    codes:    xc = clamp(round(x'·a), -128, 127),  a = 127 / max|x'| per token    (int8, float32)
              wc = clamp(round(W·inv), -1, 1),      inv = 1 / max(mean|W|, 1e-5)   (int8, float32)
    λ = 1:    y = (xc · wcᵀ) / (ws · a) + b,        ws = 1 / (1 / inv)
    0 < λ < 1: y = lerp(x', xc/a, λ) · lerp(W, wc/inv, λ)ᵀ + b      (the fake-quant formula)
    backward (straight-through): grad_x' = grad_y · blend(W),  grad_W = grad_yᵀ · blend(x')

At λ = 1 the integer product is exact (see `bitft.kernels`: int8 GEMM where the hardware has one,
else a float32 GEMM of the codes, the same bits) and the scales are applied after it, in the
order and with the rounding of transformers' packed `BitLinear` (`bitft export --packed`; ws is
its stored weight_scale), so training, `bitft eval` and the packed export give the same logits
bit for bit. transformers' AutoBitLinear (stock loading of an unpacked bitft checkpoint) multiplies
dequantized values instead and agrees to float32 rounding (~1e-7 relative), not bit for bit.

Saved for the backward at λ = 1: the int8 activation codes and their per-token scales (1 byte per
value; layers fed the same input tensor, like q/k/v, share one set), and the weight's 2-bit codes
from the cache below; no float copy of either. Below λ = 1 the blended input lerp(x', xc/a, λ) is
computed once per input tensor (shared like the codes) and saved in place of x', so the backward
does not blend it again. Autocast: the integer product and the scales run in float32 and y is cast to the
autocast dtype; the backward's matmuls run in that dtype (bf16 backward under bf16 autocast).

Weight cache (once per optimizer step): the codes of a trainable weight are computed at its first
forward after a change and kept packed, 2 bits per weight in the packed export's layout (int8 where
out_features % 4 != 0), and unpacked into a temporary at each use; keyed on the Parameter's identity,
data_ptr and `_version` (bumped by in-place optimizer updates and load_state_dict); a torch
optimizer-step pre-hook (below) frees the cache, which also catches updates that bypass `_version`
(DeepSpeed ZeRO-2 all-gathers into flat buffers, writes through `.data`).
Gradient-accumulation micro-batches, activation-checkpoint recomputation and no_grad forwards
(evaluation, generation) reuse the codes. The optimizer-step pre-hook frees every cached code and the
CPU workspace (bitft.kernels) before the optimizer runs, so BitLinear holds nothing through the
optimizer's own memory peak (AdamW's temporaries: the step's peak on CPU at these sizes); the next
forward quantizes the new weights into new buffers (a graph from before the step keeps the codes of
its own forward). Not cached: frozen weights (LoRA bases: peft's merge writes `.data += ΔW` in
place, which no counter sees; they are quantized per forward and again in the backward, so
nothing per layer is held between them), and DeepSpeed ZeRO-3 partitioned parameters (`ds_id`):
a cache would keep every layer's codes alive, 2 bits per parameter of the full model, unsharded,
so they are quantized in the forward and again in the backward from the re-gathered weight, which
is saved instead of its codes (one more quantization per layer and micro-batch, no gathered copy
held; tests/recipes: ZeRO-3 with 2 CPU processes gives the single-process losses). Weights changed through `.data` outside an optimizer step:
call `clear_weight_cache()`.

The optional SubLN norm is transformers' LlamaRMSNorm under the name `rms_norm`, the name and
math of transformers' own AutoBitLinear(use_rms_norm=True), so such checkpoints stay loadable
by stock transformers.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from bitft.kernels import activation_codes, code_matmul, codes_of, dequantize, free_workspace, weight_codes
from bitft.quant import blend, packed_weight_scale, quantize_activation, quantize_weight


def check_lambda(value: float) -> float:
    """λ as a float in [0, 1], or a ValueError that names the problem."""
    try:
        lam = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"λ must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= lam <= 1.0:  # also rejects NaN
        raise ValueError(f"λ must be in [0, 1] (0 = original model, 1 = ternary), got {value!r}")
    return lam


# ----------------------------------------------------------------------------- weight-code cache
CACHE_WEIGHTS = True  # False: quantize the weight at every forward (tests compare the two)
_CACHED: "weakref.WeakSet[BitLinear]" = weakref.WeakSet()


def clear_weight_cache() -> None:
    """Free every cached weight code (the next forward re-quantizes into a new buffer)."""
    for m in list(_CACHED):
        m._wcache = None
    _CACHED.clear()


def _on_optimizer_step(optimizer, args, kwargs) -> None:
    clear_weight_cache()  # every cached code is stale: freed before the optimizer allocates its temporaries
    free_workspace()


register_optimizer_step_pre_hook(_on_optimizer_step)


def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


# ----------------------------------------------------------------------------- shared activation codes
_LAST = threading.local()  # the codes of the last input tensor, while that tensor lives


def _activation_codes_shared(x: torch.Tensor, lam: float = 1.0, dtype=None):
    """(xc, a, xb): x's activation codes, and for 0 < λ < 1 the blended input lerp(x, xc/a, λ) in DTYPE
    (None at λ = 1), computed once for all the layers fed the same tensor (q/k/v, gate/up)."""
    blended = lam != 1.0
    if x.is_inference():  # no version counter to tell an in-place change: quantized afresh every time
        xc, a = activation_codes(x)
        return xc, a, _blend_input(x, xc, a, lam, dtype) if blended else None
    last = getattr(_LAST, "entry", None)
    if last is None or last[0]() is not x or last[1] != x._version:
        xc, a = activation_codes(x)
        last = _LAST.entry = [weakref.ref(x, lambda _: setattr(_LAST, "entry", None)), x._version, xc, a, {}]
    xb = None
    if blended:
        xb = last[4].get((lam, dtype))
        if xb is None:
            xb = last[4][(lam, dtype)] = _blend_input(x, last[2], last[3], lam, dtype)
    return last[2], last[3], xb


def _blend_input(x, xc, a, lam, dtype):
    with torch.no_grad():  # a constant of BitLinearFunction (its grad_x is the straight-through one)
        return torch.lerp(x, dequantize(xc, a, x.dtype, "xq"), lam).to(dtype)


def _weight_at(weight, wc, inv, lam):
    """lerp(W, Q(W), λ) in W's dtype, a temporary: blended in place in the dequantize workspace (a fresh
    float copy of every weight, twice per step, cost ~40% of the blend)."""
    wq = dequantize(wc, inv, weight.dtype, "wf")
    return torch.lerp(weight, wq, lam, out=wq) if wq.dtype == weight.dtype else torch.lerp(weight, wq, lam)


# ----------------------------------------------------------------------------- the autograd function
class BitLinearFunction(torch.autograd.Function):
    """y = BitLinear(x) for λ > 0 with straight-through gradients; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, xc, a, xb, wstore, inv, lam, out_dtype, save_weight):
        k = x.shape[-1]
        lead = x.shape[:-1]
        wc = codes_of(wstore)
        with torch.autocast(x.device.type, enabled=False):
            if lam == 1.0:
                acc = code_matmul(xc.reshape(-1, k), wc)
                y = torch.div(acc, packed_weight_scale(inv) * a.reshape(-1, 1)).to(out_dtype)
                if bias is not None:
                    y += bias.to(out_dtype)
                saved = (xc, a)
            else:  # xb = lerp(x, xc/a, λ), shared by the layers fed x; saved: the backward's grad_W needs it
                wb = _weight_at(weight, wc, inv, lam).to(out_dtype)
                y = F.linear(xb, wb, None if bias is None else bias.to(out_dtype))
                saved = (xb,)
        ctx.lam, ctx.lead, ctx.has_bias = lam, lead, bias is not None
        ctx.x_dtype, ctx.w_dtype, ctx.out_dtype = x.dtype, weight.dtype, out_dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        ctx.save_weight = save_weight  # weight itself (codes recomputed in the backward) or its codes
        if save_weight:
            ctx.save_for_backward(*saved, weight)
        elif lam == 1.0:
            ctx.save_for_backward(*saved, wstore, inv)
        else:
            ctx.save_for_backward(*saved, weight, wstore, inv)
        return y.reshape(*lead, weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        lam, dt = ctx.lam, ctx.out_dtype
        if lam == 1.0:
            xc, a, *rest = ctx.saved_tensors
        else:
            xb, *rest = ctx.saved_tensors
        if ctx.save_weight:
            (weight,) = rest
            wc, inv = weight_codes(weight)
        elif lam == 1.0:
            wstore, inv = rest
            wc = codes_of(wstore)
            weight = None
        else:
            weight, wstore, inv = rest
            wc = codes_of(wstore)
        n, k = wc.shape
        gy = grad_y.reshape(-1, n).to(dt)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            wq = dequantize(wc, inv, ctx.w_dtype, "wf") if lam == 1.0 else _weight_at(weight, wc, inv, lam)
            grad_x = gy.mm(wq.to(dt)).reshape(*ctx.lead, k).to(ctx.x_dtype)
            del wq
        if ctx.needs_input_grad[1]:
            xq = dequantize(xc, a, ctx.x_dtype, "xq") if lam == 1.0 else xb
            grad_w = gy.t().mm(xq.reshape(-1, k).to(dt)).to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = gy.sum(0).to(ctx.b_dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None


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
        self._wcache = None

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

    def weight_codes(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(store, inv, cached): the weight's codes (int8, or 2-bit packed uint8 when cached) and 1/s."""
        w = self.weight
        if not (CACHE_WEIGHTS and w.requires_grad) or is_zero3_param(w):
            return (*weight_codes(w), False)
        key = (id(w), w.data_ptr(), w._version, w.shape, w.dtype, w.device)
        cache = getattr(self, "_wcache", None)
        if cache is None or cache[0] != key:
            store, inv = weight_codes(w, packed=w.shape[0] % 4 == 0)  # 2 bits per weight held, unpacked per use
            cache = self._wcache = (key, store, inv)
            _CACHED.add(self)
        return cache[1], cache[2], True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        lam = self.lam
        if lam == 0.0:
            return F.linear(x, self.weight, self.bias)
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        xc, a, xb = _activation_codes_shared(x, lam, out_dtype)
        wc, inv, cached = self.weight_codes()
        save_weight = not cached  # then the backward re-quantizes the weight instead of holding its codes
        return BitLinearFunction.apply(x, self.weight, self.bias, xc, a, xb, wc, inv, lam, out_dtype, save_weight)

    def fake_quant_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The textbook fake-quant forward (bitft ≤ 0.1): dequantized float copies into F.linear,
        straight-through gradients. Same gradients as `forward`; at λ=1 its values are AutoBitLinear's
        bit for bit and `forward`'s to float32 rounding. Kept as the reference for tests and benchmarks."""
        if self.rms_norm is not None:
            x = self.rms_norm(x)
        lam = self.lam
        if lam == 0.0:
            return F.linear(x, self.weight, self.bias)
        return F.linear(blend(x, quantize_activation(x), lam), blend(self.weight, quantize_weight(self.weight), lam),
                        self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lam={self.lam:g}, subln={self.rms_norm is not None}"

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_wcache"] = None
        return state
