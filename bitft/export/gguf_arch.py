"""What llama.cpp needs to know per architecture: its graph, its rotary layout, its hyper-parameters.

Tensor names come from the gguf package (`TensorNameMap` for the graph's MODEL_ARCH, which also lists
the tensors each graph has: q/k biases for qwen2, q/k norms for qwen3 and gemma3, Gemma's four norms
a block); an architecture here is one row of data:
    llama   Llama, Mistral   rotary on interleaved pairs: Q/K rows permuted from HF's halves
    qwen2   Qwen2, Qwen2.5   NeoX rotary (HF's halves as they are); q/k/v biases
    qwen3   Qwen3            NeoX rotary; RMSNorm of q and k per head; head_dim may differ from hidden/heads
    gemma3  Gemma-3 (text)   NeoX rotary; RMSNorm weights stored as w - 1 by HF (llama.cpp wants w: +1);
                             every 6th-ish layer global, others sliding-window with their own rope base
    bitnet  BitNet, SiLU     NeoX rotary; attn_sub_norm before o_proj, ffn_sub_norm before down_proj; the
            (1bitLLM)        output is the token embedding (tied)
    bitnet-b1.58             BitNet b1.58 2B4T: the bitnet graph with a relu² gated FFN (relu(gate)² · up).
            BitNet, relu²    Only bitnet.cpp (microsoft/BitNet) has it; gguf-py has no name for it, so the
                             file is written under that name with the bitnet graph's keys and tensor names
                             (the same in bitnet.cpp's llama.cpp: src/llama.cpp, LLM_ARCH_BITNET_B158)
Rope scaling: `llama3` (Llama-3.1/3.2) is a per-frequency divisor, written as the `rope_freqs` tensor
(1 at high frequencies, `factor` at low, a smooth blend between, as HF computes it); `linear` is
a GGUF key. Other kinds (yarn, dynamic, longrope) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitft.errors import BitftError


@dataclass(frozen=True)
class Arch:
    gguf_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # llama graph: HF rotary halves -> llama.cpp interleaved pairs
    norm_offset: float = 0.0  # added to every RMSNorm weight (Gemma: HF stores w - 1)
    tied_output: bool = False  # the graph has no output tensor: lm_head must equal the embeddings
    hf_aliases: tuple = ()  # (transformers' name part, the name part the gguf package maps)
    name: str | None = None  # the GGUF architecture name, when it is not gguf-py's for gguf_arch

    def graph(self) -> str:
        """general.architecture of the file."""
        import gguf

        return self.name or gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, self.gguf_arch)]


ARCHS = {
    "LlamaForCausalLM": Arch("LLAMA", permute_qk=True),
    "MistralForCausalLM": Arch("LLAMA", permute_qk=True),
    "Qwen2ForCausalLM": Arch("QWEN2"),
    "Qwen3ForCausalLM": Arch("QWEN3"),
    "Gemma3ForCausalLM": Arch("GEMMA3", norm_offset=1.0),
    "BitNetForCausalLM": Arch("BITNET", tied_output=True, hf_aliases=(("self_attn.attn_sub_norm", "self_attn.inner_attn_ln"),
                                                                       ("mlp.ffn_sub_norm", "mlp.ffn_layernorm"))),
}
BITNET_B158 = Arch("BITNET", tied_output=True, hf_aliases=ARCHS["BitNetForCausalLM"].hf_aliases, name="bitnet-b1.58")


def arch_of(config: dict) -> Arch:
    name = (config.get("architectures") or ["?"])[0]
    if name not in ARCHS:
        raise BitftError(f"{name} has no llama.cpp graph in bitft's GGUF export (it writes {', '.join(ARCHS)}): "
                         "export it --packed instead")
    act = config.get("hidden_act", "relu2")
    if name == "BitNetForCausalLM" and act == "relu2":  # llama.cpp's bitnet graph is SiLU: another model (ppl ~100, not ~17)
        return BITNET_B158
    if name == "BitNetForCausalLM" and act != "silu":
        raise BitftError(f"this BitNet uses {act}: llama.cpp's bitnet graph is SiLU and bitnet.cpp's bitnet-b1.58 relu²; "
                         "neither computes it: export it --packed instead")
    return ARCHS[name]


def rope_params(config: dict) -> tuple[dict, dict | None]:
    """(global rope parameters, sliding-window layers' rope parameters or None), transformers 4 or 5 style."""
    rp = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if "full_attention" in rp:
        return rp["full_attention"], rp.get("sliding_attention")
    if config.get("rope_local_base_freq"):  # transformers 4 Gemma-3
        return rp, {"rope_type": "default", "rope_theta": config["rope_local_base_freq"]}
    return rp, None


def rope_theta(rp: dict, config: dict) -> float:
    return float(rp.get("rope_theta", config.get("rope_theta", 10000.0)))


def llama3_rope_freqs(rp: dict, head_dim: int, theta: float) -> np.ndarray:
    """llama.cpp's rope_freqs for `llama3` scaling: the divisor of each of the head_dim/2 frequencies,
    from transformers' own llama3 frequencies (default ÷ scaled)."""
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim,
                      max_position_embeddings=int(rp["original_max_position_embeddings"] * rp["factor"]),
                      rope_parameters={**rp, "rope_type": "llama3", "rope_theta": theta})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    default = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    return (default / scaled).numpy().astype(np.float32)


def sliding_window_active(config: dict) -> bool:
    win = config.get("sliding_window")
    return bool(win) and config.get("use_sliding_window", True) and win < config["max_position_embeddings"]


def check_config(config: dict, arch: Arch, head_dim: int) -> None:
    """Refuse, in one line, what the graph cannot represent (before anything is written)."""
    if arch.gguf_arch != "GEMMA3" and sliding_window_active(config):
        raise BitftError(f"sliding-window attention ({config['sliding_window']} tokens) has no place in llama.cpp's "
                         f"{arch.gguf_arch.lower()} graph, which would attend over the whole context")
    if arch.gguf_arch == "BITNET" and arch.name is None and rope_params(config)[0].get("rope_type", "default") not in ("default", "linear"):
        raise BitftError("llama.cpp's bitnet graph has no rope_freqs tensor: only default and linear rope scaling export")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise BitftError("partial rotary embeddings are not supported by bitft's GGUF export")
    rp, swa_rp = rope_params(config)
    for what, p in (("", rp), ("on sliding-window layers ", swa_rp or {})):
        kind = p.get("rope_type", p.get("type", "default"))
        if kind not in ("default", "llama3", "linear") or (what and kind != "default"):
            raise BitftError(f"rope scaling {kind!r} {what}is not supported by bitft's GGUF export "
                             "(it writes llama3 and linear)")
    if arch.gguf_arch == "GEMMA3":
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if config.get(key) is not None:
                raise BitftError(f"{key}={config[key]} is not applied by llama.cpp's gemma3 graph")
        if config.get("query_pre_attn_scalar", head_dim) != head_dim:
            raise BitftError(f"query_pre_attn_scalar={config['query_pre_attn_scalar']} differs from head_dim={head_dim}: "
                             "llama.cpp's gemma3 graph scales attention by 1/sqrt(head_dim)")


def write_hparams(writer, config: dict, arch: Arch, head_dim: int):
    """Every GGUF key of the graph (config checked by check_config); returns the extra tensors
    (GGUF name -> float32 array) it needs."""
    import gguf

    rp, swa_rp = rope_params(config)
    theta = rope_theta(rp, config)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    extra = {}
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind == "llama3":
        extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = llama3_rope_freqs(rp, head_dim, theta)
    elif kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rp["factor"]))
    if arch.gguf_arch == "GEMMA3":
        writer.add_sliding_window(config["sliding_window"])
        if swa_rp is not None:
            writer.add_rope_freq_base_swa(float(swa_rp["rope_theta"]))
        if config.get("layer_types"):
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in config["layer_types"]])
    return extra
