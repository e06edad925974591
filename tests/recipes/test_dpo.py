"""recipes/dpo.py on a tiny converted Llama (λ=1) and bitft.data.chat's preference data.

- the real entry point through `accelerate launch`: λ stays 1 in every log; the reference is a frozen
  copy with every BitLinear layer at λ=1, so the first loss is log 2 exactly (TRL's own default
  reference, a plain model rebuilt from the path, starts far from it);
- LoRA: the reference is the policy itself with adapters disabled (no copy), its base frozen;
- resume: the last checkpoint deleted, the same command gives the same loss tail;
- preference rows: conversational, plain, implicit prompt (UltraFeedback), ShareGPT (LLaMA-Factory).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from recipes import dpo
from test_sft import REPO, SHARED, launched_reference, tiny_bitft, train_logs  # noqa: F401 (fixture)

DPO_DATA = SHARED / "data" / "dpo"
MAX_STEPS = 6


def dpo_config(tmp_path, tiny_bitft, **over) -> Path:
    cfg = dict(
        model_name_or_path=str(tiny_bitft / "model"), chat_template_path=str(tiny_bitft / "plain.jinja"),
        dataset=[str(DPO_DATA / "oasst_en_100_pairs.trl_conversational.jsonl")], eval_size=8,
        output_dir=str(tmp_path / "run"), max_steps=MAX_STEPS, per_device_train_batch_size=2,
        per_device_eval_batch_size=4, max_length=64, learning_rate=1e-3, lr_scheduler_type="linear", beta=0.1,
        save_steps=3, logging_steps=1, use_cpu=True, gradient_checkpointing=False, report_to="none",
        disable_tqdm=True, seed=0,
    )
    cfg.update(over)
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def reference(tmp_path_factory, tiny_bitft):
    """The real entry point, launched once per test run: (config, run dir, completed process)."""
    return launched_reference(tmp_path_factory, "dpo", lambda tmp: dpo_config(tmp, tiny_bitft))


@pytest.mark.slow
def test_reference_is_a_frozen_bitlinear_copy_and_lambda_stays_1(reference):
    import bitft
    from transformers import AutoModelForCausalLM

    _, run, r = reference
    results = json.loads((run / "dpo_results.json").read_text())
    assert results["reference"] == "frozen copy" and not results["reference_is_policy_object"]
    assert results["reference_bitlinear_layers"] == 14 and results["reference_lambda"] == 1.0
    assert results["reference_trainable_params"] == 0 and results["policy_trainable_params"] > 0
    logs = train_logs(run)
    assert sorted(logs) == list(range(1, MAX_STEPS + 1)) and all(h["lambda"] == 1.0 for h in logs.values())
    # policy == reference at the start: loss log 2, margin 0 (a plain-Llama reference gives ~10 here)
    assert logs[1]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert results["before"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert results["before"]["eval_rewards/margins"] == 0.0
    assert "eval_rewards/accuracies" in results["after"] and "held-out pairs" in r.stdout
    model = AutoModelForCausalLM.from_pretrained(run)
    assert bitft.get_lambda(model) == 1.0


@pytest.mark.slow
def test_resume_reproduces_the_loss_tail(reference, tmp_path):
    config, ref_run, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    for f in ("model.safetensors", "trainer_state.json", "dpo_results.json"):
        (run / f).unlink()
    shutil.rmtree(run / "checkpoint-6")
    dpo.main(["--config", str(config), "--output_dir", str(run)])
    got, want = train_logs(run), train_logs(ref_run)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    for step in (4, 5, 6):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step
        assert got[step]["rewards/margins"] == pytest.approx(want[step]["rewards/margins"], rel=1e-4, abs=1e-6), step


@pytest.mark.slow
def test_lora_reference_is_the_policy_with_adapters_disabled(tmp_path, tiny_bitft):
    config = dpo_config(tmp_path, tiny_bitft, use_peft=True, lora_r=4, lora_alpha=8, max_steps=3, save_steps=3)
    results = dpo.main(["--config", str(config)])
    assert results["reference"] == "adapters disabled" and results["reference_is_policy_object"]
    assert results["reference_bitlinear_layers"] == 14 and results["reference_trainable_params"] == 0
    assert results["before"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert results["lambda_final"] == 1.0
    assert (tmp_path / "run" / "adapter_config.json").is_file()


@pytest.mark.parametrize("path", ["configs/dpo.yaml", "configs/demo/dpo.yaml"])
def test_shipped_configs_parse(path):
    from bitft.config import BitDPOConfig, ModelArguments, PreferenceDataArguments, parse_config

    flags = ["--bf16", "false", "--use_cpu", "true", "--optim", "adamw_torch"] if "demo" not in path else []
    m, d, args = parse_config((ModelArguments, PreferenceDataArguments, BitDPOConfig),
                              ["--config", str(REPO / path), *flags, "--beta", "0.2"])
    assert args.beta == 0.2 and args.loss_type == ["sigmoid"]
    if "demo" in path:
        assert m.model_name_or_path == "runs/demo-sft" and args.output_dir == "runs/demo-dpo"
    else:
        assert d.dataset == ["trl-lib/ultrafeedback_binarized"] and args.learning_rate == 2e-7


def test_preference_rows():
    from bitft.config import PreferenceDataArguments
    from bitft.data.chat import build_datasets, preference_row
    from bitft.errors import DataError

    u = lambda t: {"role": "user", "content": t}  # noqa: E731
    a = lambda t: {"role": "assistant", "content": t}  # noqa: E731
    # implicit prompt, UltraFeedback style: chosen/rejected repeat the prompt turns
    row = {"prompt": "q", "chosen": [u("q"), a("good")], "rejected": [u("q"), a("bad")]}
    assert preference_row(row) == {"prompt": [u("q")], "chosen": [a("good")], "rejected": [a("bad")]}
    assert preference_row({"prompt": "q", "chosen": "good", "rejected": "bad"}) == {"prompt": "q", "chosen": "good", "rejected": "bad"}
    sharegpt = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "good"},
                "rejected": {"from": "gpt", "value": "bad"}}
    assert preference_row(sharegpt) == {"prompt": [u("q")], "chosen": [a("good")], "rejected": [a("bad")]}
    with pytest.raises(DataError, match="chosen"):
        preference_row({"prompt": "q", "answer": "x"})
    for name, n in [("oasst_en_100_pairs.trl_conversational.jsonl", 207), ("dpo_en_demo.json", 300)]:
        train, held = build_datasets(PreferenceDataArguments(dataset=[str(DPO_DATA / name)], eval_size=10), "preference", 0)
        assert len(train) == n - 10 and len(held) == 10
        assert isinstance(train[0]["prompt"], list) and train[0]["chosen"][0]["role"] == "assistant"


def test_hub_datasets_are_mapped_not_listed(monkeypatch):
    """A hub split (here a stand-in Dataset with UltraFeedback's columns) is normalized with Dataset.map."""
    import datasets

    import bitft.data.chat as chat
    from bitft.config import ChatDataArguments, PreferenceDataArguments

    u, a = {"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}
    bad = {"role": "assistant", "content": "bad"}
    hub = datasets.Dataset.from_list([{"prompt": "q", "prompt_id": str(i), "chosen": [u, a], "rejected": [u, bad],
                                       "messages": [u, a], "score_chosen": 8.0} for i in range(6)])
    monkeypatch.setattr(chat, "read_rows", lambda *args, **kw: hub)
    train, held = chat.build_datasets(PreferenceDataArguments(dataset=["HuggingFaceH4/ultrafeedback_binarized"],
                                                                   eval_size=2), "preference", seed=0)
    assert sorted(train.column_names) == ["chosen", "prompt", "rejected"] and (len(train), len(held)) == (4, 2)
    assert train[0] == {"prompt": [u], "chosen": [a], "rejected": [bad]}
    train, held = chat.build_datasets(ChatDataArguments(dataset=["HuggingFaceH4/ultrachat_200k"], eval_size=0), "chat", 0)
    assert train.column_names == ["messages"] and len(train) == 6 and held is None
