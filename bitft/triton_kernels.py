"""Fused per-token int8 activation quantization for CUDA, in Triton (one pass over x, no host sync).

    a = 127 / max(max_j |x_j|, 1e-5)        (float32, one per row)
    codes = clamp(round(x · a), -128, 127)   (int8; round half to even, as torch.round)

The values equal `bitft.kernels.activation_codes` bit for bit: torch computes `127 / t` as
reciprocal(t) · 127 (two roundings, not one division), so the kernel does too, with the IEEE
reciprocal (`div_rn`; Triton's `/` is an approximate division on CUDA); x·a is one float32 multiply,
and rounding uses the 1.5·2²³ trick, which rounds half to even for |v| < 2²² (v is clamped to
[-128, 127] first; clamping and rounding commute because the bounds are integers).

CI runs it on CPU tensors with TRITON_INTERPRET=1 (tests/test_triton_kernels.py).
Importing this module needs triton; `available()` says whether it can be used on a tensor.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ROUND_MAGIC = 12582912.0  # 1.5 · 2²³


@triton.jit
def _act_quant_kernel(x_ptr, codes_ptr, a_ptr, K, stride_x, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_x
    c_row = codes_ptr + row * K
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    m = tl.maximum(tl.max(amax, axis=0), 1e-5)
    if INTERPRET:
        r = 1.0 / m  # numpy: IEEE division
    else:
        r = tl.math.div_rn(1.0, m)
    a = r * 127.0  # torch's `127 / t` is reciprocal(t) · 127, two roundings: the same here
    tl.store(a_ptr + row, a)
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(x * a, -128.0), 127.0)
        r = (v + ROUND_MAGIC) - ROUND_MAGIC
        tl.store(c_row + offs, r.to(tl.int8), mask=offs < K)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(x: torch.Tensor) -> bool:
    """Whether the kernel runs on x's device: CUDA, or any device under TRITON_INTERPRET=1."""
    return x.is_cuda or interpreting()


def activation_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [..., K], a float32 [..., 1]) for x [..., K], in one kernel launch."""
    k = x.shape[-1]
    x2 = x.detach().reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    codes = torch.empty((m, k), dtype=torch.int8, device=x.device)
    a = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block = min(triton.next_power_of_2(k), 4096)
        _act_quant_kernel[(m,)](x2, codes, a, k, x2.stride(0), BLOCK=block, INTERPRET=interpreting())
    return codes.reshape(x.shape), a.reshape(*x.shape[:-1], 1)
