"""scripts/warmup_ablation.py end to end on a tiny Llama: three variants at equal tokens, the
schedules they trained with, the plot and the table, and a second call that trains nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import DATA

import pytest

pytestmark = pytest.mark.slow  # trains three variants through accelerate launch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "warmup_ablation.py"


def ppl_text(tmp_path) -> str:
    """The first lines of WikiText-2 test: one 64-token window for the tiny tokenizer, without tokenizing the
    whole 1.3 MB file (~700k of its tokens) in every evaluation."""
    path = tmp_path / "wiki.raw"
    path.write_text("\n".join((DATA / "eval" / "wikitext2_test.raw").read_text().splitlines()[:60]))
    return str(path)


def test_ablation_script_on_a_tiny_model(tiny_llama_folder, tmp_path):
    out = tmp_path / "ablation"
    cmd = [sys.executable, str(SCRIPT), "--model", str(tiny_llama_folder), "--out", str(out), "--steps", "6",
           "--eval-steps", "2", "--tasks", "piqa", "--limit", "4", "--ppl-windows", "1", "--ppl-seqlen", "64",
           "--ppl-data", ppl_text(tmp_path), "--threads", "1",
           # recipe flags, passed through to every run
           "--block_size", "32", "--eval_blocks", "4", "--per_device_train_batch_size", "2",
           "--per_device_eval_batch_size", "4", "--learning_rate", "1e-3"]
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", HF_HUB_OFFLINE="1")
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    result = json.loads((out / "warmup_ablation.json").read_text())
    curves = result["curves"]
    assert list(curves) == ["abrupt", "linear", "sigmoid"]
    assert {c["tokens"] for c in curves.values()} == {6 * 32 * 2}  # equal tokens
    lams = {v: [lam for _, _, lam in c["train"]] for v, c in curves.items()}
    assert all(lam == 1.0 for lam in lams["abrupt"])
    assert lams["linear"][0] < 1 and lams["linear"][-1] == 1.0   # W = 3 of 6 steps
    assert lams["sigmoid"][1] < lams["linear"][1] and lams["sigmoid"][-1] == 1.0  # the sigmoid starts slower
    for c in curves.values():  # held-out λ=1 perplexity at steps 0, 2, 4, 6
        assert [t for t, _ in c["eval"]] == [0, 128, 256, 384]
    # the same start: every variant is evaluated at λ=1 before its first step
    assert len({c["eval"][0][1] for c in curves.values()}) == 1
    assert set(result["evals"]) == {"original", "abrupt", "linear", "sigmoid"}
    assert all(e["tasks"]["piqa"]["n"] == 4 for e in result["evals"].values())

    png = out / "warmup_ablation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "warmup_ablation.md").read_text()
    for row in ("| original (full precision, untrained) |", "| abrupt | 384 |", "| linear | 384 |", "| sigmoid | 384 |"):
        assert row in table

    # a second call keeps the finished runs and only redraws
    logs = {v: (out / v / "train.log").stat().st_mtime for v in curves}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("finished earlier, kept") == 3
    assert {v: (out / v / "train.log").stat().st_mtime for v in curves} == logs


def test_distill_ablation_script_on_a_tiny_model(tiny_llama_folder, tmp_path):
    """scripts/distill_ablation.py reuses the machinery: equal tokens, the CE curve of every variant,
    the distillation terms only where asked for, one table."""
    out = tmp_path / "distill"
    cmd = [sys.executable, str(REPO / "scripts" / "distill_ablation.py"), "--model", str(tiny_llama_folder),
           "--out", str(out), "--variants", "ce", "kd_attn", "--steps", "4", "--eval-steps", "2", "--tasks", "piqa",
           "--limit", "4", "--ppl-windows", "1", "--ppl-seqlen", "64", "--ppl-data", ppl_text(tmp_path), "--threads", "1",
           "--block_size", "32", "--eval_blocks", "4", "--per_device_train_batch_size", "2",
           "--per_device_eval_batch_size", "4", "--learning_rate", "1e-3", "--lambda_warmup_steps", "2"]
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", HF_HUB_OFFLINE="1")
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads((out / "distill_ablation.json").read_text())
    assert list(result["curves"]) == ["ce", "kd_attn"]
    assert {c["tokens"] for c in result["curves"].values()} == {4 * 32 * 2}
    assert result["curves"]["ce"]["eval"][0] == result["curves"]["kd_attn"]["eval"][0]  # the same start
    logs = {v: json.loads((out / v / "trainer_state.json").read_text())["log_history"] for v in ("ce", "kd_attn")}
    assert not any("kd_loss" in h for h in logs["ce"]) and any("attention_loss" in h for h in logs["kd_attn"])
    table = (out / "distill_ablation.md").read_text()
    assert "| ce | 256 |" in table and "| kd_attn | 256 |" in table and "tokens/s" in table
    assert (out / "distill_ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
