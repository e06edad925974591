"""`bitft convert`: a source model (hub id, folder, GGUF, `smollm2`) -> a converted checkpoint.

A converted checkpoint is the source's own tensors (BitLinear keeps the full-precision master
weight under the nn.Linear name) plus a config.json that records the conversion. So converting a
safetensors folder copies its shards byte for byte and never loads a tensor: time is a file copy,
memory is a meta-device skeleton. A GGUF source (or a folder with only pickled weights) is loaded
once, dequantized by transformers, converted in place and saved: peak memory is one model.

Every write goes to a temporary folder beside the target, renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch

from bitft.bitlinear import check_lambda
from bitft.errors import BitftError
from bitft.export.gguf_vocab_copy import save_source_tokenizer
from bitft.files import INDEX, atomic_dir, check_output, copy_side_files, safetensors_header
from bitft.sources import check_causal_lm, load_gguf, resolve_source
from bitft.surgery import convert_model

SUBLN_SHARD = "bitft-subln.safetensors"


def convert_checkpoint(source: str, output: str | os.PathLike, *, lam: float = 1.0, targets=None, exclude=None,
                       subln: bool = False, overwrite: bool = False, gguf_dtype=torch.float32) -> dict:
    """`bitft convert`: SOURCE -> converted checkpoint in OUTPUT. Returns a summary dict.

    gguf_dtype: the dtype a GGUF source is dequantized to (a safetensors folder keeps its own).
    """
    try:
        lam = check_lambda(lam)
    except ValueError as e:
        raise BitftError(str(e)) from None
    out = Path(output)
    check_output(out, overwrite)
    path = resolve_source(source)
    with atomic_dir(out, overwrite) as tmp:
        if path.is_file():
            model, tokenizer = load_gguf(path, gguf_dtype)
            _convert(model, source, lam, targets, exclude, subln)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            save_source_tokenizer(path, tmp)  # its tokenizer.ggml.* keys, for a verbatim GGUF export
            how = "GGUF loaded, dequantized, converted, saved"
        else:
            model, how = _convert_folder(path, tmp, source, lam, targets, exclude, subln)
    meta = model.config.bitft
    return {"output": str(out), "architecture": type(model).__name__, "converted": meta["modules"],
            "lambda": meta["lambda"], "subln": meta["subln"], "how": how}


def _convert(model, source, lam, targets, exclude, subln):
    check_causal_lm(model.config, source)
    try:
        convert_model(model, lam=lam, targets=targets, exclude=exclude, subln=subln)
    except ValueError as e:
        raise BitftError(str(e)) from None
    return model


def _meta_model(path: Path, source, lam, targets, exclude, subln):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise BitftError(f"cannot read {path}/config.json: {str(e).splitlines()[0]}") from None
    check_causal_lm(config, source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return _convert(model, source, lam, targets, exclude, subln), config


def _convert_folder(path: Path, tmp: Path, source, lam, targets, exclude, subln):
    """Write the converted PATH into TMP: (model, how). Copies safetensors shards where it can."""
    from transformers import AutoModelForCausalLM

    model, config = _meta_model(path, source, lam, targets, exclude, subln)
    if (path / INDEX).is_file():
        shards = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"] if (path / "model.safetensors").is_file() else []
    headers = {s: safetensors_header(path / s) for s in shards}
    stored = {k: (s, v) for s, h in headers.items() for k, v in h.items() if k != "__metadata__"}
    needed = set(model.state_dict()) - {f"{n}.rms_norm.weight" for n in model.config.bitft["modules"]}
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if not shards or not needed - tied <= set(stored):
        # Pickled weights (pytorch_model.bin: unpickled with weights_only, tensors and plain containers
        # only), or names that transformers renames on load: take the slow, sure path.
        try:
            loaded = AutoModelForCausalLM.from_pretrained(path, dtype="auto", weights_only=True)
        except pickle.UnpicklingError as e:
            raise BitftError(f"{path}: its pickled weights hold more than tensors, and bitft unpickles weights "
                             f"only ({str(e).splitlines()[0][:120]}); convert them to safetensors first") from None
        copy_side_files(path, tmp)
        _convert(loaded, source, lam, targets, exclude, subln).save_pretrained(tmp)
        return loaded, "weights loaded, converted, saved"

    # transformers reads a lone model.safetensors before any index: with a SubLN shard beside it,
    # the copy takes another name so that the index is what gets read.
    rename = {"model.safetensors": "model-main.safetensors"} if subln and shards == ["model.safetensors"] else {}
    for s in shards:
        shutil.copyfile(path / s, tmp / rename.get(s, s))
    weight_map = {k: rename.get(s, s) for k, (s, _) in stored.items()}
    if subln:
        from safetensors.torch import save_file

        norms = {}
        for name in model.config.bitft["modules"]:
            info = stored[f"{name}.weight"][1]
            norms[f"{name}.rms_norm.weight"] = torch.ones(info["shape"][1], dtype=_ST_DTYPES[info["dtype"]])
        save_file(norms, tmp / SUBLN_SHARD, metadata={"format": "pt"})
        weight_map.update({k: SUBLN_SHARD for k in norms})
    if len(set(weight_map.values())) > 1:
        total = sum((tmp / s).stat().st_size for s in set(weight_map.values()))
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    copy_side_files(path, tmp)
    # the source's own config (dtype included) plus the conversion record
    config.bitft = model.config.bitft
    config.quantization_config = model.config.quantization_config
    config.save_pretrained(tmp)
    return model, "safetensors shards copied, no tensor loaded"


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
