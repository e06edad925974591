"""Learned equalization inside the block phase (OmniQuant's LET, arXiv 2308.13137), folded so the model stays plain.

While decoder block k is trained (bitft.train.blockwise, `block_equalize: true`), four per-channel scale vectors
s = exp(t), t = 0 at the start, are trained with it (the block's AdamW, lr `block_equalize_learning_rate`) and
multiplied into the weights that the block's forward reads:

    s_attn  [d]          input_layernorm           g → g / s_attn      q, k, v     W → W · diag(s_attn)
    s_mlp   [d]          post_attention_layernorm  g → g / s_mlp       gate, up    W → W · diag(s_mlp)
    s_o     [n_kv · hd]  v_proj    W → diag(s_o)⁻¹ · W,  b → b / s_o
                         o_proj    W → W · diag(ŝ_o),    ŝ_o = s_o repeated over the query heads of each KV group
    s_d     [d_ff]       up_proj   W → diag(s_d)⁻¹ · W,  b → b / s_d
                         down_proj W → W · diag(s_d)

Each pair computes the same function in full precision (λ = 0):
  (RMSNorm(x) ⊙ g/s) · (W · diag(s))ᵀ = (RMSNorm(x) ⊙ g) · Wᵀ;
  attention mixes each KV head's value vectors over positions with weights that do not depend on v, so v's
  output channels divided by s_o divide the attention output of every query head of that group by s_o,
  which o_proj's columns multiply back (GQA: head h reads KV head h // (n_heads / n_kv), as repeat_kv does);
  down((act(gate(x)) ⊙ up(x) / s_d) · diag(s_d)) = down(act(gate(x)) ⊙ up(x)): exact through SwiGLU.
At λ = 1 they differ: the rescaled weights get other ternary codes and absmean scales, the rescaled inputs of
q/k/v, gate/up, o and down other int8 codes; the block's reconstruction loss trains t for that.

Mechanics: torch.nn.utils.parametrize on each of these tensors, reading the shared `BlockScales` module
attached to the layer as `layer.equalize` (its t are the layer's parameters, its state_dict keys
`equalize.t_*`, so a resumed block's state.pt loads once `attach` has run). `fold` removes the
parametrizations with leave_parametrized=True (the Parameters keep their identity and take the folded
values) and the module: block_K.pt, the end-to-end phase and every export see a plain block.
Refused in one line (`check`): norms that do not multiply by their weight (Gemma's x̂ · (1 + g)), SubLN
BitLinear (a norm between the folded scale and the weight), blocks of another layout than Llama's.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from bitft.errors import ConfigError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # Llama's block: pre-norms, q/k/v/o, SwiGLU gate/up/down
NORMS = ("input_layernorm", "post_attention_layernorm")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# (module, tensor, scale vector, how): "col" W · diag(s), "row" diag(s)⁻¹ · W, "div" a vector divided by s
FOLDS = (("input_layernorm", "weight", "attn", "div"), ("self_attn.q_proj", "weight", "attn", "col"),
         ("self_attn.k_proj", "weight", "attn", "col"), ("self_attn.v_proj", "weight", "attn", "col"),
         ("post_attention_layernorm", "weight", "mlp", "div"), ("mlp.gate_proj", "weight", "mlp", "col"),
         ("mlp.up_proj", "weight", "mlp", "col"),
         ("self_attn.v_proj", "weight", "o", "row"), ("self_attn.v_proj", "bias", "o", "div"),
         ("self_attn.o_proj", "weight", "o_query", "col"),
         ("mlp.up_proj", "weight", "d", "row"), ("mlp.up_proj", "bias", "d", "div"), ("mlp.down_proj", "weight", "d", "col"))


def _refuse(why: str):
    raise ConfigError(f"block_equalize: {why}; set block_equalize: false")


def _sub(layer: nn.Module, name: str):
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None


def check(model) -> None:
    """One ConfigError line where the scales cannot be folded exactly into MODEL's decoder blocks."""
    from bitft.bitlinear import BitLinear
    from bitft.train.feature_kd import decoder_layers

    family = getattr(model.config, "model_type", type(model).__name__)
    for k, layer in enumerate(decoder_layers(model)):
        missing = [n for n in LINEARS + NORMS if _sub(layer, n) is None]
        if missing:
            _refuse(f"{family} block {k} has no {', '.join(missing)}: the folds need Llama's block layout")
        for name in NORMS:
            norm = _sub(layer, name)
            w = norm.weight.detach()
            x = torch.randn(2, w.shape[0], dtype=w.dtype, device=w.device, generator=torch.Generator().manual_seed(0)
                            if w.device.type == "cpu" else None)
            with torch.no_grad():
                y, y2 = (torch.func.functional_call(norm, {"weight": c * w}, (x,)) for c in (1.0, 2.0))
            if not torch.allclose(y2, 2 * y, rtol=1e-2, atol=1e-6):
                _refuse(f"{family} block {k}'s {name} ({type(norm).__name__}) does not multiply by its weight "
                        "(a (1 + weight) norm, as Gemma's): a scale cannot be folded into it exactly")
        if any(isinstance(m, BitLinear) and m.rms_norm is not None for m in layer.modules()):
            _refuse("the BitLinear layers have a SubLN norm, which would normalize the folded scales away")
    if family not in FAMILIES:
        _refuse(f"model type {family}: its block is not one the folds are known to be exact for ({', '.join(FAMILIES)})")


class BlockScales(nn.Module):
    """t_attn, t_mlp [d], t_o [n_kv · hd], t_d [d_ff]: the logs of one block's scale vectors (float32)."""

    def __init__(self, layer: nn.Module, n_kv: int):
        super().__init__()
        v, o = layer.self_attn.v_proj, layer.self_attn.o_proj
        kw = dict(dtype=torch.float32, device=v.weight.device)
        d = layer.input_layernorm.weight.shape[0]
        for name, n in (("attn", d), ("mlp", d), ("o", v.out_features), ("d", layer.mlp.up_proj.out_features)):
            setattr(self, f"t_{name}", nn.Parameter(torch.zeros(n, **kw)))
        if v.out_features % n_kv or o.in_features % v.out_features:
            _refuse(f"v_proj has {v.out_features} outputs and o_proj {o.in_features} inputs for {n_kv} KV heads: "
                    "not a GQA layout")
        self.head_dim, self.groups = v.out_features // n_kv, o.in_features // v.out_features

    def vector(self, name: str) -> torch.Tensor:
        if name == "o_query":  # o_proj's inputs: query head h reads KV head h // groups
            s = self.t_o.exp().view(-1, 1, self.head_dim)
            return s.expand(-1, self.groups, -1).reshape(-1)
        return getattr(self, f"t_{name}").exp()


class _Fold(nn.Module):
    """The parametrization of one tensor: W · diag(s), diag(s)⁻¹ · W or b / s, s from the layer's BlockScales."""

    def __init__(self, scales: BlockScales, which: str, how: str):
        super().__init__()
        object.__setattr__(self, "scales", scales)  # a reference, not a child: its t stay the layer's parameters once
        self.which, self.how = which, how

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = self.scales.vector(self.which).to(w.dtype)
        if self.how == "col":
            return w * s
        return w / (s[:, None] if self.how == "row" else s)


def attach(layer: nn.Module, config) -> BlockScales:
    """Parametrize LAYER's weights by a new BlockScales (t = 0: the same values), attached as `layer.equalize`;
    CONFIG: the model's (its number of KV heads)."""
    scales = BlockScales(layer, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    layer.equalize = scales
    for module, tensor, which, how in FOLDS:
        m = layer.get_submodule(module)
        if getattr(m, tensor, None) is not None:
            parametrize.register_parametrization(m, tensor, _Fold(scales, which, how))
    return scales


def is_attached(layer: nn.Module) -> bool:
    return isinstance(getattr(layer, "equalize", None), BlockScales)


def fold(layer: nn.Module) -> dict:
    """Write the scales into LAYER's tensors and remove them (a plain block again); returns the range of each s."""
    from bitft.bitlinear import clear_weight_cache

    scales = layer.equalize
    ranges = {name: [round(v.min().item(), 4), round(v.max().item(), 4)]
              for name in ("attn", "mlp", "o", "d") for v in [scales.vector(name).detach()]}
    for m in layer.modules():
        if parametrize.is_parametrized(m):
            for tensor in list(m.parametrizations.keys()):
                parametrize.remove_parametrizations(m, tensor, leave_parametrized=True)
    del layer.equalize
    clear_weight_cache()  # the folded Parameters changed through set_, outside an optimizer step
    return ranges


def param_groups(layer: nn.Module, lr: float) -> list[dict]:
    """LAYER's parameters for its optimizer: the block's, then the t of its attached BlockScales at LR (if any)."""
    scales = list(layer.equalize.parameters()) if is_attached(layer) else []
    ids = {id(p) for p in scales}
    rest = [{"params": [p for p in layer.parameters() if id(p) not in ids]}]
    return rest + [{"params": scales, "lr": lr}] if scales else rest
