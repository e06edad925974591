"""recipes/warmup_10B.py end to end on a tiny random Llama, through `accelerate launch`.

- a reference run logs the committed per-step losses (expected/warmup_tiny.json), λ and tokens;
- kill -9 in the middle, relaunch the same command: the same losses as the uninterrupted run;
- a checkpoint whose files are incomplete is never picked;
- a NaN loss stops the run with its state saved and the step named;
- 2 processes (DDP over gloo) and DeepSpeed ZeRO-2 (2 CPU processes) give the reference losses.

Regenerate the committed losses with BITFT_REGENERATE=1 (and say why in the commit).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bitft.config import parse_config
from bitft.errors import ConfigError
from bitft.train.resume import COMPLETE_MARKER, is_complete, newest_checkpoint
from helpers import as_json, completed, shared_once

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "warmup_10B.py"
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
EXPECTED = Path(__file__).parent / "expected" / "warmup_tiny.json"
SHARED = REPO.parent / "shared" if (REPO.parent / "shared").is_dir() else Path(os.environ.get("BITFT_SHARED", "/work/shared"))
PRETRAIN = SHARED / "data" / "pretrain"

MAX_STEPS, SAVE_STEPS, TOKENS_PER_STEP = 12, 3, 32 * 2 * 2


def tiny_config(tmp_path, model_dir, **over) -> Path:
    cfg = dict(
        model_name_or_path=str(model_dir), dataset=[str(PRETRAIN / "c4_sample.jsonl")], block_size=32, eval_blocks=4,
        lambda_schedule="linear", lambda_warmup_steps=6, output_dir=str(tmp_path / "run"), max_steps=MAX_STEPS,
        per_device_train_batch_size=2, gradient_accumulation_steps=2, per_device_eval_batch_size=4,
        learning_rate=1e-3, lr_scheduler_type="linear", save_steps=SAVE_STEPS, logging_steps=1, seed=0,
        use_cpu=True, report_to="none", disable_tqdm=True,
    )
    cfg.update(over)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", HF_HUB_OFFLINE="1",
             TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), PYTHONUNBUFFERED="1")
    e.pop("ACCELERATE_USE_CPU", None)
    e.update(extra)
    return e


LAUNCHERS = {
    "cpu": ([ACCELERATE, "launch", "--cpu", "--num_processes", "1", "--num_cpu_threads_per_process", "1"], {}),
    "ddp2": ([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_cpu_threads_per_process", "1"],
             {"ACCELERATE_USE_CPU": "true"}),
    "zero2": ([ACCELERATE, "launch", "--config_file", str(REPO / "configs/accelerate/zero2.yaml"), "--num_processes", "2"],
              {}),
    "zero3": ([ACCELERATE, "launch", "--config_file", str(REPO / "configs/accelerate/zero3.yaml"), "--num_processes", "2"],
              {}),
}


def command(config, *flags, launcher="cpu"):
    prefix, extra = LAUNCHERS[launcher]
    return prefix + [str(RECIPE), "--config", str(config), *flags], env(**extra)


def launch(config, *flags, launcher="cpu", expect=0, timeout=300):
    cmd, e = command(config, *flags, launcher=launcher)
    r = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)
    if expect is not None and r.returncode != expect:
        raise AssertionError(f"exit {r.returncode} (expected {expect})\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def history(run_dir) -> list[dict]:
    return json.loads((Path(run_dir) / "trainer_state.json").read_text())["log_history"]


def train_logs(run_dir) -> dict[int, dict]:
    return {h["step"]: h for h in history(run_dir) if "loss" in h}


def assert_same_losses(run_dir, reference, rel=1e-5):
    got, ref = train_logs(run_dir), train_logs(reference)
    assert sorted(got) == sorted(ref) == list(range(1, MAX_STEPS + 1))
    for step in ref:
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=rel), f"step {step}"
        assert got[step]["lambda"] == ref[step]["lambda"]
        assert got[step]["tokens_seen"] == ref[step]["tokens_seen"]


@pytest.fixture(scope="session")
def reference(tmp_path_factory, tiny_llama_folder):
    """One uninterrupted run per test run (test_cluster's tests read it too): (config, output_dir, completed
    process). Tests copy it before they change anything."""
    folder, r = shared_once(tmp_path_factory, "warmup-reference", lambda d: as_json(launch(tiny_config(d, tiny_llama_folder))))
    return folder / "tiny.yaml", folder / "run", completed(r)


@pytest.mark.slow
def test_reference_run_logs_expected_losses_lambda_and_tokens(reference):
    config, run, r = reference
    logs = train_logs(run)
    losses = {str(s): round(h["loss"], 6) for s, h in sorted(logs.items())}
    if os.environ.get("BITFT_REGENERATE"):
        EXPECTED.parent.mkdir(exist_ok=True)
        EXPECTED.write_text(json.dumps({"config": "tiny_config() in this file", "losses": losses}, indent=1) + "\n")
    expected = json.loads(EXPECTED.read_text())["losses"]
    assert losses.keys() == expected.keys()
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, abs=2e-4), f"step {step}"
    # λ: linear over 6 optimizer steps, set before each step (step s trains with λ = (s-1)/6)
    assert [logs[s]["lambda"] for s in range(1, 9)] == pytest.approx([0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1, 1])
    assert all(logs[s]["tokens_seen"] == s * TOKENS_PER_STEP for s in logs)
    assert all(logs[s]["tokens_per_second"] > 0 for s in logs)
    # held-out perplexity at λ=1 before (step 0) and after, and the printed summary
    results = json.loads((run / "warmup_results.json").read_text())
    assert results["before"]["step"] == 0 and results["before"]["eval_lambda"] == 1.0
    assert results["after"]["eval_perplexity"] < results["before"]["eval_perplexity"]
    assert results["steps"] == MAX_STEPS and results["tokens"] == MAX_STEPS * TOKENS_PER_STEP
    assert "held-out λ=1 perplexity: before" in r.stdout
    # every checkpoint is marked complete; the final folder reloads as a bitft model at λ=1
    ckpts = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in ckpts] == [f"checkpoint-{s}" for s in range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS)]
    assert all(is_complete(p) for p in ckpts)
    import bitft  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run)
    assert bitft.get_lambda(model) == 1.0 and model.config.bitft["lambda"] == 1.0


@pytest.mark.slow
def test_kill_9_and_relaunch_reproduces_the_losses(reference, tmp_path, tiny_llama_folder):
    config = tiny_config(tmp_path, tiny_llama_folder)
    run = tmp_path / "run"
    cmd, e = command(config)
    proc = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while not (run / "checkpoint-6").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the training process, mid-step or mid-save
    except ProcessLookupError:
        pass
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(f"the run ended (exit {proc.returncode}) before it could be killed")
    assert not (run / "warmup_results.json").exists()
    r = launch(config)  # the same command
    assert "resuming from" in r.stdout + r.stderr
    assert_same_losses(run, reference[1])


@pytest.mark.slow
def test_a_half_written_checkpoint_is_never_picked(reference, tmp_path):
    config, ref_run, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    for f in ("model.safetensors", "trainer_state.json", "warmup_results.json"):
        (run / f).unlink()
    shutil.rmtree(run / "checkpoint-12")
    (run / "checkpoint-9" / COMPLETE_MARKER).unlink()  # killed before the marker
    weights = run / "checkpoint-6" / "model.safetensors"  # marker written, then a file damaged
    weights.write_bytes(weights.read_bytes()[:100])
    assert newest_checkpoint(run).name == "checkpoint-3"
    r = launch(config, "--output_dir", str(run))
    out = r.stdout + r.stderr
    assert "resuming from" in out and "falling back to checkpoint-3" in out
    assert "checkpoint-6: model.safetensors is 100 bytes, its marker says" in out
    assert_same_losses(run, ref_run)


@pytest.mark.slow
def test_checkpoint_discovery(tmp_path):
    assert newest_checkpoint(tmp_path / "nothing") is None
    for step in (2, 10, 4):
        ck = tmp_path / f"checkpoint-{step}"
        ck.mkdir()
        (ck / "trainer_state.json").write_text("{}")
        from bitft.train.resume import mark_complete

        mark_complete(ck, step)
    (tmp_path / "checkpoint-12").mkdir()  # started, never finished
    assert newest_checkpoint(tmp_path).name == "checkpoint-10"
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text("{ }")  # size changed after marking
    assert newest_checkpoint(tmp_path).name == "checkpoint-4"


@pytest.mark.slow
def test_nan_loss_stops_with_state_saved(tmp_path, tiny_llama_folder):
    config = tiny_config(tmp_path, tiny_llama_folder, learning_rate=1e30, lr_scheduler_type="constant",
                         save_steps=1000, eval_blocks=0)
    r = launch(config, expect=None)
    assert r.returncode != 0  # the recipe exits 3; `accelerate launch` turns any failure into 1
    msg = next(line for line in r.stderr.splitlines() if line.startswith("warmup_10B: loss is"))
    assert "optimizer step" in msg and "relaunch" in msg, r.stderr[-2000:]
    step = int(msg.split("optimizer step ")[1].split(",")[0])
    saved = tmp_path / "run" / f"checkpoint-{step - 1}"
    assert f"after step {step - 1}" in msg and is_complete(saved)
    from safetensors.torch import load_file

    assert all(t.isfinite().all() for t in load_file(saved / "model.safetensors").values())


@pytest.mark.slow
def test_two_processes_ddp_gloo(reference, tmp_path, tiny_llama_folder):
    """2 processes × micro-batch 1 = the reference's micro-batch 2: the same losses."""
    config = tiny_config(tmp_path, tiny_llama_folder, per_device_train_batch_size=1)
    launch(config, launcher="ddp2")
    results = json.loads((tmp_path / "run" / "warmup_results.json").read_text())
    assert results["world_size"] == 2 and results["engine"] == "MULTI_CPU"
    assert results["tokens_per_step"] == TOKENS_PER_STEP
    assert_same_losses(tmp_path / "run", reference[1], rel=1e-4)


def zero_reference(tmp_path_factory, tiny_llama_folder, stage: str):
    """(config, output_dir, completed process) of the 2-process ZeRO-STAGE run (micro-batch 1 each: the
    reference's tokens per step), launched once per test run: the tests below check it, test_cluster resumes
    it on another world size."""
    pytest.importorskip("deepspeed")

    def build(d):
        config = tiny_config(d, tiny_llama_folder, per_device_train_batch_size=1, use_cpu=False, ddp_backend="gloo")
        return as_json(launch(config, launcher=stage, timeout=400))

    folder, r = shared_once(tmp_path_factory, f"{stage}-reference", build)
    return folder / "tiny.yaml", folder / "run", completed(r)


@pytest.mark.slow
def test_deepspeed_zero2_two_cpu_processes(reference, tmp_path_factory, tiny_llama_folder):
    """ZeRO-2 on CPU: accelerate's DeepSpeed state needs --ddp_backend gloo to count both processes."""
    _, run, _ = zero_reference(tmp_path_factory, tiny_llama_folder, "zero2")
    results = json.loads((run / "warmup_results.json").read_text())
    assert results["world_size"] == 2 and results["engine"] == "DEEPSPEED"
    assert (run / f"checkpoint-{MAX_STEPS}" / f"global_step{MAX_STEPS}").is_dir()  # a DeepSpeed checkpoint
    assert_same_losses(run, reference[1], rel=1e-4)


@pytest.mark.slow
def test_deepspeed_zero3_two_cpu_processes(reference, tmp_path_factory, tiny_llama_folder):
    """ZeRO-3 partitions the weights; BitLinear then caches no codes (a cache would hold every
    layer's gathered codes) and re-quantizes the re-gathered weight in the backward: same losses."""
    _, run, _ = zero_reference(tmp_path_factory, tiny_llama_folder, "zero3")
    results = json.loads((run / "warmup_results.json").read_text())
    assert results["world_size"] == 2 and results["engine"] == "DEEPSPEED"
    assert_same_losses(run, reference[1], rel=1e-4)


# ----------------------------------------------------------------------------- configuration

def _types():
    from transformers import TrainingArguments

    from bitft.config import BlockwiseArguments, DistillArguments, LambdaArguments, ModelArguments, PretrainDataArguments

    return (ModelArguments, PretrainDataArguments, LambdaArguments, DistillArguments, BlockwiseArguments, TrainingArguments)


def test_flags_override_yaml(tmp_path, tiny_llama_folder):
    config = tiny_config(tmp_path, tiny_llama_folder)
    m, d, lam, _, _, args = parse_config(_types(), ["--config", str(config), "--max_steps", "7", "--lambda_schedule",
                                              "sigmoid", "--output_dir", "elsewhere", "--block_size=16"])
    assert (args.max_steps, lam.lambda_schedule, args.output_dir, d.block_size) == (7, "sigmoid", "elsewhere", 16)
    assert args.save_steps == SAVE_STEPS and m.model_name_or_path == str(tiny_llama_folder)


def test_unknown_keys_are_errors(tmp_path, tiny_llama_folder):
    config = tiny_config(tmp_path, tiny_llama_folder, lamda_warmup_steps=5)
    with pytest.raises(ConfigError, match="unknown key.*lamda_warmup_steps.*did you mean lambda_warmup_steps"):
        parse_config(_types(), ["--config", str(config)])
    good = tiny_config(tmp_path, tiny_llama_folder)
    with pytest.raises(ConfigError, match="unknown flag --max_step .*did you mean --max_steps"):
        parse_config(_types(), ["--config", str(good), "--max_step", "3"])


@pytest.mark.parametrize("path", ["configs/warmup_10B.yaml", "configs/warmup_10B_distill.yaml", "configs/demo/warmup.yaml"])
def test_shipped_configs_parse(path):
    flags = ["--bf16", "false", "--use_cpu", "true", "--optim", "adamw_torch"] if "demo" not in path else []
    m, d, lam, kd, block, args = parse_config(_types(), ["--config", str(REPO / path), *flags])
    tokens = d.block_size * args.per_device_train_batch_size * args.gradient_accumulation_steps
    if "demo" in path:
        assert tokens == 256 and args.max_steps == 110 and m.model_name_or_path == "smollm2"  # the studies' winner
        assert block.block_steps == 40 and block.block_calibration_blocks == 64  # docs/studies/blockwise.md
        assert lam.lambda_warmup_steps == 0 and kd.distill_alpha == 1.0 and args.learning_rate == 5e-4  # after the block phase
        assert not block.block_equalize  # neutral in the study, slower
        assert args.adam_beta2 == 0.95
    else:
        assert tokens * 8 == 2_097_152 and args.max_steps == 5000 and args.learning_rate == 1e-4
        assert lam.lambda_warmup_steps == (0 if "distill" in path else 1000) and "wandb" in args.report_to
        assert kd.distill_alpha == (0.5 if "distill" in path else 0.0)
        assert d.dataset == ["HuggingFaceFW/fineweb-edu"] and d.dataset_config == "sample-10BT"
        # the block phase (distill config only, not run at 8B): EfficientQAT's 4,096 sequences × 2 epochs
        assert block.block_steps == (2048 if "distill" in path else 0)
        assert not block.active or block.block_steps * block.block_batch_size == 2 * block.block_calibration_blocks


@pytest.mark.slow
def test_bad_config_exits_2_with_one_line(tmp_path, tiny_llama_folder):
    config = tiny_config(tmp_path, tiny_llama_folder, not_a_key=1)
    r = subprocess.run([sys.executable, str(RECIPE), "--config", str(config)], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown key(s): not_a_key" in r.stderr


@pytest.mark.slow
def test_wandb_offline(tmp_path, tiny_llama_folder):
    pytest.importorskip("wandb")
    config = tiny_config(tmp_path, tiny_llama_folder, report_to="wandb", max_steps=3, save_steps=3, eval_blocks=0)
    r = subprocess.run([sys.executable, str(RECIPE), "--config", str(config)], cwd=tmp_path,
                       env=env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true"),
                       capture_output=True, text=True, timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    data = b"".join(f.read_bytes() for f in runs[0].rglob("*.wandb"))
    for key in (b"train/loss", b"train/lambda", b"train/learning_rate", b"train/tokens_seen", b"train/tokens_per_second"):
        assert key in data
