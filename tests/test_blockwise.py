"""Block-wise reconstruction (bitft.train.blockwise) on tiny models: the block calls are the model's own,
each block's held-out error falls, a signal or kill -9 then a relaunch gives the same losses, disk streams
equal memory ones, what it cannot serve is refused in one line, and the end-to-end teacher stays the original."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import bitft
from bitft.config import BlockwiseArguments
from bitft.errors import ConfigError, Preempted
from bitft.train.blockwise import Streams, check_blockwise, reconstruct
from helpers import DATA, REPO, tiny_model
from test_evaluate import tiny_folder_with_tokenizer

CFG = dict(block_steps=10, block_calibration_blocks=8, block_heldout_blocks=4, block_batch_size=4, block_eval_steps=3,
           block_patience=100, block_save_steps=4, block_learning_rate=3e-3)


def ids(n=12, t=24, seed=5):
    torch.manual_seed(seed)
    return torch.randint(0, 128, (n, t))


def args(tmp_path, **over):
    return SimpleNamespace(output_dir=str(tmp_path), seed=0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
                           max_grad_norm=1.0, **over)


def model_at_1(seed=0):
    return bitft.convert_model(tiny_model("llama", seed=seed), lam=1.0)


def test_streams_call_each_block_as_the_model_does(tmp_path):
    model = bitft.convert_model(tiny_model("llama"), lam=0.0)
    x = ids()
    seen = {}
    hook = model.model.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("last", a[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    s = Streams(model, x, 4, tmp_path, disk=False)
    for k in range(len(s.layers)):
        s.advance(k, s.x)
    assert torch.equal(s.x, seen["last"])  # the blocks' output before the final norm, bit for bit
    assert torch.equal(s.xq, Streams(model, x, 4, tmp_path, disk=True).xq)  # memory-mapped files hold the same


def test_each_block_learns_against_the_original_and_only_blocks_change(tmp_path):
    model = model_at_1()
    before = copy.deepcopy(model.state_dict())
    summary = reconstruct(model, ids(), BlockwiseArguments(**CFG), args(tmp_path))
    assert [b["block"] for b in summary["blocks"]] == [0, 1]
    for b in summary["blocks"]:
        assert b["held_out_after"] < b["held_out_before"]  # held-out calibration error, not the training batches
        assert sum(b["losses"][-3:]) < sum(b["losses"][:3])
        assert b["held_out_after"] == min(b["held_out"]) and len(b["losses"]) == b["steps"] == 10
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("model.layers.") for k in changed)  # embeddings, final norm, head untouched
    assert bitft.get_lambda(model) == 1.0
    assert sorted(p.name for p in (tmp_path / "blockwise").iterdir()) == ["block_0.pt", "block_1.pt", "summary.json"]


def test_early_stop_keeps_the_best_weights(tmp_path):
    cfg = BlockwiseArguments(**{**CFG, "block_patience": 1, "block_eval_steps": 1, "block_learning_rate": 0.5})
    summary = reconstruct(model_at_1(), ids(), cfg, args(tmp_path))
    b = summary["blocks"][0]
    assert b["steps"] < 10 and b["held_out_after"] == min(b["held_out"])  # a learning rate that diverges stops early


def stopped_by_a_signal(tmp_path, monkeypatch, cfg: dict) -> tuple[dict, dict]:
    """(the uninterrupted summary in TMP/ref, state.pt of TMP/run): SIGUSR1 at block 1, step 5 (after the save at
    step 4); the phase must stop after that step with one Preempted line."""
    from bitft.train.preempt import PreemptionCallback

    reference = reconstruct(model_at_1(), ids(), BlockwiseArguments(**cfg), args(tmp_path / "ref"))
    real, count = torch.optim.AdamW.step, [0]

    def step(self, *a, **k):
        out = real(self, *a, **k)
        count[0] += 1
        if count[0] == 15:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    preempt = PreemptionCallback(["SIGUSR1"])
    try:
        with pytest.raises(Preempted, match="block 1 step 5"):
            reconstruct(model_at_1(), ids(), BlockwiseArguments(**cfg), args(tmp_path / "run"), preempt)
    finally:
        preempt.restore()
    monkeypatch.setattr(torch.optim.AdamW, "step", real)
    return reference, torch.load(tmp_path / "run" / "blockwise" / "state.pt", weights_only=False)


def test_a_signal_stops_after_the_step_and_the_relaunch_gives_the_same_losses(tmp_path, monkeypatch):
    reference, state = stopped_by_a_signal(tmp_path, monkeypatch, CFG)
    assert (state["block"], state["step"]) == (1, 5)
    resumed = reconstruct(model_at_1(), ids(), BlockwiseArguments(**CFG), args(tmp_path / "run"))
    assert [b["losses"] for b in resumed["blocks"]] == [b["losses"] for b in reference["blocks"]]
    assert [b["held_out"] for b in resumed["blocks"]] == [b["held_out"] for b in reference["blocks"]]


def test_refusals_are_one_line():
    for kwargs, words in [((0.0, False, 1, "absmean"), "lambda_warmup_steps: 0"), ((1.0, True, 1, "absmean"), "LoRA"),
                          ((1.0, False, 2, "absmean"), "--num_processes 1"), ((1.0, False, 1, "gptq"), "ternary_init")]:
        with pytest.raises(ConfigError, match=words) as e:
            check_blockwise(*kwargs)
        assert len(str(e.value).splitlines()) == 1
    with pytest.raises(ConfigError, match="multiple of block_batch_size"):
        BlockwiseArguments(block_steps=1, block_calibration_blocks=6, block_batch_size=4)


# ----------------------------------------------------------------------------- through the warmup recipe
def recipe_config(tmp_path, folder, **over) -> Path:
    cfg = dict(model_name_or_path=str(folder), dataset=[str(DATA / "pretrain" / "c4_sample.jsonl")], block_size=24,
               eval_blocks=4, lambda_warmup_steps=0, output_dir=str(tmp_path / "run"), max_steps=2,
               per_device_train_batch_size=2, learning_rate=1e-3, save_steps=100, logging_steps=1, seed=0, use_cpu=True,
               report_to="none", disable_tqdm=True, distill_alpha=1.0, **CFG)
    cfg.update(over)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_recipe_refuses_a_lambda_ramp_before_loading(tmp_path, monkeypatch):
    from recipes import warmup_10B

    monkeypatch.setattr(warmup_10B, "load_model", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ConfigError, match="starts at λ=0"):
        warmup_10B.main(["--config", str(recipe_config(tmp_path, tmp_path, lambda_warmup_steps=5))])


def test_recipe_block_phase_then_distillation_from_the_original(tmp_path, monkeypatch):
    from recipes import warmup_10B

    folder = tiny_folder_with_tokenizer(tmp_path / "m")
    seen = {}
    real_setup = warmup_10B.BitftTrainer.setup_distillation

    def setup(self, teacher, distill_args):
        seen["teacher"] = {k: v.clone() for k, v in teacher.state_dict().items()}
        seen["student"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return real_setup(self, teacher, distill_args)

    monkeypatch.setattr(warmup_10B.BitftTrainer, "setup_distillation", setup)
    results = warmup_10B.main(["--config", str(recipe_config(tmp_path, folder))])
    original = tiny_model("llama").state_dict()
    assert all(torch.equal(seen["teacher"][k], v) for k, v in original.items())  # the teacher is the original
    assert not torch.equal(seen["student"]["model.layers.1.mlp.down_proj.weight"], original["model.layers.1.mlp.down_proj.weight"])
    b = results["blockwise"]
    assert [x["block"] for x in b["blocks"]] == [0, 1] and all(x["held_out_after"] < x["held_out_before"] for x in b["blocks"])
    assert results["total_minutes"] >= results["train_minutes"] and results["steps"] == 2


KILLER = """
import os, runpy, signal, sys, torch
real, count = torch.optim.AdamW.step, [0]
def step(self, *a, **k):
    out = real(self, *a, **k)
    count[0] += 1
    if count[0] == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return out
torch.optim.AdamW.step = step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_recipe_kill_9_in_the_block_phase_then_relaunch_gives_the_same_losses(tmp_path):
    folder = tiny_folder_with_tokenizer(tmp_path / "m")
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", HF_HUB_OFFLINE="1", KILL_AT="0")

    def launch(config, kill_at=0):
        cmd = [sys.executable, "-c", KILLER, str(REPO / "recipes" / "warmup_10B.py"), "--config", str(config)]
        return subprocess.run(cmd, cwd=REPO, env={**env, "KILL_AT": str(kill_at)}, capture_output=True, text=True, timeout=300)

    # with the learned equalization on (the plain phase is this code without the scales; the in-process signal
    # tests here and in test_equalize.py resume both): state.pt then holds the parametrized block and its scales
    over = {"block_equalize": True, "block_equalize_learning_rate": 3e-2}
    ref = recipe_config(tmp_path / "ref", folder, **over)
    assert launch(ref).returncode == 0
    run = recipe_config(tmp_path / "kill", folder, **over)
    r = launch(run, kill_at=15)  # block 1, step 5 (its state written at step 4)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert torch.load(tmp_path / "kill" / "run" / "blockwise" / "state.pt", weights_only=False)["step"] == 4
    r = launch(run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming at block 1 step 4" in r.stdout + r.stderr
    got, want = (json.loads((p / "run" / "blockwise" / "summary.json").read_text()) for p in (tmp_path / "kill", tmp_path / "ref"))
    assert [b["losses"] for b in got["blocks"]] == [b["losses"] for b in want["blocks"]]
    logs = [json.loads((p / "run" / "warmup_results.json").read_text()) for p in (tmp_path / "kill", tmp_path / "ref")]
    assert logs[0]["after"]["eval_loss"] == logs[1]["after"]["eval_loss"]  # the end-to-end phase after it too


def test_recipe_block_phase_alone_then_a_launch_that_loads_it(tmp_path, caplog):
    """max_steps 0: the block phase alone (the two-launch way for several processes); the next launch loads its
    blocks without recomputing any activation, and a multi-process launch is no longer refused."""
    from recipes import warmup_10B

    folder = tiny_folder_with_tokenizer(tmp_path / "m")
    config = recipe_config(tmp_path, folder, max_steps=0)
    alone = warmup_10B.main(["--config", str(config)])
    assert alone["steps"] == 0 and len(alone["blockwise"]["blocks"]) == 2 and "after" in alone
    saved = torch.load(tmp_path / "run" / "blockwise" / "block_1.pt", weights_only=True)
    check_blockwise(1.0, False, 8, "absmean", complete=True)  # 8 processes may now load it
    with pytest.raises(ConfigError, match="--max_steps 0 first"):
        check_blockwise(1.0, False, 8, "absmean", complete=False)
    caplog.set_level("INFO", logger="bitft")
    seen = {}
    real = warmup_10B.BitftTrainer.setup_distillation

    def setup(self, teacher, distill_args):
        seen["student"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return real(self, teacher, distill_args)

    warmup_10B.BitftTrainer.setup_distillation = setup
    try:
        after = warmup_10B.main(["--config", str(config), "--max_steps", "2"])
    finally:
        warmup_10B.BitftTrainer.setup_distillation = real
    assert "finished before, its 2 blocks loaded" in caplog.text
    assert all(torch.equal(seen["student"][f"model.layers.1.{k}"], v) for k, v in saved.items())
    assert after["steps"] == 2 and after["blockwise"]["blocks"] == alone["blockwise"]["blocks"]
