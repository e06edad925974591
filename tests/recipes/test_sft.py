"""recipes/sft.py on a tiny converted Llama (λ=1) and bitft.data.chat's data and template handling.

- the real entry point through `accelerate launch`: λ stays 1 in every log, held-out loss before/after,
  checkpoints marked complete, the output reloads as a bitft model at λ=1;
- resume: the last checkpoint deleted, the same command gives the same loss tail;
- LoRA: only adapters train, they name the checkpoint as base, merged + re-ternarized loss reported;
- chat templates: none is a one-line error that says how to give one; a template TRL cannot mask
  falls back to last-turn completion loss (SmolLM2's real template among them); one with
  {% generation %} markers gets TRL's assistant-only loss;
- data: messages / ShareGPT / Alpaca rows, local files, a held-out slice that is never trained on.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import as_json, completed, shared_once
from recipes import sft

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
SHARED = REPO.parent / "shared" if (REPO.parent / "shared").is_dir() else Path(os.environ.get("BITFT_SHARED", "/work/shared"))
SFT_DATA = SHARED / "data" / "sft"

# a ChatML-like template without generation markers (TRL cannot mask assistant turns with it)
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")
MARKED_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}assistant: {% generation %}"
                   "{{ m['content'] }}</s>{% endgeneration %}\n{% else %}{{ m['role'] }}: {{ m['content'] }}</s>\n"
                   "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
MAX_STEPS = 6


def env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", HF_HUB_OFFLINE="1",
             PYTHONUNBUFFERED="1")
    e.pop("ACCELERATE_USE_CPU", None)
    e.update(extra)
    return e


@pytest.fixture(scope="session")
def tiny_bitft(tiny_llama_folder, tmp_path_factory):
    """The tiny random Llama converted at λ=1 (a bitft checkpoint), and a template file."""
    from bitft.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("tiny-bitft")
    convert_checkpoint(str(tiny_llama_folder), root / "model")
    (root / "plain.jinja").write_text(PLAIN_TEMPLATE)
    (root / "marked.jinja").write_text(MARKED_TEMPLATE)
    return root


def sft_config(tmp_path, tiny_bitft, **over) -> Path:
    cfg = dict(
        model_name_or_path=str(tiny_bitft / "model"), chat_template_path=str(tiny_bitft / "plain.jinja"),
        dataset=[str(SFT_DATA / "oasst_en_100_sft_messages.jsonl")], eval_size=8, assistant_only_loss=True,
        output_dir=str(tmp_path / "run"), max_steps=MAX_STEPS, per_device_train_batch_size=2,
        per_device_eval_batch_size=4, max_length=64, learning_rate=1e-3, lr_scheduler_type="linear", save_steps=3,
        logging_steps=1, use_cpu=True, gradient_checkpointing=False, report_to="none", disable_tqdm=True, seed=0,
    )
    cfg.update(over)
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_logs(run) -> dict[int, dict]:
    return {h["step"]: h for h in json.loads((Path(run) / "trainer_state.json").read_text())["log_history"] if "loss" in h}


def launched_reference(tmp_path_factory, recipe: str, make_config):
    """recipes/RECIPE.py launched once per test run on MAKE_CONFIG(folder): (config, run dir, completed process)."""
    def build(tmp):
        config = make_config(tmp)
        r = subprocess.run([ACCELERATE, "launch", "--cpu", "--num_processes", "1", "--num_cpu_threads_per_process", "1",
                            str(REPO / "recipes" / f"{recipe}.py"), "--config", str(config)],
                           cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-4000:]
        return {**as_json(r), "config": str(config)}

    tmp, r = shared_once(tmp_path_factory, f"{recipe}-reference", build)
    return Path(r["config"]), tmp / "run", completed(r)


@pytest.fixture(scope="session")
def reference(tmp_path_factory, tiny_bitft):
    """The real entry point, launched once per test run: (config, run dir, completed process)."""
    return launched_reference(tmp_path_factory, "sft", lambda tmp: sft_config(tmp, tiny_bitft))


@pytest.mark.slow
def test_launched_run_keeps_lambda_1_and_lowers_held_out_loss(reference):
    import bitft
    from transformers import AutoModelForCausalLM

    from bitft.train.resume import is_complete

    _, run, r = reference
    logs = train_logs(run)
    assert sorted(logs) == list(range(1, MAX_STEPS + 1))
    assert all(h["lambda"] == 1.0 for h in logs.values())
    results = json.loads((run / "sft_results.json").read_text())
    assert results["before"]["step"] == 0 and results["before"]["eval_lambda"] == 1.0
    assert results["after"]["eval_loss"] < results["before"]["eval_loss"]
    assert results["lambda_final"] == 1.0 and "last assistant reply" in results["loss_on"]
    assert "held-out loss: before" in r.stdout
    assert all(is_complete(run / f"checkpoint-{s}") for s in (3, 6))
    model = AutoModelForCausalLM.from_pretrained(run)
    assert bitft.get_lambda(model) == 1.0 and len(model.config.bitft["modules"]) == 14


@pytest.mark.slow
def test_resume_reproduces_the_loss_tail(reference, tmp_path):
    config, ref_run, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    for f in ("model.safetensors", "trainer_state.json", "sft_results.json"):
        (run / f).unlink()
    shutil.rmtree(run / "checkpoint-6")
    results = sft.main(["--config", str(config), "--output_dir", str(run)])
    got, want = train_logs(run), train_logs(ref_run)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    for step in (4, 5, 6):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step
    assert results["before"] == json.loads((ref_run / "sft_results.json").read_text())["before"]  # kept in the history


@pytest.mark.slow
def test_sigterm_stops_at_the_step_with_a_checkpoint_and_resumes(reference, tmp_path, tiny_bitft):
    """Preemption (bitft.train.preempt) in the SFT recipe: SIGTERM once checkpoint-3 is complete, to
    every process as SLURM sends it: stop after step 4 with checkpoint-4; the relaunch gives the reference tail."""
    import signal
    import time

    import psutil

    from bitft.train.resume import is_complete, newest_checkpoint

    config = sft_config(tmp_path, tiny_bitft)
    run = tmp_path / "run"
    proc = subprocess.Popen([ACCELERATE, "launch", "--cpu", "--num_processes", "1", "--num_cpu_threads_per_process", "1",
                             str(REPO / "recipes" / "sft.py"), "--config", str(config)], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (run / "checkpoint-3" / "bitft-complete.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before checkpoint-3"
        time.sleep(0.002)
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        p.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert "sft: SIGTERM: stopped after optimizer step 4" in out and "exit status 75" in out, out[-3000:]
    assert newest_checkpoint(run).name == "checkpoint-4" and is_complete(run / "checkpoint-4", checksums=True)
    sft.main(["--config", str(config)])  # the same command
    got, want = train_logs(run), train_logs(reference[1])
    for step in (5, 6):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step


@pytest.mark.slow
def test_lora_trains_adapters_on_bitlinear_and_reports_the_merge(tmp_path, tiny_bitft):
    config = sft_config(tmp_path, tiny_bitft, use_peft=True, lora_r=4, lora_alpha=8, max_steps=3, save_steps=3)
    results = sft.main(["--config", str(config)])
    run = tmp_path / "run"
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == (tiny_bitft / "model").resolve()
    assert sorted(adapter["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert not (run / "model.safetensors").exists()  # adapters only
    assert results["lora"] and results["lambda_final"] == 1.0
    # merging the adapters into the master weights and re-ternarizing (what the export does) costs < 1% of held-out loss
    merged, after = results["after_merged"]["eval_loss"], results["after"]["eval_loss"]
    assert math.isfinite(merged) and abs(merged - after) <= 0.01 * after


def refused(capsys, config) -> tuple[int, str]:
    """(exit status, stderr) of the recipe's entry point (`run_main`, what `python recipes/sft.py` runs), in this
    process: these refusals come before any training."""
    from bitft.errors import run_main

    capsys.readouterr()
    code = run_main(sft.main, "sft", ["--config", str(config)], exit_code=2)
    return code, capsys.readouterr().err


@pytest.mark.slow
def test_no_chat_template_is_a_one_line_error(tmp_path, tiny_bitft, capsys):
    code, err = refused(capsys, sft_config(tmp_path, tiny_bitft, chat_template_path=None))
    assert code == 2
    msg = err.strip().splitlines()[-1]
    assert "has no chat template" in msg and "chat_template_path" in msg and ".jinja" in msg


@pytest.mark.slow
def test_unknown_key_is_an_error(tmp_path, tiny_bitft, capsys):
    code, err = refused(capsys, sft_config(tmp_path, tiny_bitft, assistant_only_los=True))
    assert code == 2 and "assistant_only_los" in err and "did you mean assistant_only_loss" in err


@pytest.mark.parametrize("path", ["configs/sft.yaml", "configs/demo/sft.yaml"])
def test_shipped_configs_parse(path):
    from bitft.config import BitSFTConfig, ChatDataArguments, ModelArguments, parse_config

    flags = ["--bf16", "false", "--use_cpu", "true", "--optim", "adamw_torch"] if "demo" not in path else []
    m, d, args = parse_config((ModelArguments, ChatDataArguments, BitSFTConfig),
                              ["--config", str(REPO / path), *flags, "--max_steps", "7"])
    assert args.max_steps == 7 and args.assistant_only_loss and not m.use_peft
    if "demo" in path:
        assert m.model_name_or_path == "runs/demo-warmup" and args.output_dir == "runs/demo-sft" and not args.bf16
    else:
        assert d.dataset == ["HuggingFaceH4/ultrachat_200k"] and d.eval_split == "test_sft" and "wandb" in args.report_to


# ----------------------------------------------------------------------------- templates and data (no training)

def _tok(tiny_llama_folder, template):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_folder)
    tok.chat_template = template
    return tok


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                     {"role": "user", "content": "two plus two?"}, {"role": "assistant", "content": "four"}]}


def test_assistant_only_loss_where_the_template_allows_it(tiny_llama_folder):
    import datasets

    from bitft.data.chat import resolve_assistant_only
    from bitft.errors import DataError

    ds = datasets.Dataset.from_list([CHAT])
    on, train, _, how = resolve_assistant_only(_tok(tiny_llama_folder, MARKED_TEMPLATE), ds, None, True, "last_turn")
    assert on and "assistant turns" in how and train[0] == CHAT
    on, train, held, how = resolve_assistant_only(_tok(tiny_llama_folder, PLAIN_TEMPLATE), ds, ds, True, "last_turn")
    assert not on and train[0] == {"prompt": CHAT["messages"][:3], "completion": CHAT["messages"][3:]} and len(held) == 1
    on, train, _, how = resolve_assistant_only(_tok(tiny_llama_folder, PLAIN_TEMPLATE), ds, None, True, "full")
    assert not on and train[0] == CHAT and "every token" in how
    with pytest.raises(DataError, match="generation"):
        resolve_assistant_only(_tok(tiny_llama_folder, PLAIN_TEMPLATE), ds, None, True, "error")


@pytest.mark.slow
def test_smollm2_template_falls_back_to_last_turn_loss(smollm2_folder):
    """SmolLM2's real ChatML template: TRL cannot mask it; the fallback trains on the final reply's tokens only."""
    import datasets
    from transformers import AutoTokenizer

    from bitft.data.chat import assistant_mask_template, resolve_assistant_only

    tok = AutoTokenizer.from_pretrained(smollm2_folder)
    assert tok.chat_template and assistant_mask_template(tok) is None
    on, train, _, _ = resolve_assistant_only(tok, datasets.Dataset.from_list([CHAT]), None, True, "last_turn")
    ex = train[0]
    prompt = tok.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=False)
    assert full.startswith(prompt) and full[len(prompt):].startswith("four<|im_end|>")


def test_chat_rows_in_three_layouts_and_a_held_out_slice(tmp_path):
    from bitft.config import ChatDataArguments
    from bitft.data.chat import build_datasets, chat_row
    from bitft.errors import DataError

    assert chat_row({"instruction": "Sum", "input": "1 1", "output": "2"})["messages"] == [
        {"role": "user", "content": "Sum\n\n1 1"}, {"role": "assistant", "content": "2"}]
    assert chat_row({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]})["messages"] == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(DataError, match="needs `messages`"):
        chat_row({"text": "x"}, "f.jsonl row 0")
    args = ChatDataArguments(dataset=[str(SFT_DATA / "oasst_en_100_sft_messages.jsonl"), str(SFT_DATA / "alpaca_en_demo.json")],
                             eval_size=20)
    train, held = build_datasets(args, "chat", seed=0)
    assert len(train) + len(held) == 95 + 999 and len(held) == 20
    text = lambda d: {json.dumps(r["messages"]) for r in d}  # noqa: E731
    assert not text(train) & text(held)
    train2, held2 = build_datasets(args, "chat", seed=0)
    assert text(held2) == text(held)
    with pytest.raises(DataError, match="not found"):
        build_datasets(ChatDataArguments(dataset=[str(tmp_path / "missing.jsonl")]), "chat", seed=0)
    with pytest.raises(DataError, match="local jsonl/json"):
        build_datasets(ChatDataArguments(dataset=["no-such-org/no-such-dataset"]), "chat", seed=0)


# ----------------------------------------------------------------------------- shared with the warmup recipe

@pytest.mark.slow
def test_nan_loss_stops_with_state_saved(tmp_path, tiny_bitft):
    from bitft.train.resume import is_complete

    config = sft_config(tmp_path, tiny_bitft, learning_rate=1e30, lr_scheduler_type="constant", save_steps=1000,
                        eval_size=0, max_grad_norm=0.0)
    r = subprocess.run([sys.executable, str(REPO / "recipes" / "sft.py"), "--config", str(config)], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=200)
    assert r.returncode == 3, r.stderr[-3000:]
    msg = r.stderr.strip().splitlines()[-1]
    assert "optimizer step" in msg and "λ=1" in msg and "relaunch" in msg
    step = int(msg.split("optimizer step ")[1].split(",")[0])
    assert step > 1 and is_complete(tmp_path / "run" / f"checkpoint-{step - 1}")


@pytest.mark.slow
def test_wandb_offline(tmp_path, tiny_bitft):
    pytest.importorskip("wandb")
    config = sft_config(tmp_path, tiny_bitft, report_to="wandb", max_steps=2, save_steps=2, eval_size=0)
    r = subprocess.run([sys.executable, str(REPO / "recipes" / "sft.py"), "--config", str(config)], cwd=tmp_path,
                       env=env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true"),
                       capture_output=True, text=True, timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    data = b"".join(f.read_bytes() for f in runs[0].rglob("*.wandb"))
    assert b"train/loss" in data and b"train/lambda" in data


@pytest.mark.slow
def test_sft_starts_from_a_packed_checkpoint(tmp_path, tiny_bitft):
    """A packed export (HF1BitLLM's format) as the starting model: unpacked at λ=1, trained, saved as bitft."""
    import bitft
    from transformers import AutoModelForCausalLM

    from bitft.export.packed import export_packed

    export_packed(tiny_bitft / "model", tmp_path / "packed")
    config = sft_config(tmp_path, tiny_bitft, model_name_or_path=str(tmp_path / "packed"), max_steps=2, save_steps=2)
    results = sft.main(["--config", str(config)])
    logs = train_logs(tmp_path / "run")
    assert sorted(logs) == [1, 2] and all(h["lambda"] == 1.0 and math.isfinite(h["loss"]) for h in logs.values())
    assert results["lambda_final"] == 1.0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert bitft.get_lambda(model) == 1.0 and len(model.config.bitft["modules"]) == 14
