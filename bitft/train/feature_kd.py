"""Feature distillation: what the student's layers compute, matched to the teacher's (bitft.train.distill).

Relation distillation (MiniLM-v2, BitDistill) at one decoder layer: for X in {Q, K, V} (the layer's
q/k/v projection outputs, captured by forward hooks, so any attention implementation works), split
into R relation heads (R = the model's key-value heads),

    A_X = softmax(X_r · X_rᵀ / √d_r)   over the positions of a row (padding masked),
    L_attn = mean over X, heads and valid rows of KL(A_X^T ‖ A_X^S).

Hidden-state distillation (TernaryBERT's layer-wise term, made scale-free): with h_l the output of
decoder layer l (the last one after the final norm, what the output head reads) at a valid position t,

    L_hid = mean over t of  (1/L) Σ_l ‖h_l^S(t) − h_l^T(t)‖² / ‖h_l^T(t)‖².

Each layer gets its own target from the first step, where the logits terms reach the early layers only
through everything above them; dividing by the teacher's norm keeps the residual stream's growth with
depth (and the first position's huge norm) from weighting some layers and tokens over the others.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitft.errors import ConfigError


def relation_kl(student: torch.Tensor, teacher: torch.Tensor, heads: int, mask: torch.Tensor) -> torch.Tensor:
    """Mean over heads and valid rows of KL(softmax(X_T X_Tᵀ/√d) ‖ softmax(X_S X_Sᵀ/√d)), X: [B, T, D]."""
    def relations(x):
        b, t, d = x.shape
        x = x.float().view(b, t, heads, d // heads).transpose(1, 2)  # [B, R, T, d_r]
        scores = x @ x.transpose(-1, -2) / math.sqrt(d // heads)
        return F.log_softmax(scores.masked_fill(~mask[:, None, None, :], -1e9), dim=-1)  # padding: weight 0

    log_t, log_s = relations(teacher), relations(student)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # [B, R, T]
    rows = mask[:, None, :].expand_as(kl)
    return kl[rows].mean()


class ProjectionCapture:
    """Forward hooks that keep the outputs of a decoder layer's q/k/v projections for one forward."""

    NAMES = ("q_proj", "k_proj", "v_proj")

    def __init__(self, model: nn.Module, layer: int):
        layers = decoder_layers(model)
        try:
            attn = layers[layer].self_attn
        except IndexError:
            raise ConfigError(f"attention_distill_layer={layer}: the model has {len(layers)} decoder layers") from None
        self.outputs: dict[str, torch.Tensor] = {}
        missing = [n for n in self.NAMES if not hasattr(attn, n)]
        if missing:
            raise ConfigError(f"attention distillation needs q_proj/k_proj/v_proj in the attention block; "
                              f"{type(attn).__name__} has no {', '.join(missing)}")
        self.handles = [getattr(attn, n).register_forward_hook(self._keep(n)) for n in self.NAMES]

    def _keep(self, name):
        def hook(module, args, output):
            self.outputs[name] = output
        return hook

    def take(self) -> list[torch.Tensor]:
        out = [self.outputs.pop(n) for n in self.NAMES]
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layers (a peft wrapper or a CausalLM around it: the first `layers` ModuleList)."""
    for module in model.modules():
        if isinstance(getattr(module, "layers", None), nn.ModuleList):
            return module.layers
    raise ConfigError(f"feature distillation cannot find the decoder layers of {type(model).__name__}")


def hidden_state_error(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                       mask: torch.Tensor) -> torch.Tensor:
    """L_hid: the mean over MASK's positions ([B, T] bool) of the layers' mean relative squared error.
    STUDENT / TEACHER: a model's `hidden_states` (the embeddings, then each decoder layer's output)."""
    if len(student) != len(teacher):
        raise ConfigError(f"hidden-state distillation needs models of the same depth: the student has "
                          f"{len(student) - 1} decoder layers, the teacher {len(teacher) - 1}")
    per_token = sum(((s.float() - t.float()).pow(2).sum(-1) / t.float().pow(2).sum(-1).clamp_min(1e-12))
                    for s, t in zip(student[1:], teacher[1:]))
    return per_token[mask].mean() / (len(student) - 1)
