"""`bitft export --gguf`: a llama.cpp model file whose ternary weights stay ternary.

A converted linear W (master weight) is written as its λ=1 value q(W) = codes · s, in:
    TQ2_0  2 bits a weight + one fp16 scale per 256 (2.06 bits/weight)   rows must be a multiple of 256
    TQ1_0  5 ternary digits a byte + one fp16 scale per 256 (1.69 b/w)   rows must be a multiple of 256
    F16    fallback for a tensor whose rows do not fit the type's blocks: ternary · s, exact up to fp16
    Q8_0   only as --type q8_0 (a baseline): one fp16 scale d = max|x|/127 per 32, ±127·d exact up to fp16
    I2_S   bitnet.cpp's type: 2 bits a weight + one fp32 scale per tensor; rows must be a multiple of 128,
           others F16 (bitft/export/gguf_i2s.py); runs in bitnet.cpp (microsoft/BitNet) only
The fallback is F16, not Q8_0 (1.06 bits a weight less): on CPUs with AMX, llama.cpp repacks Q4/Q8
weights into its AMX buffer, whose matmul crashes (ggml-org/llama.cpp#20824); F16 runs everywhere.
("rows" = in_features, the length llama.cpp quantizes along.) Never a lossy type: Q4_0 would lose
up to 12.5% of each ternary value. Embeddings, lm_head and norms are written F16 (or F32, --float-type).
The gguf package quantizes (its TQ1_0/TQ2_0 bytes match llama.cpp's) and writes the file.

Architectures (bitft/export/gguf_arch.py): Llama (rope scaling `llama3`/`linear`, tied or untied
lm_head), Mistral, Qwen2/2.5 (q/k/v biases, F32), Qwen3 (q/k norms), Gemma-3 text; SubLN is refused:
llama.cpp's graphs have no norm before each projection. The tokenizer: byte-level BPE with llama.cpp's
name for its pre-tokenizer detected from the tokenizer itself, SentencePiece (BPE or Unigram), or the
source GGUF's own `tokenizer.ggml.*` keys copied back: bitft/export/gguf_vocab.py.
llama.cpp quantizes activations its own way (Q8_K per 256 values, Q8_0 per 32) rather than per token,
so its logits are close to, not equal to, bitft's W1.58A8.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from bitft.card import check_card_free, write_card
from bitft.errors import BitftError
from bitft.files import disk_full_error, is_disk_full, temp_path
from bitft.export.gguf_arch import arch_of, check_config, write_hparams
from bitft.export.gguf_i2s import BLOCK, FILE_TYPE_I2_S, I2_S, LAYOUT_KEY, check_runs_in_bitnet_cpp, fallback_line, \
    quantize_i2s, run_command
from bitft.export.gguf_vocab import gguf_vocab
from bitft.export.packed import (
    _tensors_from_merged_lora,
    _tensors_from_shards,
    read_checkpoint_config,
)
from bitft.quant import ternarize

TERNARY_TYPES = ("tq2_0", "tq1_0")
EXACT_TYPES = TERNARY_TYPES + ("i2_s", "q8_0", "f16")  # q8_0 / f16 for every linear: baselines for benchmarks


def _permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotary layout (halves) -> llama.cpp's (interleaved pairs), per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export_gguf(checkpoint, output, *, qtype: str = "tq2_0", float_type: str = "f16", tokenizer_pre: str | None = None,
                overwrite: bool = False, merge_lora: bool = False) -> list[tuple[str, str]]:
    """Write CHECKPOINT (λ=1) as a GGUF file at OUTPUT; returns the size table rows.
    tokenizer_pre: llama.cpp's pre-tokenizer name; None detects it from the tokenizer."""
    import gguf

    if qtype not in EXACT_TYPES:
        raise BitftError(f"--type must be one of {', '.join(EXACT_TYPES)} (types that hold ternary values exactly), got {qtype!r}")
    out = Path(output)
    if out.exists() and not overwrite:
        raise BitftError(f"{out} exists: pass --overwrite to replace it, or choose another --output")
    check_card_free(out)  # its card goes beside it: refused now, not after the GGUF is in place
    ckpt = Path(checkpoint)
    config, adapter = read_checkpoint_config(ckpt, merge_lora)
    source = Path(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]) if adapter else ckpt
    meta = config["bitft"]
    arch = arch_of(config)
    if meta["subln"]:
        raise BitftError("the checkpoint uses SubLN (a norm before every projection), for which llama.cpp's graphs have "
                         "no place: export it --packed instead")
    if config.get("mlp_bias") or (config.get("attention_bias") and arch.gguf_arch != "QWEN2"):
        raise BitftError(f"the model has linear biases that llama.cpp's {arch.gguf_arch.lower()} graph has no place for")

    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    n_layers = config["num_hidden_layers"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    ternary = {f"{m}.weight" for m in meta["modules"]}
    model_arch = getattr(gguf.MODEL_ARCH, arch.gguf_arch)
    name_map = gguf.get_tensor_name_map(model_arch, n_layers)
    Q = gguf.GGMLQuantizationType
    tqt = {"tq2_0": Q.TQ2_0, "tq1_0": Q.TQ1_0, "i2_s": I2_S, "q8_0": Q.Q8_0, "f16": Q.F16}[qtype]
    ftype = {"f16": Q.F16, "f32": Q.F32}[float_type]
    check_config(config, arch, head_dim)
    if arch.tied_output and not config.get("tie_word_embeddings") and not adapter:
        check_tied_output(source, arch)  # before any tensor is quantized (a merged adapter: checked below)
    vocab = gguf_vocab(source, config["vocab_size"], tokenizer_pre)  # refusals before any file
    bitnet_cpp = qtype == "i2_s" or arch.name is not None  # a file only bitnet.cpp runs
    if bitnet_cpp:
        check_runs_in_bitnet_cpp(arch.graph(), vocab, qtype)

    tmp = temp_path(out)  # .NAME.tmp-PID@HOST; stale ones of NAME (their writer gone) removed first
    writer = gguf.GGUFWriter(tmp, arch.graph())
    try:
        writer.add_name(config.get("_name_or_path") or ckpt.name)
        extra = write_hparams(writer, config, arch, head_dim)
        F = gguf.LlamaFileType
        writer.add_file_type({"tq2_0": F.MOSTLY_TQ2_0, "tq1_0": F.MOSTLY_TQ1_0, "i2_s": FILE_TYPE_I2_S, "q8_0": F.MOSTLY_Q8_0,
                              "f16": F.MOSTLY_F16}[qtype])
        if qtype == "i2_s":
            writer.add_uint32(LAYOUT_KEY, BLOCK["x86"])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.write(writer, source)

        counts: dict[str, list[int]] = {}  # type name -> [tensors, elements, bytes]
        fallbacks: dict = {}  # I2_S: (row length, type written instead) -> linear tensors
        for name, data in extra.items():
            writer.add_tensor(name, data, raw_dtype=Q.F32)
            c = counts.setdefault("F32", [0, 0, 0])
            c[0], c[1], c[2] = c[0] + 1, c[1] + data.size, c[2] + data.nbytes
        tensors = _tensors_from_merged_lora(adapter) if adapter else _tensors_from_shards(source)
        embed = lm_head = None
        for name, t in tensors:
            if name == "model.embed_tokens.weight":
                embed = t
            if name == "lm_head.weight" and (config.get("tie_word_embeddings") or arch.tied_output):
                lm_head = None if config.get("tie_word_embeddings") else t  # untied: must equal the embeddings
                continue
            for hf, mapped in arch.hf_aliases:
                name = name.replace(hf, mapped)
            gname = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise BitftError(f"no llama.cpp {arch.gguf_arch.lower()} tensor for {name}: the graph has no place for it")
            if arch.permute_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
                t = _permute_rows(t, n_head if name.endswith("q_proj.weight") else n_kv)
            if name in ternary:
                codes, s = ternarize(t)
                data = (codes.float() * s).numpy()
                rows = data.shape[-1]
                block = 256 if tqt in (Q.TQ2_0, Q.TQ1_0) else BLOCK["x86"] if tqt == I2_S else 32 if tqt == Q.Q8_0 else 1
                qt = tqt if rows % block == 0 else Q.F16  # not Q8_0: llama.cpp's AMX matmul crashes on it
            else:
                t = t.float()
                if arch.norm_offset and name.endswith("norm.weight"):
                    t = t + arch.norm_offset
                data = t.numpy()
                qt = Q.F32 if data.ndim == 1 else ftype
            if qt == I2_S:  # gguf-py has no I2_S: int8 bytes and the shape given, so that it leaves both alone
                q = quantize_i2s(codes.numpy(), float(s))
                writer.add_tensor(gname, q.view("int8"), raw_shape=data.shape, raw_dtype=qt)
            else:
                q = gguf.quants.quantize(data, qt)
                writer.add_tensor(gname, q, raw_dtype=qt)
            if name in ternary and tqt == I2_S and qt != I2_S:
                fallbacks[rows, qt.name] = fallbacks.get((rows, qt.name), 0) + 1
            c = counts.setdefault(("ternary " if name in ternary else "") + qt.name, [0, 0, 0])
            c[0], c[1], c[2] = c[0] + 1, c[1] + data.size, c[2] + q.nbytes
        if lm_head is not None and not (embed is not None and torch.equal(embed, lm_head)):
            raise untied_error(arch)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException as e:
        writer.close()
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and is_disk_full(e, out.parent):
            raise disk_full_error(out, written) from None
        raise
    write_card(out, ckpt)
    return (gguf_size_table(counts, out) + [("architecture", f"{arch.graph()}, {vocab.describe()}")]
            + [("I2_S fallback", fallback_line(fallbacks, BLOCK["x86"]))] * bool(fallbacks)
            + [("runs in", run_command(out.name))] * bitnet_cpp)


def untied_error(arch) -> BitftError:
    return BitftError(f"llama.cpp's {arch.gguf_arch.lower()} graph uses the token embeddings as the output "
                      "layer, and this model has its own lm_head: export it --packed instead")


def check_tied_output(ckpt: Path, arch) -> None:
    """Refuse an lm_head that differs from the embeddings (the graph has no output tensor) up front."""
    from safetensors import safe_open

    found = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in {"model.embed_tokens.weight", "lm_head.weight"} & set(f.keys()):
                found[name] = f.get_tensor(name)
    if "lm_head.weight" in found and not torch.equal(found["lm_head.weight"], found.get("model.embed_tokens.weight")):
        raise untied_error(arch)


def gguf_size_table(counts: dict, out: Path) -> list[tuple[str, str]]:
    rows = [(f"{k} tensors", f"{n} tensors, {el:,} values, {b:,} B = {8 * b / el:.3f} bits each")
            for k, (n, el, b) in sorted(counts.items())]
    lin = [(el, b) for k, (n, el, b) in counts.items() if k.startswith("ternary")]
    el, b = sum(x for x, _ in lin), sum(y for _, y in lin)
    total = sum(el for _, el, _ in counts.values())
    rows += [("bits per linear weight", f"{8 * b / max(el, 1):.3f}"),
             ("file", f"{out.stat().st_size:,} B  (bf16: {2 * total:,} B, {2 * total / out.stat().st_size:.2f}x larger)")]
    return rows
