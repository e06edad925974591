"""SubLN placements: where an RMSNorm sits before BitLinear's activation quantizer.

    subln=True ("all")   an RMSNorm inside every BitLinear (BitLinear.rms_norm; transformers'
                         AutoBitLinear use_rms_norm): 7 per Llama block
    subln="bitnet"       BitNet's and BitDistill's two per block, before o_proj and before down_proj:
                         attn(x) = o_proj(RMSNorm(softmax(QKᵀ/√d)·V)),  ffn(x) = down(RMSNorm(act(gate x)·up x))

The "bitnet" placement is exactly transformers' BitNet architecture with the source's activation
(SiLU for Llama: the 1bitLLM model, which llama.cpp's `bitnet` graph runs), so a Llama converted with
it *becomes* a BitNetForCausalLM: same weights under the same names, plus `self_attn.attn_sub_norm`
and `mlp.ffn_sub_norm` (weights 1). Everything downstream (stock transformers' online and packed
loading, the GGUF `bitnet` graph, bitft.families) then treats it as the BitNet it is. Like any
SubLN, the norms change the function even at λ=0; training adapts to them.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def parse_subln(value) -> bool | str:
    """False, True or "bitnet" from a flag or config value (bool, "true"/"all", "false"/"off", "bitnet")."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    v = str(value).strip().lower()
    if v in ("true", "all", "on", "1"):
        return True
    if v in ("false", "off", "none", "0", ""):
        return False
    if v == "bitnet":
        return "bitnet"
    raise ValueError(f"subln must be false, true (all: a norm in every BitLinear) or bitnet (two per block, "
                     f"before o_proj and down_proj), got {value!r}")


def bitnet_config_from(fields: dict, **over):
    """transformers' BitNetConfig from a config's FIELDS (a dict), less the keys that name another class,
    remote code or a quantizer; OVER sets others (the activation)."""
    from transformers import BitNetConfig

    drop = ("architectures", "model_type", "transformers_version", "quantization_config", "bitft", "auto_map", *over)
    new = BitNetConfig(**{k: v for k, v in fields.items() if k not in drop}, **over)
    new.architectures = ["BitNetForCausalLM"]
    return new


def bitnet_config(config):
    """transformers' BitNetConfig of the same shape as a Llama CONFIG, with its activation."""
    if getattr(config, "model_type", None) != "llama":
        raise ValueError(f"subln='bitnet' turns a Llama into transformers' BitNet; {type(config).__name__} is not a Llama "
                         "(use subln=true, a norm in every BitLinear, for other architectures)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("subln='bitnet': this Llama has linear biases, which transformers' BitNet has no place for")
    return bitnet_config_from(config.to_dict())


def to_bitnet(model: nn.Module) -> nn.Module:
    """A BitNetForCausalLM holding MODEL's (a LlamaForCausalLM's) tensors, plus sub-norms of weight 1.
    Shares MODEL's Parameters (no copy); works on meta models too."""
    from transformers import BitNetForCausalLM

    config = bitnet_config(model.config)
    ref = next(model.parameters())
    state = dict(model.state_dict())
    for i in range(config.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.attn_sub_norm.weight"] = torch.ones(config.hidden_size, dtype=ref.dtype, device=ref.device)
        state[f"model.layers.{i}.mlp.ffn_sub_norm.weight"] = torch.ones(config.intermediate_size, dtype=ref.dtype, device=ref.device)
    with torch.device("meta"):
        new = BitNetForCausalLM(config)
    new.load_state_dict(state, strict=True, assign=True)
    if ref.device.type != "meta":  # non-persistent buffers (rotary frequencies) were made on meta: rebuild them
        new.model.rotary_emb = type(new.model.rotary_emb)(config=config).to(ref.device)
    if config.tie_word_embeddings:
        new.lm_head.weight = new.model.embed_tokens.weight
    left = [n for n, t in [*new.named_parameters(), *new.named_buffers()] if t.device.type == "meta" and ref.device.type != "meta"]
    if left:
        raise RuntimeError(f"to_bitnet left tensors uninitialized: {left}")
    return new.train(model.training)
