"""bitft.llamacpp.open_gguf: wherever bitft opens a GGUF in llama.cpp, the extra buffer types are off.

On CPUs with AMX, llama.cpp's AMX matmul segfaults on Q4/Q8 weights (ggml-org/llama.cpp#20824); the
extra buffer types (AMX, CPU_REPACK) are where those weights go. llama.cpp's own load log says which
buffer types it considered, so the test reads it in a fresh process (a crash fails only this test).
"""

import subprocess
import sys

import pytest

from bitft.machine import cpu_flags
from helpers import REPO

pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")

CHILD = r"""
import sys
path, how = sys.argv[1], sys.argv[2]
if how == "bitft":
    from bitft.llamacpp import open_gguf
    llm = open_gguf(path, n_ctx=64, verbose=True)
else:
    import llama_cpp
    llm = llama_cpp.Llama(path, n_ctx=64, verbose=True)
llm.eval([1, 2, 3, 4])
print(f"use_extra_bufts = {llm.model_params.use_extra_bufts}", file=sys.stderr)
"""


def load_log(path, how) -> str:
    r = subprocess.run([sys.executable, "-c", CHILD, str(path), how], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"llama.cpp exit {r.returncode}:\n{r.stderr[-3000:]}"
    return r.stderr


def test_open_gguf_turns_off_the_amx_and_repacked_buffers(smollm2_gguf):
    """SmolLM2's GGUF (Q4_1 and Q8_0 weights: the types the AMX buffer takes)."""
    ours = load_log(smollm2_gguf, "bitft")
    assert "CPU_REPACK" not in ours and "AMX" not in ours.replace("AMX_INT8 = 0", "")
    assert "use_extra_bufts = False" in ours
    if {"avx2", "avx512f", "amx_int8"} & cpu_flags():  # x86 builds have the repacked (and AMX) buffer types
        stock = load_log(smollm2_gguf, "stock")
        assert "CPU_REPACK" in stock or "AMX" in stock  # what the log shows when they are on: the check can fail
