"""bitnet.cpp's I2_S tensor type, written by bitft (stock gguf-py has no I2_S), and what runs in bitnet.cpp.

A ternary linear W = c · s (codes c ∈ {-1, 0, 1}, one float32 scale s per tensor: bitft.quant.ternarize)
is stored as q = c + 1 ∈ {0, 1, 2}, four a byte, in flat blocks of QK values over the row-major tensor:
    x86 (AVX2 build, QK = 128): block i = 32 bytes; byte b = q[128i+b]<<6 | q[128i+b+32]<<4 | q[128i+b+64]<<2 | q[128i+b+96]
    ARM (NEON build, QK = 64):  block i = 16 bytes; byte b = q[64i+b]<<6  | q[64i+b+16]<<4  | q[64i+b+32]<<2  | q[64i+b+48]
followed by s as float32 and 28 zero bytes: ne/4 + 32 bytes a tensor (GGML type 36, file type 40), 2 bits a
weight plus 32 bytes a tensor. The kernel quantizes each token's activations to int8 by absmax
(x_q = round(127 x / max|x|)), takes Σ q·x_q − Σ x_q = Σ c·x_q, and multiplies by s · max|x| / 127: the
W1.58A8 product of BitNet b1.58, per token as in bitft's own forward. Rows (in_features) must be whole
blocks. (bitnet.cpp: src/ggml-bitnet-mad.cpp quantize_i2_s, 3rdparty/llama.cpp/ggml/src/ggml.c
ggml_nbytes and the I2_S matmul.) The two layouts are not portable and the file does not say which it
holds: bitft writes x86 and records it under `bitft.i2_s.block` (128).

bitnet.cpp is a llama.cpp fork of 2024-10: of bitft's graphs it has llama, qwen2 and bitnet (1bitLLM,
SiLU), plus its own `bitnet-b1.58` (BitNet b1.58 2B4T: relu², sub-norms, the output tied to the token
embedding, NeoX rotary), and the pre-tokenizers listed below; newer ones (qwen3, gemma3, gpt-4o, ...)
do not load there.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

from bitft.errors import BitftError


class ExtraType(IntEnum):
    """GGML tensor types of bitnet.cpp that gguf-py does not know (an int to the writer, a name to readers)."""
    I2_S = 36


I2_S = ExtraType.I2_S
FILE_TYPE_I2_S = 40  # LLAMA_FTYPE_MOSTLY_I2_S (gguf-py 0.19 calls 40 MOSTLY_Q1_0)
BLOCK = {"x86": 128, "arm": 64}
LAYOUT_KEY = "bitft.i2_s.block"

# architectures whose graph bitnet.cpp's llama.cpp has (GGUF names), and its pre-tokenizers (src/llama.cpp)
BITNET_CPP_ARCHS = ("llama", "qwen2", "bitnet", "bitnet-b1.58")
BITNET_CPP_PRE = {"default", "llama3", "llama-v3", "llama-bpe", "deepseek-llm", "deepseek-coder", "falcon", "falcon3",
                  "falcon_e", "mpt", "starcoder", "gpt-2", "phi-2", "jina-es", "jina-de", "jina-v1-en", "jina-v2-es",
                  "jina-v2-de", "jina-v2-code", "refact", "command-r", "qwen2", "stablelm2", "olmo", "dbrx", "smaug-bpe",
                  "poro-chat", "chatglm-bpe", "viking", "jais", "tekken", "smollm", "codeshell", "bloom", "gpt3-finnish",
                  "exaone", "chameleon"}


def i2s_nbytes(n: int) -> int:
    return n // 4 + 32


def quantize_i2s(codes, scale: float, block: int = BLOCK["x86"]) -> np.ndarray:
    """uint8 bytes of the I2_S tensor holding CODES (any shape, rows a multiple of BLOCK) × SCALE."""
    q = (np.asarray(codes, dtype=np.int8).reshape(-1, block) + 1).astype(np.uint8)  # blocks of BLOCK values
    q = q.reshape(-1, 4, block // 4)  # [block, group g (shift 6 - 2g), position b]
    packed = (q[:, 0] << 6) | (q[:, 1] << 4) | (q[:, 2] << 2) | q[:, 3]
    tail = np.zeros(32, dtype=np.uint8)
    tail[:4] = np.frombuffer(np.float32(scale).tobytes(), dtype=np.uint8)
    return np.concatenate([packed.reshape(-1), tail])


def dequantize_i2s(data, shape, block: int = BLOCK["x86"]) -> np.ndarray:
    """float32 values of an I2_S tensor's bytes (the inverse of quantize_i2s; code 3 reads as 0, as bitnet.cpp's)."""
    n = int(np.prod(shape))
    data = np.asarray(data, dtype=np.uint8)
    if data.size != i2s_nbytes(n):
        raise ValueError(f"I2_S tensor of {n} values has {data.size} bytes, not {i2s_nbytes(n)}")
    packed = data[: n // 4].reshape(-1, 1, block // 4)
    q = (packed >> np.array([6, 4, 2, 0], dtype=np.uint8).reshape(1, 4, 1)) & 3
    scale = np.frombuffer(data[n // 4: n // 4 + 4].tobytes(), dtype=np.float32)[0]
    return (np.array([-1, 0, 1, 0], dtype=np.float32)[q.reshape(-1)] * scale).reshape(shape)


def fallback_line(fallbacks: dict, block: int) -> str:
    """One line for the linear layers written in another type (FALLBACKS: (row length, type) -> tensors)."""
    parts = ", ".join(f"{n} {t} (rows of {r} values)" for (r, t), n in sorted(fallbacks.items()))
    return (f"{sum(fallbacks.values())} linear tensors written as {parts}: I2_S needs rows that are a multiple of "
            f"{block} (bitnet.cpp's x86 block); they hold the same ternary values exactly")


def i2s_rows(meta: dict, linear: list[tuple]) -> list[tuple[str, str]]:
    """`bitft info` / card rows of a file whose linear tensors are LINEAR (gguf_header records with shapes):
    its I2_S layout and, in one line, the linear tensors written in another type."""
    if not any(t[1] == I2_S.name for t in linear):
        return []
    other: dict = {}
    for _, kind, _, _, shape, _ in linear:
        if kind != I2_S.name:
            other[shape[0], kind] = other.get((shape[0], kind), 0) + 1
    return [("I2_S layout", layout(meta))] + [("I2_S fallback", fallback_line(other, BLOCK["x86"]))] * bool(other)


def check_runs_in_bitnet_cpp(gguf_arch_name: str, vocab, qtype: str) -> None:
    """Refuse, before anything is written, a file bitnet.cpp cannot load (its graphs and pre-tokenizers).
    VOCAB: the export's bitft.export.gguf_vocab.GGUFVocab (built, or copied from a source GGUF)."""
    pre = vocab.pre if vocab.raw is None else vocab.raw.get("tokenizer.ggml.pre", {}).get("value")
    if gguf_arch_name not in BITNET_CPP_ARCHS:
        raise BitftError(f"bitnet.cpp (--type {qtype}) has no {gguf_arch_name} graph (it runs {', '.join(BITNET_CPP_ARCHS)}): "
                         "export --type tq2_0 for mainline llama.cpp instead")
    if pre is not None and pre not in BITNET_CPP_PRE:
        raise BitftError(f"bitnet.cpp's llama.cpp (2024-10) has no {pre!r} pre-tokenizer and would refuse the file: "
                         "export --type tq2_0 for mainline llama.cpp instead")


def is_bitnet_cpp_file(meta: dict, types: set[str]) -> bool:
    """Whether a GGUF (its metadata, its tensor type names) runs in bitnet.cpp only."""
    return "I2_S" in types or meta.get("general.architecture") == "bitnet-b1.58"


def layout(meta: dict) -> str:
    """The I2_S layout of a file, as far as it says."""
    block = meta.get(LAYOUT_KEY)
    if block == BLOCK["x86"]:
        return "x86 (128-value blocks, bitnet.cpp's AVX2 build; an ARM build would compute garbage)"
    if block == BLOCK["arm"]:
        return "ARM (64-value blocks, bitnet.cpp's NEON build; an x86 build would compute garbage)"
    return ("not recorded: x86 (128-value blocks) if made by an x86 build's llama-quantize, ARM (64) by an ARM "
            "one; the two are not portable")


def run_command(name: str) -> str:
    """How a user runs the file NAME in bitnet.cpp."""
    return (f"bitnet.cpp (microsoft/BitNet, built with I2_S kernels): `build/bin/llama-cli -m {name} -p \"Hello\" -n 32` "
            f"or `python run_inference.py -m {name} -p \"Hello\"`; perplexity: `build/bin/llama-perplexity -m {name} -f TEXT`")


def refuse_bitnet_cpp_only(path) -> None:
    """`bitft eval` of a GGUF only bitnet.cpp runs (I2_S, bitnet-b1.58): one line saying how to run it instead."""
    from bitft.sources import check_gguf

    meta, tensors = check_gguf(path)
    if is_bitnet_cpp_file(meta, {t[1] for t in tensors}):
        raise BitftError(f"{path} runs in bitnet.cpp only (llama-cpp-python and transformers cannot load it): measure it "
                         f"there with `build/bin/llama-perplexity -m {path} -f TEXT`, or evaluate the checkpoint it "
                         "was exported from")
