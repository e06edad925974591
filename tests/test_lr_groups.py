"""full_precision_lr_scale: the parameters that stay full precision learn at lr × scale, the ternary ones at lr."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments, default_data_collator

import bitft
from bitft.bitlinear import BitLinear
from bitft.config import ModelArguments
from bitft.errors import ConfigError
from bitft.train.trainer import BitftTrainer
from helpers import tiny_model


def trained_once(tmp_path, scale: float):
    model = bitft.convert_model(tiny_model(), lam=1.0).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [{"input_ids": torch.randint(0, 128, (16,)), "labels": torch.randint(0, 128, (16,))} for _ in range(2)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, learning_rate=1e-2, lr_scheduler_type="constant",
                             per_device_train_batch_size=2, use_cpu=True, report_to="none", save_strategy="no")
    trainer = BitftTrainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator)
    trainer.full_precision_lr_scale = scale
    trainer.train()
    return model, before, trainer.optimizer


def test_scale_0_trains_the_ternary_weights_only(tmp_path):
    model, before, _ = trained_once(tmp_path, 0.0)
    ternary = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, BitLinear)}
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == ternary  # embeddings, norms, head: unchanged; every BitLinear weight: changed


def test_scale_sets_the_full_precision_groups_learning_rate(tmp_path):
    model, _, opt = trained_once(tmp_path, 0.1)
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr[id(model.model.embed_tokens.weight)] == pytest.approx(1e-3)
    assert lr[id(model.model.norm.weight)] == pytest.approx(1e-3)
    assert lr[id(model.model.layers[0].mlp.down_proj.weight)] == pytest.approx(1e-2)
    assert len(lr) == sum(1 for _ in model.parameters())  # every parameter in exactly one group


def test_negative_scale_is_refused():
    with pytest.raises(ConfigError, match="full_precision_lr_scale must be >= 0"):
        ModelArguments(model_name_or_path="x", full_precision_lr_scale=-1)
