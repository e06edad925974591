"""`bitft export --packed`: transformers' offline BitNet format, which stock transformers loads.

For every converted layer, the master weight W becomes
    weight        uint8 [out/4, in]: codes round(W / s) ∈ {-1, 0, 1} stored as code + 1, 2 bits each,
                  rows cut into four blocks of out/4, block i in bits 2i..2i+1 (bitft.quant.pack_ternary)
    weight_scale  [1] = 1 / s, s = max(mean|W|, 1e-5): transformers' `bitlinear` class computes
                  y = (x_int8 · codesᵀ) / (weight_scale · a), a = 127 / max|x|, so it *divides* by it
                  (its `autobitlinear` class multiplies: a different convention, not this one)
and config.json says `quant_method: bitnet, linear_class: bitlinear, quantization_mode: offline`.
Every other tensor is copied unchanged. Tensors are read one at a time from the checkpoint's
shards; the packed model (~1/8 of bf16 for the linears) is assembled in memory and saved.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from bitft.card import write_card
from bitft.errors import BitftError
from bitft.files import atomic_dir, copy_side_files, safetensors_header
from bitft.quant import pack_ternary, ternarize

PACKED_CONFIG = {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}


def read_checkpoint_config(ckpt: Path, merge_lora: bool = False) -> tuple[dict, Path | None]:
    """(config.json of the bitft model, the LoRA adapter folder or None), refusing what cannot be exported."""
    adapter = None
    if (ckpt / "adapter_config.json").is_file():
        if not merge_lora:
            raise BitftError(f"{ckpt} holds LoRA adapters that are not merged: pass --merge-lora to merge them "
                             "into the master weights and re-ternarize")
        adapter = ckpt
        base = json.loads((ckpt / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or not (Path(base) / "config.json").is_file():
            raise BitftError(f"the adapters in {ckpt} name base model {base!r}, which is not a local folder")
        ckpt = Path(base)
    elif merge_lora:
        raise BitftError(f"--merge-lora: {ckpt} has no adapter_config.json, there is nothing to merge")
    if not (ckpt / "config.json").is_file():
        raise BitftError(f"{ckpt} has no config.json: pass a folder written by `bitft convert` or a training run")
    config = json.loads((ckpt / "config.json").read_text())
    meta = config.get("bitft")
    if not meta:
        raise BitftError(f"{ckpt} is not a bitft checkpoint (no 'bitft' record in config.json): run `bitft convert` first")
    if meta["lambda"] != 1.0:
        raise BitftError(f"{ckpt} is at λ={meta['lambda']:g}: an export is the ternary model, so train (or set) "
                         "it to λ=1 first (bitft.set_lambda(model, 1) and save)")
    return config, adapter


def _tensors_from_shards(ckpt: Path):
    for shard in sorted(ckpt.glob("*.safetensors")):
        safetensors_header(shard)
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _tensors_from_merged_lora(adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import bitft  # noqa: F401  (the base reloads with BitLinear)

    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto")
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    state = merged.state_dict()
    if getattr(merged.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    yield from state.items()


def export_packed(checkpoint, output, *, overwrite: bool = False, merge_lora: bool = False) -> list[tuple[str, str]]:
    """Write the packed export of CHECKPOINT into OUTPUT; returns the size table rows."""
    from huggingface_hub import save_torch_state_dict

    ckpt = Path(checkpoint)
    config, adapter = read_checkpoint_config(ckpt, merge_lora)
    source = Path(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]) if adapter else ckpt
    meta = config["bitft"]
    weights = {f"{m}.weight" for m in meta["modules"]}
    shapes = {k: v["shape"] for s in source.glob("*.safetensors") for k, v in safetensors_header(s).items() if k in weights}
    odd = sorted(k for k, shape in shapes.items() if shape[0] % 4)
    if odd:
        raise BitftError(f"{len(odd)} converted layers have out_features not divisible by 4 (e.g. {odd[0]} "
                         f"{shapes[odd[0]]}), which the packed format cannot hold: exclude them when converting")

    state, counts = {}, {"linear weights": 0, "packed bytes": 0, "scale bytes": 0, "other params": 0, "other bytes": 0}
    tensors = _tensors_from_merged_lora(adapter) if adapter else _tensors_from_shards(source)
    for name, t in tensors:
        if name in weights:
            codes, s = ternarize(t)
            state[name] = pack_ternary(codes)
            state[name[: -len("weight")] + "weight_scale"] = (1.0 / s).reshape(1).to(t.dtype)
            counts["linear weights"] += t.numel()
            counts["packed bytes"] += state[name].numel()
            counts["scale bytes"] += t.element_size()
        else:
            state[name] = t.contiguous()
            counts["other params"] += t.numel()
            counts["other bytes"] += t.numel() * t.element_size()
    missing = weights - set(state)
    if missing:
        raise BitftError(f"{source} lacks {len(missing)} converted weights (e.g. {sorted(missing)[0]}): the checkpoint is incomplete")

    config = dict(config)
    config.pop("bitft")
    config["quantization_config"] = {**PACKED_CONFIG, "modules_to_not_convert": meta["modules_to_not_convert"],
                                     "use_rms_norm": meta["subln"], "rms_norm_eps": meta["rms_norm_eps"]}
    config["bitft_export"] = {"format": "packed", "converted_layers": len(weights)}
    with atomic_dir(Path(output), overwrite) as tmp:
        save_torch_state_dict(state, tmp, max_shard_size="5GB")
        copy_side_files(source, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_card(tmp, ckpt, name=Path(output).name)
    return size_table(counts, Path(output))


def size_table(c: dict, out: Path) -> list[tuple[str, str]]:
    n = c["linear weights"]
    params = n + c["other params"]
    disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return [
        ("ternary linear weights", f"{n:,} in uint8, 4 per byte: {c['packed bytes']:,} B + {c['scale bytes']:,} B of scales"),
        ("bits per linear weight", f"{8 * (c['packed bytes'] + c['scale bytes']) / max(n, 1):.3f}"),
        ("full-precision tensors", f"{c['other params']:,} params (embeddings, norms, lm_head): {c['other bytes']:,} B"),
        ("safetensors on disk", f"{disk:,} B"),
        ("same model in bf16", f"{2 * params:,} B  ({2 * params / max(disk, 1):.2f}x larger)"),
    ]
