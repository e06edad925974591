"""BitLinear's compute primitives: codes, the exact integer matmul, dequantization.

The values are those of `bitft.quant` bit for bit; what this module adds is where they run:

Integer matmul, acc[m, n] = Σ_k xc[m, k] · wc[n, k] with xc ∈ [-128, 127], wc ∈ {-1, 0, 1}:
|acc| ≤ 128·K, an integer below 2²⁴ whenever K < 2¹⁷, so every float32 GEMM of the codes (any
summation order or blocking; bf16/TF32 inputs too, the codes fit their mantissas) returns it
exactly, and so does `torch._int_mm` (int32). Both give the same bits; the choice is speed only:
- CUDA: `torch._int_mm` (int8 tensor cores) where its shape rules hold (M > 16, K and N multiples
  of 8), else a float32 GEMM of the codes.
- CPU: `torch._int_mm` runs on oneDNN's VNNI/AMX kernels only where the CPU has them; on
  AVX2-only CPUs it is a scalar loop (~70× slower than the float32 GEMM). Without AVX512-VNNI or
  AMX-INT8 the float32 GEMM is used and nothing is timed; with them both kernels are timed once per
  shape (M rounded up to a power of two) and the faster is kept for the process.
- K ≥ 2¹⁷ (no LLM has such rows): `torch._int_mm`, the one exact kernel there.

CPU workspace: the float temporaries (x·a before rounding, the float codes of the fp32 GEMM, the
dequantized operands of the backward) are written into per-thread buffers that are reused by every
layer, so a BitLinear step allocates only what it returns or saves (int8 codes, y, the grads). The
workspace holds about the largest layer's weight in float32 plus a few activation-sized buffers.
Fresh temporaries of every size fragment glibc's heap (measured at SmolLM2 shapes: ~4% more peak
RSS without the workspace); on CUDA the caching allocator reuses blocks and no workspace is kept.
"""

from __future__ import annotations

import math
import threading
import time

import torch

from bitft.quant import ACT_QMAX, ACT_QMIN, EPS

EXACT_FP32_K = 1 << 17  # 128 · K < 2²⁴
_CHOICE: dict[tuple, bool] = {}  # (M bucket, K, N, threads) -> use torch._int_mm (CPU)


class _Workspace(threading.local):
    def __init__(self):
        self.bufs: dict[tuple, torch.Tensor] = {}

    def get(self, slot: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """A reusable uninitialised buffer of `shape` on CPU; None elsewhere (allocate normally)."""
        n = math.prod(shape)
        if device.type != "cpu":
            return None
        key = (slot, dtype)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < n:
            self.bufs[key] = buf = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)


WORKSPACE = _Workspace()


def free_workspace() -> None:
    """Release this thread's CPU workspace buffers (they are re-created on the next use)."""
    WORKSPACE.bufs.clear()


def _empty(slot: str, shape, dtype, device) -> torch.Tensor:
    buf = WORKSPACE.get(slot, shape, dtype, device)
    return torch.empty(shape, dtype=dtype, device=device) if buf is None else buf


# ----------------------------------------------------------------------------- codes
_TRITON: list = []


def _triton_kernels():
    """bitft.triton_kernels, or None without triton (imported once)."""
    if not _TRITON:
        try:
            from bitft import triton_kernels
        except ImportError:
            triton_kernels = None
        _TRITON.append(triton_kernels)
    return _TRITON[0]


def activation_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(xc, a): int8 clamp(round(x·a), -128, 127) and a = 127 / max(max|x|, 1e-5) per token (float32 [..., 1]).

    The values of `bitft.quant.activation_codes`; max|x| is max(max x, -min x), exact in any dtype.
    On CUDA with triton installed: one fused kernel (bitft.triton_kernels), the same values.
    """
    x = x.detach()
    if x.is_cuda and _triton_kernels() is not None:
        return _triton_kernels().activation_codes(x)
    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    a = ACT_QMAX / torch.maximum(hi, lo.neg()).float().clamp_(min=EPS)
    t = torch.mul(x, a, out=_empty("act", x.shape, torch.float32, x.device))
    return t.round_().clamp_(ACT_QMIN, ACT_QMAX).to(torch.int8), a


def weight_codes(w: torch.Tensor, packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(wc, inv): int8 clamp(round(W·inv), -1, 1), inv = 1 / max(mean|W|, 1e-5); `bitft.quant.weight_codes`'s values.

    packed: the codes as uint8 [out/4, in], 2 bits each in the packed export's layout
    (`bitft.quant.pack_ternary`; out % 4 == 0).
    """
    w = w.detach()
    if w.dtype != torch.float32:  # (w·inv with a 0-dim float32 inv would be computed in w's dtype)
        w = _empty("w32", w.shape, torch.float32, w.device).copy_(w)
    inv = 1.0 / torch.abs(w, out=_empty("wf", w.shape, torch.float32, w.device)).mean().clamp(min=EPS)
    t = torch.mul(w, inv, out=_empty("wf", w.shape, torch.float32, w.device)).round_().clamp_(-1, 1)
    if packed:  # code + 1 ∈ {0, 1, 2}; block i of out/4 rows in bits 2i..2i+1: exact in float32
        t4 = t.add_(1).view(4, w.shape[0] // 4, *w.shape[1:])
        t = torch.mul(t4[3], 4).add_(t4[2]).mul_(4).add_(t4[1]).mul_(4).add_(t4[0])
        return t.to(torch.uint8), inv
    return t.to(torch.int8), inv


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out/4, in] (`weight_codes(..., packed=True)`) -> int8 codes [out, in]: a temporary (workspace on CPU).

    Block i is (byte >> 2i) & 3, minus 1; on an int32 view of the bytes (in % 4 == 0) one shift and
    one mask handle four bytes at a time (the mask keeps bits 0-1 of every byte, which after the
    shift are bits 2i..2i+1 of that same byte; the sign bits an arithmetic shift brings in are masked off).
    """
    q = packed.shape[0]
    u = _empty("unpacked", (4, *packed.shape), torch.uint8, packed.device)
    if packed.is_contiguous() and packed.shape[-1] % 4 == 0:
        src, dst, mask = packed.view(torch.int32), u.view(torch.int32), 0x03030303
    else:
        src, dst, mask = packed, u, 3
    for i in range(4):
        torch.bitwise_right_shift(src, 2 * i, out=dst[i]).bitwise_and_(mask)
    return u.sub_(1).view(torch.int8).view(4 * q, *packed.shape[1:])


def codes_of(store: torch.Tensor) -> torch.Tensor:
    """The int8 weight codes from what the cache stores (packed uint8 or int8)."""
    return unpack_codes(store) if store.dtype == torch.uint8 else store


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, slot: str) -> torch.Tensor:
    """(codes / scale) in float32, then `dtype`: a temporary (workspace on CPU), not to be kept."""
    if dtype == torch.float32:
        return torch.div(codes, scale, out=_empty(slot, codes.shape, torch.float32, codes.device))
    return (codes / scale).to(dtype)


# ----------------------------------------------------------------------------- the integer matmul
def cpu_has_int8_gemm() -> bool:
    """True where oneDNN has VNNI/AMX int8 kernels for `torch._int_mm` (else it is a scalar loop)."""
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("avx512_vnni") or caps.get("amx_int8"))


def _int_acc(xc: torch.Tensor, wc: torch.Tensor, out=None) -> torch.Tensor:
    return torch._int_mm(xc, wc.t(), out=out) if out is not None else torch._int_mm(xc, wc.t())


def _fp32_acc(xc: torch.Tensor, wc: torch.Tensor, out=None) -> torch.Tensor:
    m, k = xc.shape
    n = wc.shape[0]
    xf = _empty("xcf", (m, k), torch.float32, xc.device)
    wf = _empty("wcf", (n, k), torch.float32, xc.device)
    xf.copy_(xc)
    wf.copy_(wc)
    return torch.mm(xf, wf.t(), out=out) if out is not None else torch.mm(xf, wf.t())


def _time(fn, *args, reps: int = 3) -> float:
    fn(*args)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t)
    return best


def use_int_mm_cpu(m: int, k: int, n: int) -> bool:
    """The CPU kernel for an [m, k] × [k, n] code product: timed once per shape on VNNI/AMX CPUs."""
    if k >= EXACT_FP32_K:
        return True
    if not cpu_has_int8_gemm():
        return False
    mb = 1 << max(m - 1, 0).bit_length()
    key = (mb, k, n, torch.get_num_threads())
    if key not in _CHOICE:
        gen = torch.Generator().manual_seed(0)  # never the global RNG: timing must not change a run
        xc = torch.randint(-128, 128, (mb, k), dtype=torch.int8, generator=gen)
        wc = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=gen)
        _CHOICE[key] = _time(_int_acc, xc, wc) < _time(_fp32_acc, xc, wc)
    return _CHOICE[key]


def code_matmul(xc: torch.Tensor, wc: torch.Tensor) -> torch.Tensor:
    """xc [M, K] (int8) · wc [N, K]ᵀ (int8): the exact integer product, as a (temporary) int32 or float32 tensor."""
    m, k = xc.shape
    n = wc.shape[0]
    if xc.is_cuda:
        if m > 16 and k % 8 == 0 and n % 8 == 0:
            return _int_acc(xc, wc)
        return torch.mm(xc.float(), wc.float().t())
    if use_int_mm_cpu(m, k, n):
        return _int_acc(xc, wc, out=_empty("acc_i", (m, n), torch.int32, xc.device))
    return _fp32_acc(xc, wc, out=_empty("acc_f", (m, n), torch.float32, xc.device))
