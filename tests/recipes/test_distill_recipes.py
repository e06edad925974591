"""Distillation inside the warmup and SFT recipes, on tiny models: α = 0 is today's recipe, the teacher
never changes, the terms are logged, a teacher with another tokenizer is refused, and evaluation stays
the λ=1 cross-entropy."""

from __future__ import annotations

import json

import pytest
import torch

from bitft.errors import ConfigError
from recipes import sft, warmup_10B
from test_sft import sft_config, tiny_bitft  # noqa: F401 (fixture)
from test_warmup import EXPECTED, MAX_STEPS, launch, tiny_config, train_logs

DISTILL = dict(distill_alpha=0.5, distill_temperature=2.0, attention_distill_weight=1.0, hidden_distill_weight=0.5,
               distill_chunk_size=7)


@pytest.mark.slow
def test_alpha_0_reproduces_the_expected_losses(tmp_path, tiny_llama_folder):
    config = tiny_config(tmp_path, tiny_llama_folder, distill_alpha=0.0, attention_distill_weight=0.0,
                         distill_temperature=3.0)
    launch(config)
    expected = json.loads(EXPECTED.read_text())["losses"]
    got = {str(s): round(h["loss"], 6) for s, h in sorted(train_logs(tmp_path / "run").items())}
    assert got == expected  # the very numbers of the plain recipe
    assert "kd_loss" not in train_logs(tmp_path / "run")[1]


def capture_teacher(monkeypatch, module):
    seen = {}
    real = module.build_teacher

    def build(student, *args, **kwargs):
        seen["student"], seen["student_before"] = student, {k: v.clone() for k, v in student.state_dict().items()}
        seen["teacher"] = real(student, *args, **kwargs)
        seen["before"] = {k: v.clone() for k, v in seen["teacher"].state_dict().items()}
        return seen["teacher"]

    monkeypatch.setattr(module, "build_teacher", build)
    return seen


def test_warmup_distills_without_touching_the_teacher(tmp_path, tiny_llama_folder, monkeypatch):
    seen = capture_teacher(monkeypatch, warmup_10B)
    config = tiny_config(tmp_path, tiny_llama_folder, max_steps=4, save_steps=100, **DISTILL)
    results = warmup_10B.main(["--config", str(config)])
    teacher = seen["teacher"]
    assert all(torch.equal(v, seen["before"][k]) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())
    logs = train_logs(tmp_path / "run")
    assert len(logs) == 4 and all({"ce_loss", "kd_loss", "attention_loss", "hidden_loss", "tokens_per_second"} <= set(h) for h in logs.values())
    for h in logs.values():  # the logged loss is the weighted sum of its logged terms
        assert h["loss"] == pytest.approx(0.5 * h["ce_loss"] + 0.5 * h["kd_loss"] + h["attention_loss"]
                                          + 0.5 * h["hidden_loss"], abs=2e-4)
    assert min(logs[4][k] for k in ("kd_loss", "attention_loss", "hidden_loss")) > 0  # λ = 0.5 at step 4: the student differs
    # the one-pass CE (bitft.train.logits_kd) is the model's own: the plain recipe's loss at its first step
    assert logs[1]["ce_loss"] == pytest.approx(json.loads(EXPECTED.read_text())["losses"]["1"], abs=1e-4)
    # held-out figures stay the λ=1 cross-entropy: the same before the first step as the plain recipe's
    assert results["before"]["eval_lambda"] == 1.0 and results["distill"]["alpha"] == 0.5
    (tmp_path / "plain").mkdir()
    ref = warmup_10B.main(["--config", str(tiny_config(tmp_path / "plain", tiny_llama_folder, max_steps=1, save_steps=100))])
    assert results["before"]["eval_loss"] == ref["before"]["eval_loss"]


def test_sft_distills_on_completion_tokens(tmp_path, tiny_bitft, monkeypatch):
    seen = capture_teacher(monkeypatch, sft)
    config = sft_config(tmp_path, tiny_bitft, max_steps=3, save_steps=100, **DISTILL)
    sft.main(["--config", str(config)])
    teacher = seen["teacher"]
    assert all(torch.equal(v, seen["before"][k]) for k, v in teacher.state_dict().items())
    logs = train_logs(tmp_path / "run")
    assert logs and all({"ce_loss", "kd_loss", "attention_loss", "hidden_loss"} <= set(h) for h in logs.values())


@pytest.mark.parametrize("recipe", ["warmup", "sft"])
def test_distillation_alone_trains_the_student(recipe, tmp_path, tiny_llama_folder, tiny_bitft, monkeypatch):
    """α = 1: the KD term is the whole loss, so it alone must move the student (TRL's SFTTrainer returns
    outputs recomputed under no_grad, which once left distilled SFT with no gradient at all)."""
    module = warmup_10B if recipe == "warmup" else sft
    seen = capture_teacher(monkeypatch, module)
    over = dict(max_steps=2, save_steps=100, distill_alpha=1.0, learning_rate=1e-3)
    config = (tiny_config(tmp_path, tiny_llama_folder, lambda_warmup_steps=0, **over) if recipe == "warmup"
              else sft_config(tmp_path, tiny_bitft, **over))
    module.main(["--config", str(config)])
    logs = train_logs(tmp_path / "run")
    assert logs and all(h["grad_norm"] > 0 and h["kd_loss"] > 0 for h in logs.values())
    moved = [k for k, v in seen["student"].state_dict().items() if not torch.equal(v, seen["student_before"][k])]
    assert any("q_proj" in k for k in moved)


def test_label_smoothing_keeps_the_trainers_loss_and_the_full_kd_beside_it(tmp_path, tiny_llama_folder):
    """The one-pass loss computes the plain CE only: with label smoothing the Trainer's loss is kept and
    the full-vocabulary KD is added to it (not a top-k one, not none)."""
    config = tiny_config(tmp_path, tiny_llama_folder, max_steps=2, save_steps=100, distill_alpha=0.5,
                         label_smoothing_factor=0.1)
    warmup_10B.main(["--config", str(config)])
    logs = train_logs(tmp_path / "run")
    assert logs[2]["kd_loss"] > 0  # step 1 is at λ = 0 (the student is the teacher), step 2 is not
    for h in logs.values():
        assert h["loss"] == pytest.approx(0.5 * h["ce_loss"] + 0.5 * h["kd_loss"], abs=2e-4)


def test_teacher_with_another_tokenizer_is_refused(tmp_path, tiny_llama_folder, smollm2_gguf):
    config = tiny_config(tmp_path, tiny_llama_folder, teacher_name_or_path=str(smollm2_gguf), distill_alpha=0.5)
    with pytest.raises(ConfigError, match="does not share the student's tokenizer"):
        warmup_10B.main(["--config", str(config)])


def test_distill_keys_are_checked(tmp_path, tiny_llama_folder):
    config = tiny_config(tmp_path, tiny_llama_folder, distill_alpha=1.5)
    with pytest.raises(ConfigError, match=r"distill_alpha must be in \[0, 1\]"):
        warmup_10B.main(["--config", str(config)])


def test_teacher_cache_trains_like_the_live_top_k_teacher_with_no_teacher(tmp_path, tiny_llama_folder, monkeypatch):
    """`bitft teacher-cache` over the recipe's blocks, then a run against it: the losses of the run whose
    teacher computed the same top-k live (float16 storage: 1e-3), no teacher built; mismatches refused."""
    from bitft.cli import main as cli

    over = dict(max_steps=4, save_steps=100, distill_alpha=0.5, distill_temperature=2.0, distill_top_k=8)
    live_config = tiny_config(tmp_path, tiny_llama_folder, **over)
    warmup_10B.main(["--config", str(live_config)])
    live = train_logs(tmp_path / "run")
    cache = tmp_path / "cache"
    assert cli(["teacher-cache", "--config", str(live_config), "--output", str(cache), "--top-k", "16"]) == 0
    manifest = json.loads((cache / "cache.json").read_text())
    assert manifest["top_k"] == 16 and manifest["temperature"] == 2.0 and manifest["block_size"] == 32
    assert 4 + 16 * 4 <= manifest["bytes_per_token"] < (4 + 16 * 4) * 1.1  # int32 token, float16 + uint16 per k

    def no_teacher(*args, **kwargs):
        raise AssertionError("a teacher was built for a run with teacher_cache")

    monkeypatch.setattr(warmup_10B, "build_teacher", no_teacher)
    (tmp_path / "cached").mkdir()
    cached_config = tiny_config(tmp_path / "cached", tiny_llama_folder, teacher_cache=str(cache), **over)
    results = warmup_10B.main(["--config", str(cached_config)])
    got = train_logs(tmp_path / "cached" / "run")
    assert results["distill"]["teacher_cache"] == str(cache)
    for s in range(1, 5):
        assert got[s]["kd_loss"] == pytest.approx(live[s]["kd_loss"], rel=2e-3), s
        assert got[s]["loss"] == pytest.approx(live[s]["loss"], rel=1e-3), s

    with pytest.raises(ConfigError, match=r"was written for block_size 32 \(the recipe: 16\)"):
        warmup_10B.main(["--config", str(cached_config), "--block_size", "16", "--output_dir", str(tmp_path / "x")])
    with pytest.raises(ConfigError, match=r"distill_top_k=32 but teacher_cache .* holds the top 16"):
        warmup_10B.main(["--config", str(cached_config), "--distill_top_k", "32", "--output_dir", str(tmp_path / "y")])


def test_sft_refuses_a_teacher_cache(tmp_path, tiny_bitft):  # noqa: F811 (fixture)
    config = sft_config(tmp_path, tiny_bitft, distill_alpha=0.5, teacher_cache=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="teacher_cache: .* caches the warmup recipe's blocks"):
        sft.main(["--config", str(config)])
