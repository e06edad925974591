"""The model families bitft recognizes, in one table, and the one strict way every folder is loaded.

    family           recognized by (config.json)                          loaded as
    bitft            a `bitft` record                                     bitft checkpoint at its λ
    1bitLLM          architectures [BitnetForCausalLM] (model_type llama)  transformers' BitNetForCausalLM, SiLU,
                                                                          inner_attn_ln -> attn_sub_norm,
                                                                          ffn_layernorm -> ffn_sub_norm
    packed           quantization_config bitnet, linear_class bitlinear    the config's class, each uint8 weight
                     (HF1BitLLM, bitnet-b1.58-2B-4T, bitft --packed)      unpacked into master weights (below)
    BitNet           model_type bitnet with master weights (2B4T-bf16)    as stored
    full precision   anything else                                        as stored

The first three below "bitft" are already ternary: they become BitLinear at λ=1 on every layer they
quantize (and only those); λ<1 has no meaning without full-precision weights and is refused. No
custom code runs, ever (`trust_remote_code` stays off).

Unpacking. A packed layer stores codes c ∈ {-1, 0, 1} and weight_scale w = 1/s; its forward is
(x_int8 · cᵀ) / (w · a). Master weights c·s would re-quantize to the scale s·p (p = share of non-zero
codes: absmean averages the zeros in). The master weight is instead M = c · s/p: mean|M| = s and
round(M/s) = c/p clamped to c (|c/p| ≥ 1 > 0.5). The magnitude s/p is then nudged by float32 ulps
until bitft's own quantizer gives back c and exactly w, so that the λ=1 forward equals the packed one
bit for bit. Not every float w is 1/(1/inv) of a float32 inv (about 80% of bf16 values are): for the
others the nearest (one ulp, ~1e-7 relative) is kept and the load says how many layers that is.
Scales written by absmean in float32 (bitft's own --packed) always come back exactly. A
stock-transformers online load of the master weights recomputes the same absmean.

Strict loading: any checkpoint tensor left unused, or model tensor left uninitialized, is an error
naming the keys (grouped by layer) and the family. Tied weights are not "missing"; a stored rotary
`inv_freq` (a buffer transformers recomputes) is not "unused".
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from bitft.errors import BitftError


@dataclass(frozen=True)
class Family:
    name: str
    ternary: bool  # already ternary: BitLinear at λ=1 on load, λ<1 refused
    recognized_by: str


BITFT = Family("bitft checkpoint", False, "a `bitft` record in config.json")
ONEBITLLM = Family("1bitLLM BitNet", True, "architectures [BitnetForCausalLM] (model_type llama)")
PACKED = Family("packed BitNet", True, "quantization_config quant_method bitnet, linear_class bitlinear (or none)")
BITNET = Family("BitNet (master weights)", True, "model_type bitnet, quantization online or none")
FULL = Family("full precision", False, "anything else")

ONEBITLLM_KEYS = {r"\.self_attn\.inner_attn_ln\.": ".self_attn.attn_sub_norm.",
                  r"\.mlp\.ffn_layernorm\.": ".mlp.ffn_sub_norm."}
RECOMPUTED = re.compile(r".*rotary_emb\.inv_freq$")


def read_config(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise BitftError(f"cannot read {path}/config.json: {e}") from None


def recognize(config: dict) -> Family:
    """The family of a checkpoint from its config.json (a dict)."""
    qc = config.get("quantization_config") or {}
    if config.get("bitft"):
        return BITFT
    if (config.get("architectures") or [None])[0] == "BitnetForCausalLM":
        return ONEBITLLM
    if qc.get("quant_method") == "bitnet" and qc.get("linear_class", "bitlinear") == "bitlinear":
        return PACKED
    if config.get("model_type") == "bitnet" or qc.get("quant_method") == "bitnet":
        return BITNET
    return FULL


def check_ternary_request(family: Family, source, lam: float | None, targets=None, exclude=None, subln=False) -> None:
    """Refuse, before any weight loads, what has no meaning for an already-ternary model: λ<1 (no
    full-precision weights to blend) and a layer selection or SubLN (its ternary layers are fixed)."""
    if not family.ternary:
        return
    if lam is not None and lam != 1.0:
        raise BitftError(f"{source} is already ternary ({family.name}): λ={lam:g} has no meaning without full-precision "
                         "weights; start at λ=1 (lambda_schedule: constant, lambda_value: 1)")
    if targets or exclude or subln:
        raise BitftError(f"{source} is already ternary ({family.name}): its ternary layers are fixed, so targets, "
                         "exclude and subln do not apply; remove them")


def check_loading(info: dict, family: Family, path, tied: set[str] = frozenset()) -> None:
    """Refuse a load that left a checkpoint tensor unused or a model tensor uninitialized."""
    from bitft.surgery import summarize_names

    unused = sorted(k for k in info.get("unexpected_keys", ()) if not RECOMPUTED.fullmatch(k))
    missing = sorted(set(info.get("missing_keys", ())) - set(tied))
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ()))
    problems = []
    if unused:
        problems.append(f"{len(unused)} checkpoint tensors it would drop: {summarize_names(unused)}")
    if missing:
        problems.append(f"{len(missing)} model tensors the checkpoint lacks: {summarize_names(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} tensors of the wrong shape: {summarize_names(mismatched)}")
    if problems:
        raise BitftError(f"{path} read as {family.name} ({family.recognized_by}) leaves "
                         + "; ".join(problems) + ": the checkpoint is of another kind or incomplete, "
                         "and bitft never drops weights silently")


def tied_keys(model) -> set[str]:
    return {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()


def load_folder(path: Path, dtype=torch.float32):
    """(model, family, targets, note) from a model folder, strictly. TARGETS: for an already-ternary family,
    the names of the linears it quantizes (to become BitLinear at λ=1), else None; NOTE: what unpacking
    changed, or "". Nothing converted here."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bitft.subln import bitnet_config_from

    raw = read_config(path)
    family = recognize(raw)
    kwargs = {}
    if family is ONEBITLLM:
        kwargs = dict(config=bitnet_config_from(raw, hidden_act="silu"), key_mapping=ONEBITLLM_KEYS)
    elif family is BITNET and raw.get("quantization_config"):
        config = AutoConfig.from_pretrained(path)
        del config.quantization_config  # plain nn.Linear holding the master weights
        kwargs = dict(config=config)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise BitftError(f"transformers cannot load {path} ({family.name}): {str(e).strip().splitlines()[0]}") from None
    check_loading(info, family, path, tied_keys(model))
    if family is ONEBITLLM:
        # transformers saves a model under the names it was read from (it reverts key_mapping): forget the
        # 1bitLLM names, so that what bitft writes is a transformers BitNet checkpoint
        model._weight_conversions = None
    targets, note = None, ""
    if family is PACKED:
        targets, note = unpack_model(model, dtype)
    elif family.ternary:
        from bitft.surgery import candidate_linears

        skip = set((raw.get("quantization_config") or {}).get("modules_to_not_convert") or [])
        targets = [n for n in candidate_linears(model) if n not in skip and n.rsplit(".", 1)[-1] not in skip]
    return model.eval(), family, targets, note


def unpack_model(model, dtype) -> tuple[list[str], str]:
    """Replace every packed transformers BitLinear by an nn.Linear of master weights (module docstring).
    Returns their names and a note on the scales' exactness. The model is left without a quantizer, as a plain model of its class."""
    from transformers.integrations.bitnet import BitLinear as PackedLinear

    from bitft.quant import packed_weight_scale, unpack_ternary, weight_codes

    names, errors = [], []
    for name, m in list(model.named_modules()):
        if not isinstance(m, PackedLinear):
            continue
        if m.rms_norm is not None:
            raise BitftError(f"{name} is a packed BitLinear with its own RMSNorm (use_rms_norm): bitft loads such "
                             "exports from the bitft checkpoint they came from, not from the packed files")
        dt = dtype if isinstance(dtype, torch.dtype) else torch.float32  # "auto": float32, where the scales are exact
        lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dt)
        codes = unpack_ternary(m.weight)
        master, _ = master_weight(codes, m.weight_scale)
        with torch.no_grad():
            lin.weight.copy_(master)
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        got_codes, inv = weight_codes(lin.weight)  # measured on what is stored (bf16 rounds the master weights)
        if not torch.equal(got_codes, codes):
            raise BitftError(f"{name}: its codes do not survive {dt} master weights: load it in float32")
        target = m.weight_scale.float().reshape(())
        errors.append(abs(packed_weight_scale(inv) - target).item() / target.item())
        model.set_submodule(name, lin)
        names.append(name)
    if not names:
        raise BitftError("the config says packed BitNet but no layer loaded as a packed BitLinear")
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    inexact = [e for e in errors if e]
    return names, (f"scales exact on all {len(errors)} layers" if not inexact else
                                   f"scales exact on {len(errors) - len(inexact)} of {len(errors)} layers, the others "
                                   f"within {max(inexact):.1e} ({'float32 absmean cannot give them exactly' if dt == torch.float32 else f'{dt} master weights; float32 would be exact or within 1.2e-7'})")


def master_weight(codes: torch.Tensor, ws: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(M, error): float32 master weights whose absmean quantization gives exactly CODES and a weight_scale
    as near WS as float32 allows; error = |ws(M) - WS| / WS, 0 when exact (module docstring).
    Coarse: one magnitude for every non-zero code, stepped by ulps until ws(M) crosses WS. Fine: the first
    K non-zeros one ulp larger, K by bisection (the mean moves by ~1/n of its ulp per K)."""
    from bitft.quant import packed_weight_scale, weight_codes

    target = ws.float().reshape(()).item()
    nz = codes.flatten().nonzero().flatten()
    if len(nz) == 0:
        return torch.zeros(codes.shape), 0.0
    c = codes.float().flatten()

    def build(mag, k=0):
        m = c * mag
        if k:
            m[nz[:k]] = c[nz[:k]] * torch.nextafter(mag, torch.tensor(math.inf))
        got_codes, inv = weight_codes(m)
        assert torch.equal(got_codes, codes.flatten())  # |c/p| >= 1 always rounds and clamps back to c
        return m, packed_weight_scale(inv).item()

    mag = torch.tensor((1.0 / target) * codes.numel() / len(nz), dtype=torch.float32)
    m, got = build(mag)
    for _ in range(256):  # a larger magnitude gives a larger absmean, so a smaller 1/s
        if got == target:
            return m.reshape(codes.shape), 0.0
        step = torch.nextafter(mag, torch.tensor(math.inf if got > target else -math.inf))
        m2, got2 = build(step)
        if (got2 > target) != (got > target) or got2 == target:
            lo = mag if got > target else step  # ws(lo) > target >= ws(lo + 1 ulp)
            break
        mag, m, got = step, m2, got2
    else:
        lo = mag
    a, b = 0, len(nz)
    best = min((build(lo, k) for k in (0, b)), key=lambda r: abs(r[1] - target))
    while b - a > 1:  # ws(lo, K) falls as K grows
        k = (a + b) // 2
        mk, gk = build(lo, k)
        if abs(gk - target) < abs(best[1] - target):
            best = (mk, gk)
        if gk == target:
            break
        a, b = (k, b) if gk > target else (a, k)
    return best[0].reshape(codes.shape), abs(best[1] - target) / target
