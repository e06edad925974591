"""`bitft convert`: a source model (hub id, folder, GGUF, `smollm2`) -> a converted checkpoint.

A converted checkpoint is the source's own tensors (BitLinear keeps the full-precision master
weight under the nn.Linear name) plus a config.json that records the conversion. So converting a
safetensors folder copies its shards byte for byte and never loads a tensor: time is a file copy,
memory is a meta-device skeleton. A GGUF source (or a folder with only pickled weights) is loaded
once, dequantized by transformers, converted in place and saved: peak memory is one model.
A source that is already ternary (bitft.families: 1bitLLM, packed, BitNet) is loaded strictly by its
family and written as a bitft checkpoint at λ=1 (λ<1 refused); `bitft convert` says so in one line.
A safetensors tensor that no model parameter reads is an error, never copied along silently.

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
from bitft.card import write_card
from bitft.errors import BitftError
from bitft.families import FULL, PACKED, check_loading, check_ternary_request, read_config, recognize, tied_keys
from bitft.export.gguf_vocab_copy import save_source_tokenizer
from bitft.files import INDEX, atomic_dir, check_output, copy_side_files, safetensors_header
from bitft.sources import check_causal_lm, load_gguf, resolve_source
from bitft.subln import parse_subln
from bitft.surgery import convert_model

SUBLN_SHARD = "bitft-subln.safetensors"


def convert_checkpoint(source: str, output: str | os.PathLike, *, lam: float = 1.0, targets=None, exclude=None,
                       subln: bool = False, overwrite: bool = False, gguf_dtype=torch.float32) -> dict:
    """`bitft convert`: SOURCE -> converted checkpoint in OUTPUT. Returns a summary dict.

    gguf_dtype: the dtype a GGUF source is dequantized to (a safetensors folder keeps its own).
    """
    try:
        lam = check_lambda(lam)
        subln = parse_subln(subln)
    except ValueError as e:
        raise BitftError(str(e)) from None
    out = Path(output)
    check_output(out, overwrite)
    path = resolve_source(source)
    family = FULL if path.is_file() else recognize(read_config(path))
    check_ternary_request(family, source, lam, targets, exclude, subln)  # a bitft checkpoint: check_causal_lm refuses
    with atomic_dir(out, overwrite) as tmp:
        if family.ternary:
            model, how = _convert_ternary(path, tmp, source, family, lam, targets, exclude, subln)
        elif path.is_file():
            model, tokenizer = load_gguf(path, gguf_dtype)
            model = _convert(model, source, lam, targets, exclude, subln)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            save_source_tokenizer(path, tmp)  # its tokenizer.ggml.* keys, for a verbatim GGUF export
            how = "GGUF loaded, dequantized, converted, saved"
        else:
            model, how = _convert_folder(path, tmp, source, lam, targets, exclude, subln)
        write_card(tmp, tmp, name=out.name, source=source)
    meta = model.config.bitft
    return {"output": str(out), "architecture": type(model).__name__, "converted": meta["modules"],
            "lambda": meta["lambda"], "subln": parse_subln(subln), "how": how, "family": family.name}


def _convert_ternary(path: Path, tmp: Path, source, family, lam, targets, exclude, subln):
    """An already-ternary model (bitft.families): loaded strictly, its ternary layers made BitLinear at λ=1.
    Packed weights become float32 master weights (the only dtype in which they reproduce the codes and
    scales exactly); other families keep their dtype."""
    from bitft.sources import load_model

    loaded = load_model(str(path), dtype=torch.float32 if family is PACKED else "auto", lam=lam,
                        convert={"targets": targets, "exclude": exclude, "subln": subln})
    copy_side_files(path, tmp)
    loaded.model.save_pretrained(tmp)
    return loaded.model, f"{family.name}, already ternary: loaded and written at λ=1 ({loaded.what})"


def _convert(model, source, lam, targets, exclude, subln):
    check_causal_lm(model.config, source)
    try:
        return convert_model(model, lam=lam, targets=targets, exclude=exclude, subln=subln)
    except ValueError as e:
        raise BitftError(str(e)) from None


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
    tied = tied_keys(model)
    if shards and needed - tied <= set(stored):  # the byte copy would carry tensors no model reads
        check_loading({"unexpected_keys": set(stored) - needed}, FULL, path)
    if not shards or not needed - tied <= set(stored):  # (subln="bitnet" adds norms: loaded and saved too)
        # Pickled weights (pytorch_model.bin: unpickled with weights_only, tensors and plain containers
        # only), or names that transformers renames on load: take the slow, sure path.
        try:
            loaded, info = AutoModelForCausalLM.from_pretrained(path, dtype="auto", weights_only=True,
                                                                output_loading_info=True)
        except pickle.UnpicklingError as e:
            raise BitftError(f"{path}: its pickled weights hold more than tensors, and bitft unpickles weights "
                             f"only ({str(e).splitlines()[0][:120]}); convert them to safetensors first") from None
        check_loading(info, FULL, path, tied_keys(loaded))
        copy_side_files(path, tmp)
        converted = _convert(loaded, source, lam, targets, exclude, subln)
        converted.save_pretrained(tmp)
        return converted, "weights loaded, converted, saved"

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
