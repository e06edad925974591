"""The card of a recipe's final model (bitft.card, written by finish_run), and its saved config.

A 2-step warmup from a local model whose README says `license: mit`: the run folder's README.md
states the recipe, its saved config (which parses again as a config for the same recipe), the tokens
trained and the held-out figures that the run's results file holds, and carries the licence; the
packed export of that folder copies those lines and adds its own.
"""

from __future__ import annotations

import shutil

import yaml
from huggingface_hub import ModelCard

from bitft.cli import main
from bitft.config import DistillArguments, LambdaArguments, ModelArguments, PretrainDataArguments, parse_config
from recipes import warmup_10B
from test_warmup import tiny_config


def test_warmup_final_model_card(tmp_path, tiny_llama_folder):
    source = tmp_path / "source"
    shutil.copytree(tiny_llama_folder, source)
    (source / "README.md").write_text("---\nlicense: mit\n---\n# a tiny Llama\n")
    config = tiny_config(tmp_path, source, max_steps=2, lambda_warmup_steps=2, save_steps=100, eval_blocks=2)
    results = warmup_10B.main(["--config", str(config), "--learning_rate", "0.002"])
    run = tmp_path / "run"

    card = ModelCard.load(run / "README.md")
    assert card.data.license == "mit" and "bitft" in card.data.tags and card.data.base_model is None  # a local source
    text = card.text
    assert f"trained by `recipes/warmup_10B.py` from `{source}`" in text
    assert f"config `run/warmup_config.yaml` (from `{config}`, flags `--learning_rate`)" in text
    assert results["tokens"] == 2 * 32 * 2 * 2 and f"; {results['tokens']:,} tokens trained;" in text
    before, after = results["before"], results["after"]
    assert f"held-out (λ=1), before → after: loss {before['eval_loss']:.4g} → {after['eval_loss']:.4g}, " \
           f"perplexity {before['eval_perplexity']:.4g} → {after['eval_perplexity']:.4g}" in text
    assert "**λ**: 1 (ternary)" in text and "import bitft" in text

    saved = yaml.safe_load((run / "warmup_config.yaml").read_text())
    assert saved["learning_rate"] == 0.002 and saved["max_steps"] == 2 and saved["model_name_or_path"] == str(source)
    parsed = parse_config((ModelArguments, PretrainDataArguments, LambdaArguments, DistillArguments,
                           warmup_10B.TrainingArguments), ["--config", str(run / "warmup_config.yaml")])
    assert parsed[-1].learning_rate == 0.002 and parsed[2].lambda_warmup_steps == 2

    assert main(["export", str(run), "--packed", "-o", str(tmp_path / "packed")]) == 0
    packed = ModelCard.load(tmp_path / "packed" / "README.md")
    assert packed.data.license == "mit"
    run_line = next(line for line in text.splitlines() if line.startswith("- trained by"))
    assert run_line in packed.text and f"- exported by `bitft export --packed` from `{run}`" in packed.text
