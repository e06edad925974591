"""What machine a result came from: the CPU, its matmul instruction sets, the package versions.

Speed depends on the CPU more than on anything bitft does (FACTS: `torch._int_mm` is a scalar loop on
AVX2-only CPUs; llama.cpp's AMX path crashes on Q4/Q8), so every table of numbers names its machine:
the test report's header, the benchmark scripts and the study scripts all print `cpu_line()`.

    kind = AMX          where the CPU has amx_int8
           AVX512-VNNI  where it has avx512_vnni
           AVX2 only    where it has avx2
           no AVX2      otherwise (ARM, old x86)
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
from pathlib import Path

MATMUL_FLAGS = ("amx_int8", "avx512_vnni", "avx512f", "avx2")
PACKAGES = ("torch", "transformers", "accelerate", "trl", "peft", "deepspeed", "llama-cpp-python", "gguf")


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_flags() -> set[str]:
    """The MATMUL_FLAGS this CPU has (empty where /proc/cpuinfo is missing)."""
    line = next((ln for ln in _cpuinfo() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split()) & set(MATMUL_FLAGS)


def cpu_kind(flags: set[str] | None = None) -> str:
    flags = cpu_flags() if flags is None else flags
    return ("AMX" if "amx_int8" in flags else "AVX512-VNNI" if "avx512_vnni" in flags
            else "AVX2 only" if "avx2" in flags else "no AVX2")


def cpu_line() -> str:
    """e.g. 'AMD EPYC, 2 cores, AVX2 only (avx2)'."""
    model = next((ln.split(":", 1)[1].strip() for ln in _cpuinfo() if ln.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = cpu_flags()
    return f"{model}, {os.cpu_count()} cores, {cpu_kind(flags)} ({' '.join(sorted(flags)) or 'none of ' + ' '.join(MATMUL_FLAGS)})"


def versions_line() -> str:
    """e.g. 'torch 2.13.0+cpu, transformers 5.25.0, …' (what a bug report or a benchmark needs)."""
    out = []
    for p in PACKAGES:
        try:
            out.append(f"{p} {md.version(p)}")
        except md.PackageNotFoundError:
            out.append(f"{p} not installed")
    return ", ".join(out)
