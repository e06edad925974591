"""Model surgery: choose the linear layers of the decoder blocks, check the whole request, then swap.

Candidates are the nn.Linear modules inside the model's decoder blocks (the classes its
`_no_split_modules` names: LlamaDecoderLayer, Qwen2DecoderLayer, ...). Embeddings, lm_head and
norms are never candidates. `targets` and `exclude` follow peft's `target_modules` rules:
a string is a regular expression that must match the whole module name; a list holds exact
names or suffixes ("q_proj" matches "model.layers.0.self_attn.q_proj").

Everything is validated before the first module is replaced, so a bad request leaves the model
untouched. The conversion is recorded in `model.config.bitft` (λ, SubLN, converted module names),
and `model.config.quantization_config` is kept in step with λ: at λ=1 it is transformers' own
BitNet format (`bitnet`, `autobitlinear`, `online`), which stock transformers loads; at λ<1 it is
`bitft`, which only a process that imported bitft can load.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch.nn as nn

from bitft.bitlinear import BitLinear, check_lambda

FORMAT_VERSION = 1


def block_classes(model: nn.Module) -> set[str]:
    return set(getattr(model, "_no_split_modules", None) or [])


def candidate_linears(model: nn.Module) -> "OrderedDict[str, nn.Linear]":
    """name -> nn.Linear for every linear layer inside a decoder block."""
    blocks = block_classes(model)
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} does not name its decoder block classes (_no_split_modules); "
            "bitft cannot tell the decoder's linear layers from the others: pass a transformers model"
        )
    found: OrderedDict[str, nn.Linear] = OrderedDict()
    for name, module in model.named_modules():
        if type(module).__name__ in blocks:
            for sub, lin in module.named_modules():
                if isinstance(lin, nn.Linear) and sub:
                    found[f"{name}.{sub}"] = lin
    return found


def _span(idx: list[int]) -> str:
    idx = sorted(set(idx))
    return f"{idx[0]}..{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) and len(idx) > 1 else ",".join(map(str, idx))


def summarize_names(names) -> str:
    """Names grouped by layer index: 'model.layers.{0..29}.{self_attn.q_proj,mlp.up_proj}, lm_head'."""
    groups: OrderedDict[str, OrderedDict[str, list[int]]] = OrderedDict()
    for n in names:
        m = re.search(r"\.(\d+)\.", n)
        if m is None:
            groups.setdefault(n, OrderedDict())
        else:
            groups.setdefault(n[: m.start()], OrderedDict()).setdefault(n[m.end():], []).append(int(m.group(1)))
    out = []
    for prefix, suffixes in groups.items():
        if not suffixes:
            out.append(prefix)
            continue
        by_span: OrderedDict[str, list[str]] = OrderedDict()
        for suffix, idx in suffixes.items():
            by_span.setdefault(_span(idx), []).append(suffix)
        for span, sfx in by_span.items():
            tail = sfx[0] if len(sfx) == 1 else "{" + ",".join(sfx) + "}"
            out.append(f"{prefix}.{{{span}}}.{tail}")
    return ", ".join(out)


def _matches(name: str, pattern) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def select_modules(model: nn.Module, targets=None, exclude=None) -> list[str]:
    """Names of the linear layers to convert, or a ValueError listing what was there."""
    linears = candidate_linears(model)
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear inside its decoder blocks {sorted(block_classes(model))}")
    seen = summarize_names(linears)
    for what, pat in (("targets", targets), ("exclude", exclude)):
        if pat is None:
            continue
        if isinstance(pat, str):
            try:
                re.compile(pat)
            except re.error as e:
                raise ValueError(f"{what} regex {pat!r} is invalid: {e}") from None
            if not any(_matches(n, pat) for n in linears):
                raise ValueError(f"{what} regex {pat!r} matches no linear layer of the decoder; it has: {seen}")
        else:
            for p in pat:
                if not any(_matches(n, [p]) for n in linears):
                    raise ValueError(f"{what} entry {p!r} matches no linear layer of the decoder; it has: {seen}")
    chosen = [n for n in linears if (targets is None or _matches(n, targets)) and not (exclude is not None and _matches(n, exclude))]
    if not chosen:
        raise ValueError(f"targets={targets!r} with exclude={exclude!r} leave nothing to convert; the decoder has: {seen}")
    return chosen


def bit_linears(model: nn.Module) -> "OrderedDict[str, BitLinear]":
    return OrderedDict((n, m) for n, m in model.named_modules() if isinstance(m, BitLinear))


def quantization_config(meta: dict) -> dict:
    """The `quantization_config` that matches a conversion record (`config.bitft`) and its λ."""
    if meta["lambda"] == 1.0:
        return {
            "quant_method": "bitnet",
            "linear_class": "autobitlinear",
            "quantization_mode": "online",
            "use_rms_norm": meta["subln"],
            "rms_norm_eps": meta["rms_norm_eps"],
            "modules_to_not_convert": meta["modules_to_not_convert"],
        }
    return {"quant_method": "bitft", "lambda": meta["lambda"]}


def swap_modules(model: nn.Module, names, lam: float, subln: bool, rms_norm_eps: float) -> None:
    """Replace each named nn.Linear by a BitLinear sharing its Parameters (works on meta models too)."""
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear) or isinstance(linear, BitLinear):
            raise ValueError(f"{name} is {type(linear).__name__}, not a plain nn.Linear")
        model.set_submodule(name, BitLinear.from_linear(linear, lam=lam, subln=subln, rms_norm_eps=rms_norm_eps))


def convert_model(model: nn.Module, *, lam: float = 1.0, targets=None, exclude=None, subln: bool = False,
                  rms_norm_eps: float | None = None) -> nn.Module:
    """Swap the decoder's linear layers for BitLinear, in place; returns the model.

    lam: λ in [0, 1]. targets/exclude: peft-style selection (see the module docstring).
    subln: True adds an RMSNorm before every activation quantizer; "bitnet" places two per block (before
    o_proj and down_proj, bitft.subln): a Llama then becomes a BitNetForCausalLM, returned in its place
    (sharing the Parameters). Either changes the function even at λ=0.
    """
    from bitft.subln import parse_subln, to_bitnet

    lam = check_lambda(lam)
    subln = parse_subln(subln)
    if subln == "bitnet":
        if bit_linears(model):
            raise ValueError("the model already has BitLinear layers: it was converted before (use bitft.set_lambda to change λ)")
        select_modules(model, targets, exclude)  # the whole request is checked before the new model is built
        model, subln = to_bitnet(model), False
    if bit_linears(model):
        raise ValueError("the model already has BitLinear layers: it was converted before (use bitft.set_lambda to change λ)")
    if not hasattr(model, "config"):
        raise ValueError(f"{type(model).__name__} has no .config: convert_model expects a transformers PreTrainedModel")
    names = select_modules(model, targets, exclude)
    if rms_norm_eps is None:
        rms_norm_eps = float(getattr(model.config, "rms_norm_eps", None) or 1e-6)
    swap_modules(model, names, lam, subln, rms_norm_eps)
    model.config.bitft = {
        "version": FORMAT_VERSION,
        "lambda": lam,
        "subln": bool(subln),
        "rms_norm_eps": rms_norm_eps,
        "modules": list(names),
        # every other nn.Linear (lm_head, ...): stock transformers would otherwise convert it
        "modules_to_not_convert": [n for n, m in model.named_modules()
                                   if isinstance(m, nn.Linear) and not isinstance(m, BitLinear)],
    }
    model.config.quantization_config = quantization_config(model.config.bitft)
    return model


def set_lambda(model: nn.Module, value: float) -> float:
    """Set λ on every BitLinear (and in the config that checkpoints save). Returns λ."""
    lam = check_lambda(value)
    layers = bit_linears(model)
    if not layers:
        raise ValueError("the model has no BitLinear layers: convert it first (bitft.convert_model)")
    for m in layers.values():
        m.lam = lam
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "bitft", None):
        config.bitft = {**config.bitft, "lambda": lam}
        config.quantization_config = quantization_config(config.bitft)
    return lam


def get_lambda(model: nn.Module) -> float:
    """λ of the model's BitLinear layers (they all share one)."""
    values = {m.lam for m in bit_linears(model).values()}
    if not values:
        raise ValueError("the model has no BitLinear layers: convert it first (bitft.convert_model)")
    if len(values) > 1:
        raise ValueError(f"the BitLinear layers disagree on λ: {sorted(values)}; call bitft.set_lambda")
    return values.pop()
