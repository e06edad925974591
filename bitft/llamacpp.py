"""Every GGUF that bitft (its eval backend, scripts and tests) opens in llama.cpp goes through `open_gguf`.

The one choice made here: llama.cpp's *extra buffer types* are off (`use_extra_bufts = False` in
`llama_model_params`). With them on, llama.cpp moves the weights of the types it can repack (Q4_0,
Q4_1, Q8_0, IQ4_NL, K-quants) into a CPU_REPACK or, on CPUs with AMX, an AMX buffer; the AMX matmul
segfaults on some machines (ggml-org/llama.cpp#20824, open; seen on a Sapphire-Rapids-class Xeon with
SmolLM2's Q4_1 file and with Q8_0 tensors). Off, those weights stay in the plain CPU buffer and run
llama.cpp's generic kernels for their type: no crash anywhere, at a cost for Q4/Q8 files on AVX2/AVX512
CPUs (`python scripts/bench_gguf.py --repack` measures it). bitft's ternary types (TQ1_0, TQ2_0) and F16
are never repacked, so its own exports run the same either way.

llama-cpp-python's `Llama()` has no argument for it (0.3.36): it builds the parameters from
`llama_model_default_params()` inside its constructor, so `open_gguf` gives the constructor defaults
with the field off, under a lock, and checks the field on the result. Users of the llama.cpp CLI pass
`--no-repack` (the same field); the model card of an export says so.
"""

from __future__ import annotations

import threading

_LOCK = threading.Lock()


def open_gguf(path, **kwargs):
    """llama_cpp.Llama(PATH, **KWARGS) with llama.cpp's extra (AMX / repacked) buffer types off."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    defaults = low.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    with _LOCK:
        low.llama_model_default_params = without_extra_buffers
        try:
            llm = llama_cpp.Llama(str(path), **kwargs)
        finally:
            low.llama_model_default_params = defaults
    if getattr(llm.model_params, "use_extra_bufts", False):
        raise RuntimeError("llama-cpp-python ignored use_extra_bufts = False: its Llama() builds its parameters "
                           "another way now; bitft.llamacpp.open_gguf must follow it")
    return llm
