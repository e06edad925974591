"""The warmup recipe's ternary_init on a tiny Llama: applied at a fresh start from λ=1 (the held-out λ=1
loss before the first step is the rewritten model's), recorded in the run, refused with a λ ramp."""

from __future__ import annotations

import pytest

from bitft.errors import ConfigError
from recipes import warmup_10B
from test_warmup import tiny_config


def test_ternary_init_changes_the_start_and_is_recorded(tmp_path, tiny_llama_folder):
    runs = {}
    for rule in ("absmean", "mse", "gptq"):
        (tmp_path / rule).mkdir()
        config = tiny_config(tmp_path / rule, tiny_llama_folder, max_steps=1, save_steps=100, lambda_warmup_steps=0)
        runs[rule] = warmup_10B.main(["--config", str(config), "--ternary_init", rule])
    from bitft.train.resume import read_marker

    for rule in ("mse", "gptq"):
        assert runs[rule]["before"]["eval_loss"] != runs["absmean"]["before"]["eval_loss"]
        assert read_marker(tmp_path / rule / "run" / "checkpoint-1")["run"]["ternary_init"] == rule


def test_ternary_init_with_a_lambda_ramp_is_refused(tmp_path, tiny_llama_folder):
    config = tiny_config(tmp_path, tiny_llama_folder, max_steps=1)  # λ linear over 6 steps: starts at 0
    with pytest.raises(ConfigError, match="ternary_init 1.5: .*starts at λ=0 .*lambda_warmup_steps: 0"):
        warmup_10B.main(["--config", str(config), "--ternary_init", "1.5"])
    assert not any((tmp_path / "run").glob("checkpoint-*"))


def test_gptq_without_calibration_blocks_is_one_line(tmp_path, tiny_llama_folder):
    config = tiny_config(tmp_path, tiny_llama_folder, max_steps=1, lambda_warmup_steps=0)
    with pytest.raises(ConfigError, match="gptq needs calibration blocks"):
        warmup_10B.main(["--config", str(config), "--ternary_init", "gptq", "--ternary_init_blocks", "0"])
