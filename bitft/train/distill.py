"""Distillation from the full-precision teacher (BitDistill, arXiv 2510.13998), for the warmup and SFT recipes.

The training loss of a distilled run, per token t that the cross-entropy counts (labels ≠ -100):

    L = (1 − α) · CE  +  α · τ² · KL(softmax(z_T/τ) ‖ softmax(z_S/τ))  +  w · L_attn  +  w_h · L_hid

z_T / z_S: the teacher's / student's next-token logits (α = `distill_alpha`, τ =
`distill_temperature`, w = `attention_distill_weight`). The teacher runs under
`inference_mode`; its logits are computed from its last hidden state one chunk of positions at a
time (`distill_chunk_size`), once, and the CE and the KL are computed together in one pass over
the vocabulary (bitft.train.logits_kd): their gradient is written in the forward pass into one
logits-sized tensor. `distill_recompute: true` holds no such tensor and recomputes it in the
backward pass instead (a 128k vocabulary at long sequences: memory over time).
`distill_top_k: K` distills only the teacher's K most likely tokens plus one tail class
(bitft.train.sparse_kd); a batch that carries them (`teacher_logp`, `teacher_ids`: a teacher cache,
bitft.train.teacher_cache) needs no teacher at all.

L_attn (relation distillation at one layer) and L_hid (every layer's relative hidden-state error,
weighted by w_h = `hidden_distill_weight`) are defined in bitft.train.feature_kd.

α = w = w_h = 0 is the plain cross-entropy recipe, computed by the same code path as before. The
teacher is frozen (eval mode, no gradients, plain nn.Linear layers: no BitLinear, no SubLN), not
seen by the optimizer, and evaluation never distills: held-out figures stay the λ=1 cross-entropy.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn as nn
from transformers import Trainer

from bitft.bitlinear import BitLinear
from bitft.errors import ConfigError
from bitft.train.feature_kd import ProjectionCapture, decoder_layers, hidden_state_error, relation_kl
from bitft.train.logits_kd import ce_and_kd, next_token_targets
from bitft.train.sparse_kd import sparse_kd_sum, teacher_top_k

logger = logging.getLogger("bitft")


# ----------------------------------------------------------------------------- the teacher

def plain_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of MODEL in which every BitLinear is the nn.Linear it was converted from
    (same weight and bias values, no SubLN norm): the full-precision model, whatever its λ."""
    teacher = copy.deepcopy(model)
    for name, module in list(teacher.named_modules()):
        if isinstance(module, BitLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device="meta", dtype=module.weight.dtype)
            linear.weight, linear.bias = module.weight, module.bias
            parent, _, child = name.rpartition(".")
            setattr(teacher.get_submodule(parent) if parent else teacher, child, linear)
    for attr in ("bitft", "quantization_config"):
        if hasattr(teacher.config, attr):
            delattr(teacher.config, attr)
    teacher.hf_quantizer = None
    teacher.requires_grad_(False)
    return teacher.eval()


def build_teacher(student: nn.Module, student_tokenizer, name_or_path: str | None = None, dtype=None) -> nn.Module:
    """The teacher: NAME_OR_PATH (any reference bitft.sources takes, same tokenizer as the student),
    or by default the student as loaded, in full precision (its λ=0 weights)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():  # the weights load partitioned: a copy would be empty, a gathered one per GPU whole
        raise ConfigError("distillation under DeepSpeed ZeRO-3 is not supported yet (the teacher is not partitioned): "
                          "use ZeRO-2 or DDP (configs/accelerate/zero2.yaml), or set distill_alpha and "
                          "attention_distill_weight to 0")
    if name_or_path:
        from bitft.sources import load_model, load_tokenizer

        tokenizer = load_tokenizer(name_or_path)  # checked before any weight is loaded
        if tokenizer is None or tokenizer.get_vocab() != student_tokenizer.get_vocab():
            raise ConfigError(f"teacher_name_or_path {name_or_path} does not share the student's tokenizer "
                              "(its vocabulary differs): distillation compares next-token distributions, so "
                              "choose a teacher of the same model family, or leave it unset (the model the run starts from)")
        teacher = plain_copy(load_model(name_or_path, dtype=dtype or next(student.parameters()).dtype).model)
    else:
        teacher = plain_copy(student)
    if dtype is not None:
        teacher.to(dtype)
    return teacher


# ----------------------------------------------------------------------------- the losses

def kd_loss_sum(student_logits: torch.Tensor, teacher_hidden: torch.Tensor, lm_head: nn.Linear, mask: torch.Tensor,
                temperature: float = 1.0, chunk_size: int = 1024, keep_grad: bool = True) -> torch.Tensor:
    """τ² · Σ over masked positions of KL(softmax(z_T/τ) ‖ softmax(z_S/τ)), teacher logits = lm_head(hidden):
    [B, T, V] student logits, [B, T, H] teacher hidden states, [B, T] mask (bitft.train.logits_kd, no CE).
    KEEP_GRAD: the gradient is kept from the forward pass (one more logits-sized tensor); else it is
    recomputed in the backward pass (the teacher's lm_head runs twice)."""
    targets = torch.where(mask.bool(), 0, -100)
    return ce_and_kd(student_logits, targets, teacher_hidden, lm_head, 0.0, 1.0, temperature, chunk_size, keep_grad)[0]


# ----------------------------------------------------------------------------- the trainer side

class DistillMixin:
    """Mix into a Trainer class before it: `class T(DistillMixin, BitftTrainerMixin, Trainer)`.

    `setup_distillation(teacher, args)` turns it on; without it (or with α = w = w_h = 0) the loss is
    the base class's. The terms are logged separately (`ce_loss`, `kd_loss`, `attention_loss`,
    `hidden_loss`), averaged over the optimizer steps since the previous log."""

    teacher: nn.Module | None = None
    teacher_cached: bool = False
    distill_alpha: float = 0.0
    distill_temperature: float = 1.0
    attention_weight: float = 0.0
    hidden_weight: float = 0.0
    distill_chunk_size: int = 1024
    distill_recompute: bool = False
    distill_top_k: int = 0

    def setup_distillation(self, teacher: nn.Module | None, args) -> None:
        """TEACHER None: the batches carry the teacher's top-k (a teacher cache)."""
        self.teacher = teacher.to(self.accelerator.device) if teacher is not None else None
        self.teacher_cached = teacher is None
        self.distill_alpha, self.distill_temperature = args.distill_alpha, args.distill_temperature
        self.attention_weight, self.distill_chunk_size = args.attention_distill_weight, args.distill_chunk_size
        self.distill_recompute = getattr(args, "distill_recompute", False)
        self.distill_top_k = getattr(args, "distill_top_k", 0)
        self.hidden_weight = getattr(args, "hidden_distill_weight", 0.0)
        self._distill_sums: dict[str, float] = {}
        self._distill_count = 0
        if self.attention_weight:
            student = self.accelerator.unwrap_model(self.model)
            self._capture = (ProjectionCapture(student, args.attention_distill_layer),
                             ProjectionCapture(self.teacher, args.attention_distill_layer))
            self._relation_heads = student.config.num_key_value_heads or student.config.num_attention_heads
        if self.hidden_weight and self.teacher is not None:  # refused before the first step, not at it
            depths = len(decoder_layers(self.accelerator.unwrap_model(self.model))), len(decoder_layers(self.teacher))
            if depths[0] != depths[1]:
                raise ConfigError(f"hidden-state distillation needs models of the same depth: the student has "
                                  f"{depths[0]} decoder layers, the teacher {depths[1]}")

    @property
    def distilling(self) -> bool:
        return (self.teacher is not None or self.teacher_cached) and (
            self.distill_alpha > 0 or self.attention_weight > 0 or self.hidden_weight > 0)

    def _scale(self, num_items_in_batch, n_local) -> tuple[float, float]:
        """(factor on a per-token sum that normalizes it like the Trainer's CE, share of an optimizer step's
        value in this micro-batch's term); the Trainer's own rule is in Trainer.training_step."""
        if self.loss_is_scaled_for_ga is False or num_items_in_batch is None or not self.model_accepts_loss_kwargs:
            return 1.0 / max(n_local, 1), 1.0 / self.current_gradient_accumulation_steps  # a per-batch mean
        world = 1  # Trainer.compute_loss's factor: tensor-parallel ranks share a batch, DataParallel sums n_gpu
        if self.args.average_tokens_across_devices:
            world = self.args.n_gpu if self.args.n_gpu > 1 else self.accelerator.num_processes // self.get_tp_size()
        return world / float(num_items_in_batch.sum() if torch.is_tensor(num_items_in_batch) else num_items_in_batch), 1.0

    def _kd_beside(self, logits, hidden, cached, mask) -> torch.Tensor:
        """τ²·ΣKL over MASK for the next-token LOGITS [B, T-1, V], where the Trainer computed the CE: from the
        teacher cache's top-k, the live teacher's top-k, or its whole vocabulary."""
        tau, chunk = self.distill_temperature, self.distill_chunk_size
        if cached:  # stored for the inputs' positions (next-token at each)
            return sparse_kd_sum(logits, cached["teacher_logp"][:, :-1], cached["teacher_ids"][:, :-1], mask, tau, chunk)
        head = self.teacher.get_output_embeddings()
        if self.distill_top_k:
            logp, ids = teacher_top_k(hidden[:, :-1], head, self.distill_top_k, tau, chunk)
            return sparse_kd_sum(logits, logp, ids, mask, tau, chunk)
        return kd_loss_sum(logits, hidden[:, :-1], head, mask, tau, chunk, keep_grad=not self.distill_recompute)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cached = {k: inputs.pop(k) for k in ("teacher_logp", "teacher_ids") if k in inputs}  # never the model's inputs
        if not (self.distilling and model.training):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self.teacher_cached and not cached:  # there is no teacher to fall back on
            raise ConfigError("teacher_cache: a training batch came without the teacher's top-k (teacher_logp, "
                              "teacher_ids); the Trainer must keep those columns (remove_unused_columns: false)")
        inputs = {**inputs, "use_cache": False, **({"output_hidden_states": True} if self.hidden_weight else {})}
        # One forward with the logits and the hidden states in the graph: the model's own, or the Trainer's
        # loss. Never the subclass's (TRL ≥ 1.x SFTTrainer runs a fused LM head that builds no logits, and its
        # return_outputs recomputes them under no_grad: every distillation term would get no gradient). A
        # distilled SFT run therefore logs no TRL token metrics (entropy, mean_token_accuracy).
        labels = inputs["labels"]
        # fused only where the Trainer's loss is the model's plain CE (no label smoothing, no compute_loss_func,
        # no context-parallel shift_labels): elsewhere the Trainer's own loss, and the KD beside it
        fused = (self.distill_alpha > 0 and not cached and not self.distill_top_k and self.label_smoother is None
                 and self.compute_loss_func is None and "shift_labels" not in inputs)
        if fused:  # the cross-entropy is computed with the KL, in one pass over the vocabulary (logits_kd)
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        else:
            ce, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        mask = labels[:, 1:] != -100  # the tokens the cross-entropy counts (SFT: the completions)
        attention_mask = inputs.get("attention_mask")
        rows = attention_mask.bool() if attention_mask is not None else torch.ones_like(labels, dtype=torch.bool)
        teacher_kwargs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        hidden = teacher_states = None
        if not cached or self.attention_weight or self.hidden_weight:
            # inference_mode (no version counters, no views tracked) unless a term saves teacher tensors for the backward
            features = self.distill_recompute or self.attention_weight or self.hidden_weight
            with torch.no_grad() if features else torch.inference_mode():
                out = self.teacher.base_model(**teacher_kwargs, output_hidden_states=bool(self.hidden_weight))
            hidden, teacher_states = out.last_hidden_state, out.hidden_states
        scale, share = self._scale(num_items_in_batch, int(mask.sum()))
        if fused:  # the weights carry the normalization, so the loss's incoming gradient is 1 (no extra pass)
            loss, ce_sum, kd_sum = ce_and_kd(outputs.logits, next_token_targets(labels), hidden,
                                             self.teacher.get_output_embeddings(), (1 - self.distill_alpha) * scale,
                                             self.distill_alpha * scale, self.distill_temperature,
                                             self.distill_chunk_size, keep_grad=not self.distill_recompute)
            terms = {"ce_loss": ce_sum * scale, "kd_loss": kd_sum * scale}
        else:  # the Trainer's loss, and the KD term beside it
            loss, terms = ce * (1 - self.distill_alpha), {"ce_loss": ce.detach().float()}
            if self.distill_alpha > 0:
                kd = self._kd_beside(outputs.logits[:, :-1], hidden, cached, mask) * scale
                loss = loss + self.distill_alpha * kd
                terms["kd_loss"] = kd.detach()
        if self.attention_weight > 0:
            s_qkv, t_qkv = self._capture[0].take(), self._capture[1].take()
            attn = sum(relation_kl(s, t, self._relation_heads, rows) for s, t in zip(s_qkv, t_qkv)) / 3
            attn = attn * int(mask.sum()) * scale  # token-weighted like the other terms
            loss = loss + self.attention_weight * attn
            terms["attention_loss"] = attn.detach()
        if self.hidden_weight > 0:
            hid = hidden_state_error(outputs.hidden_states, teacher_states, rows) * int(mask.sum()) * scale
            loss = loss + self.hidden_weight * hid
            terms["hidden_loss"] = hid.detach()
        for k, v in terms.items():
            self._distill_sums[k] = self._distill_sums.get(k, 0.0) + float(v) * share
        self._distill_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        if "loss" in logs and self.distilling and self._distill_count:
            # each micro-batch adds its share of its optimizer step's value: average over the steps since the last log
            steps = max(self._distill_count / self.args.gradient_accumulation_steps, 1e-9)
            for k, v in self._distill_sums.items():
                logs[k] = round(v / steps, 4)
            self._distill_sums, self._distill_count = {}, 0
        return super().log(logs, start_time)
