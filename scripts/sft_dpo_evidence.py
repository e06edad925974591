"""SFT and DPO on the real SmolLM2-135M-Instruct BitNet model, on CPU: the SFT/DPO table of docs/training.md.

    python scripts/sft_dpo_evidence.py [--base runs/demo-warmup] [--out runs/sft-dpo-evidence]

Starts from the warmup demo's output (a bitft checkpoint at λ=1; copied first, so a later warmup
run cannot change it under us) and runs the real recipes through `accelerate launch --cpu` with the
demo configs (configs/demo/sft.yaml, configs/demo/dpo.yaml), overriding only paths, steps and
learning rates:

    base ─▶ SFT (full)  ─▶ DPO (full, reference = frozen copy)
         └▶ SFT (LoRA)       └▶ DPO (LoRA, reference = adapters disabled)

and prints held-out figures before/after each run: SFT loss on 32 held-out conversations (loss on
the last assistant reply), DPO loss, reward margin and preference accuracy on 32 held-out pairs.
The LoRA rows also give the figure after merging the adapters into the master weights and
re-ternarizing them, which is what `bitft export --packed --merge-lora` ships: the merge cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json")


def launch(recipe: str, config: str, *flags: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    cmd = [ACCELERATE, "launch", "--cpu", "--num_processes", "1", "--num_cpu_threads_per_process", "1",
           f"recipes/{recipe}.py", "--config", config, "--disable_tqdm", "true", *flags]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{recipe} failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return time.perf_counter() - t0


def dpo_merged_eval(sft_dir: Path, adapters: Path, eval_size: int, seed: int, max_length: int, beta: float) -> dict:
    """Held-out DPO metrics of base + merged, re-ternarized adapters (as the export does), reference = base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import bitft  # noqa: F401
    from bitft.config import BitDPOConfig, PreferenceDataArguments
    from bitft.data.chat import build_datasets
    from bitft.train.model import frozen_copy
    from bitft.train.trainer import BitDPOTrainer

    torch.set_num_threads(1)
    base = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32)
    ref = frozen_copy(base)
    merged = PeftModel.from_pretrained(base, adapters).merge_and_unload()
    assert bitft.get_lambda(merged) == 1.0
    tok = AutoTokenizer.from_pretrained(sft_dir)
    data = PreferenceDataArguments(dataset=["shipped:demo/dpo/oasst_en_100_pairs.trl_conversational.jsonl"],
                                   eval_size=eval_size)
    train, held = build_datasets(data, "preference", seed=seed)
    args = BitDPOConfig(output_dir=str(adapters / "merged-eval"), use_cpu=True, bf16=False, report_to="none",
                        per_device_eval_batch_size=8, max_length=max_length, beta=beta, gradient_checkpointing=False,
                        disable_tqdm=True)
    trainer = BitDPOTrainer(model=merged, ref_model=ref, args=args, train_dataset=train, eval_dataset=held,
                            processing_class=tok)
    return trainer.evaluate()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="runs/demo-warmup", help="a bitft checkpoint at λ=1 (the warmup demo's output)")
    p.add_argument("--out", default="runs/sft-dpo-evidence")
    p.add_argument("--sft-steps", type=int, default=20)
    p.add_argument("--dpo-steps", type=int, default=15)
    p.add_argument("--sft-lr", type=float, default=1e-4)
    p.add_argument("--sft-lora-lr", type=float, default=1e-3)
    p.add_argument("--dpo-lr", type=float, default=2e-5)
    p.add_argument("--dpo-lora-lr", type=float, default=2e-4)
    p.add_argument("--max-length", type=int, default=128, help="tokens per sequence (the demo configs say 256)")
    p.add_argument("--dpo-lora", action="store_true", help="also run DPO with LoRA (and its merged evaluation)")
    a = p.parse_args()
    os.chdir(REPO)
    out = Path(a.out)
    base = out / "base"
    if not (base / "model.safetensors").is_file():
        src = Path(a.base)
        if not (src / "config.json").is_file() or "bitft" not in json.loads((src / "config.json").read_text()):
            sys.exit(f"{src} is not a bitft checkpoint: run the warmup demo first "
                     "(accelerate launch --cpu --num_processes 1 recipes/warmup_10B.py --config configs/demo/warmup.yaml)")
        base.mkdir(parents=True, exist_ok=True)
        for f in MODEL_FILES:
            if (src / f).is_file():
                shutil.copyfile(src / f, base / f)

    runs = {
        "sft": ("sft", "configs/demo/sft.yaml", base, a.sft_steps, a.sft_lr, False),
        "sft-lora": ("sft", "configs/demo/sft.yaml", base, a.sft_steps, a.sft_lora_lr, True),
        "dpo": ("dpo", "configs/demo/dpo.yaml", out / "sft", a.dpo_steps, a.dpo_lr, False),
        "dpo-lora": ("dpo", "configs/demo/dpo.yaml", out / "sft", a.dpo_steps, a.dpo_lora_lr, True),
    }
    if not a.dpo_lora:
        del runs["dpo-lora"]
    seconds = {}
    for name, (recipe, config, model, steps, lr, lora) in runs.items():
        results = out / name / f"{recipe}_results.json"
        if results.is_file():
            continue
        shutil.rmtree(out / name, ignore_errors=True)
        seconds[name] = launch(recipe, config, "--model_name_or_path", str(model), "--output_dir", str(out / name),
                               "--max_steps", str(steps), "--learning_rate", str(lr), "--use_peft", str(lora).lower(),
                               "--save_steps", str(steps), "--max_length", str(a.max_length))
    merged_file = out / "dpo-lora" / "merged_eval.json"
    if a.dpo_lora and not merged_file.is_file():
        merged_file.write_text(json.dumps(dpo_merged_eval(out / "sft", out / "dpo-lora", 32, 42, a.max_length, 0.1), indent=1))

    r = {n: json.loads((out / n / f"{runs[n][0]}_results.json").read_text()) for n in runs}
    if a.dpo_lora:
        r["dpo-lora"]["after_merged"] = json.loads(merged_file.read_text())

    print(f"\nSmolLM2-135M-Instruct BitNet b1.58 (λ=1), from {a.base}; CPU, float32, sequences of at most {a.max_length} tokens, "
          f"batch 4. Held-out: 32 conversations / 32 pairs.\n")
    print("| stage | steps | lr | held-out loss before | after | after LoRA merge + re-ternarize | minutes |")
    print("|---|---|---|---|---|---|---|")
    for n in ("sft", "sft-lora"):
        x = r[n]
        merged = f"{x['after_merged']['eval_loss']:.4f}" if x.get("after_merged") else "-"
        print(f"| SFT {'LoRA r=16' if x['lora'] else 'full'} | {x['steps']} | {runs[n][4]:g} | {x['before']['eval_loss']:.4f} | "
              f"{x['after']['eval_loss']:.4f} | {merged} | {x['train_minutes']} |")
    print("\n| stage | steps | lr | | DPO loss | reward margin | preference accuracy | minutes |")
    print("|---|---|---|---|---|---|---|---|")
    for n in [n for n in ("dpo", "dpo-lora") if n in r]:
        x = r[n]
        for k in ("before", "after", "after_merged"):
            if not x.get(k):
                continue
            y = x[k]
            label = {"before": "before", "after": "after", "after_merged": "after LoRA merge + re-ternarize"}[k]
            print(f"| DPO {'LoRA r=16' if x['lora'] else 'full'} ({x['reference']}) | {x['steps']} | {runs[n][4]:g} | {label} | "
                  f"{y['eval_loss']:.4f} | {y['eval_rewards/margins']:.4f} | {y['eval_rewards/accuracies']:.3f} | "
                  f"{x['train_minutes'] if k == 'after' else ''} |")


if __name__ == "__main__":
    main()
