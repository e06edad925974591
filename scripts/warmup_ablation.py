"""Abrupt quantization against linear and sigmoid λ warmup, at equal tokens: docs/studies/warmup_ablation.md.

    python scripts/warmup_ablation.py                   # SmolLM2-135M, 3 × 120 steps × 512 tokens
    python scripts/warmup_ablation.py --steps 240       # longer; any extra flag goes to the recipe

Each variant is the warmup recipe (recipes/warmup_10B.py with configs/demo/warmup.yaml, through
`accelerate launch --cpu`), the same model, data order, seed, learning rate and steps; only the λ
schedule differs:

    abrupt    λ = 1 from step 0 (quantization-aware training from the start)
    linear    λ = min(step / W, 1)                       W = --warmup-steps (default: half the run)
    sigmoid   λ = the logistic curve of slope k over W steps, 0 at step 0 and 1 at step W

During training, held-out perplexity is measured every --eval-steps steps at λ = 1 (the ternary
model, whatever λ the run trains at), on the recipe's held-out blocks of the pre-training text.
At the end each final checkpoint (λ = 1 for every variant) goes through `bitft eval`: WikiText-2
perplexity (--ppl-windows × 2048 tokens) and a short zero-shot subset (--tasks, first --limit
examples); the original full-precision model gets the same, as the bar to aim at.

Writes OUT/warmup_ablation.{png,md,json}. A variant whose run finished is not rerun (delete its
folder to redo it), so a second call only redraws. Run time on the 2-core CPU: see docs/studies/warmup_ablation.md.
The machinery (train, evaluate, curves, plot, table) also serves scripts/distill_ablation.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VARIANTS = ("abrupt", "linear", "sigmoid")
# Every study run starts from the plain recipe (cross-entropy, lr 3e-4, micro-batches of 4 blocks),
# end to end only (no block phase: these studies came before it, docs/studies/blockwise.md), whatever the
# demo config ships (configs/demo/warmup.yaml); a variant's own flags come after and override these.
PLAIN = ["--learning_rate", "3e-4", "--distill_alpha", "0", "--per_device_train_batch_size", "4", "--block_steps", "0"]


def schedule_flags(variant: str, warmup: int, k: float) -> list[str]:
    if variant == "abrupt":
        return ["--lambda_schedule", "linear", "--lambda_warmup_steps", "0"]
    return ["--lambda_schedule", variant, "--lambda_warmup_steps", str(warmup), "--lambda_k", str(k)]


def run(cmd: list[str], env: dict, stdout: Path, log: Path) -> None:
    """Run CMD with its stdout in STDOUT and its stderr (warnings, progress) in LOG, as it goes."""
    print("$", " ".join(str(c) for c in cmd), f" > {stdout} 2> {log}", flush=True)
    with open(stdout, "w") as out, open(log, "w") as err:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=err).returncode
    if code:
        sys.exit(f"failed (exit {code}); the last lines of {log}:\n" + "".join(log.read_text().splitlines(True)[-30:]))


def bitft_eval(argv: list[str], env: dict, stdout: Path, log: Path) -> None:
    """`bitft ARGV` in this process (a fresh one per evaluation would spend seconds importing torch), with
    ENV's threads and settings, its stdout in STDOUT and its stderr in LOG."""
    import contextlib

    os.environ.update({k: env[k] for k in ("HF_HUB_OFFLINE", "TORCHDYNAMO_DISABLE", "TOKENIZERS_PARALLELISM")})
    import torch

    from bitft.cli import main as bitft_main

    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    print("$ bitft", " ".join(argv), f" > {stdout} 2> {log}", flush=True)
    with open(stdout, "w") as out, open(log, "w") as err, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = bitft_main(argv)
        except SystemExit as e:  # argparse's refusal of a flag
            code = e.code
    if code:
        sys.exit(f"bitft eval failed (exit {code}); the last lines of {log}:\n" + "".join(log.read_text().splitlines(True)[-30:]))


def write(path: Path, text: str) -> None:
    """Write TEXT to PATH through a temporary file beside it: never a half-written result."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def train(variant: str, flags: list[str], a, extra: list[str], out: Path, env: dict) -> None:
    """One recipe run (the variant's FLAGS, then EXTRA) into OUT/VARIANT, unless it already finished with the
    same settings."""
    d = out / variant
    settings = {"model": a.model, "config": a.config, "steps": a.steps, "eval_steps": a.eval_steps,
                "flags": [*PLAIN, *flags], "extra": extra}
    done = d / "ablation_settings.json"
    if (d / "warmup_results.json").is_file() and done.is_file() and json.loads(done.read_text()).get("settings") == settings:
        print(f"{variant}: finished earlier, kept", flush=True)
        return
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    cmd = [str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "1", "--num_cpu_threads_per_process",
           str(a.threads), "recipes/warmup_10B.py", "--config", a.config, "--model_name_or_path", a.model,
           "--output_dir", str(d), "--max_steps", str(a.steps), "--eval_strategy", "steps",
           "--eval_steps", str(a.eval_steps), "--logging_steps", str(max(1, a.eval_steps // 2)),
           "--save_steps", str(a.steps), "--save_total_limit", "1", "--disable_tqdm", "true", *PLAIN, *flags, *extra]
    t0 = time.perf_counter()
    run(cmd, env, d / "train.out", d / "train.log")
    seconds = time.perf_counter() - t0
    for ckpt in d.glob("checkpoint-*"):  # the optimizer state is 2× the model; the final weights stay in d
        shutil.rmtree(ckpt)
    write(done, json.dumps({"settings": settings, "seconds": round(seconds, 1)}, indent=1))


def evaluate(name: str, model: str, a, out: Path, env: dict, extra: list[str] = ()) -> dict:
    """`bitft eval --json` on MODEL (WikiText-2 perplexity + the task subset), cached in OUT/NAME."""
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    f = d / "ablation_eval.json"
    settings = {"model": model, "tasks": a.tasks, "limit": a.limit, "ppl_windows": a.ppl_windows, "seqlen": a.ppl_seqlen,
                "ppl_data": a.ppl_data}
    if f.is_file() and json.loads(f.read_text()).get("settings") == settings:  # (retraining deletes it)
        return json.loads(f.read_text())
    argv = ["eval", model, "--ppl", "--windows", str(a.ppl_windows), "--seqlen", str(a.ppl_seqlen), "--tasks", *a.tasks,
            "--limit", str(a.limit), "--json", "--no-progress", *(["--data", a.ppl_data] if a.ppl_data else []), *extra]
    bitft_eval(argv, env, d / "eval.out", d / "eval.log")
    r = json.loads((d / "eval.out").read_text()) | {"settings": settings}
    write(f, json.dumps(r, indent=1))
    return r


def curves(d: Path) -> dict:
    """Training cross-entropy (at the run's λ; a distilled run's CE term), λ and held-out λ=1 perplexity against
    tokens, from trainer_state.json."""
    results = json.loads((d / "warmup_results.json").read_text())
    tps = results["tokens_per_step"]
    hist = json.loads((d / "trainer_state.json").read_text())["log_history"]
    train_ = [(h["step"] * tps, h.get("ce_loss", h["loss"]), h.get("lambda")) for h in hist
              if "loss" in h and "eval_loss" not in h]
    evals = {}
    for h in hist:
        if "eval_loss" in h:
            evals[h["step"] * tps] = h["eval_perplexity"]
    return {"tokens_per_step": tps, "steps": results["steps"], "tokens": results["tokens"],
            "train_minutes": results["train_minutes"], "tokens_per_second": round(results["tokens"] / (60 * max(results["train_minutes"], 0.01)), 1),
            "train": train_, "eval": sorted(evals.items())}


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    for name, c in runs.items():
        tok = [t for t, _, _ in c["train"]]
        axes[0].plot(tok, [lam for _, _, lam in c["train"]], label=name)
        axes[1].plot(tok, [loss for _, loss, _ in c["train"]], label=name)
        axes[2].plot([t for t, _ in c["eval"]], [p for _, p in c["eval"]], marker="o", ms=3, label=name)
    axes[0].set(title="λ during training", xlabel="tokens", ylabel="λ (0 = full precision, 1 = ternary)")
    axes[1].set(title="training cross-entropy (at the run's own λ)", xlabel="tokens", ylabel="cross-entropy")
    axes[2].set(title="held-out perplexity of the ternary model (λ = 1)", xlabel="tokens", ylabel="perplexity",
                yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def table(runs: dict, evals: dict, a, machine: str, mid_step: int, mid_note: str) -> str:
    """The markdown tables: held-out λ=1 perplexity at the start, at MID_STEP and at the end, minutes and
    tokens/s of each run; the final checkpoints' `bitft eval` row in the seeds' format; the curves."""
    from bitft.tasks import seed_row, seed_table

    def fmt(x):
        return "–" if x is None else (f"{x:,.0f}" if x >= 1000 else f"{x:.1f}")

    lines = [f"| variant | tokens | held-out λ=1 ppl: start | at step {mid_step} | end | train min | tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for name, c in runs.items():
        ev = dict(c["eval"])
        lines.append(f"| {name} | {c['tokens']:,} | {fmt(c['eval'][0][1])} | "
                     f"{fmt(ev.get(mid_step * c['tokens_per_step']))} | {fmt(c['eval'][-1][1])} | "
                     f"{c['train_minutes']:.1f} | {c['tokens_per_second']:.0f} |")
    labels = {"original": "original (full precision, untrained)"}
    rows = {labels.get(n, n): seed_row(r["perplexity"]["ppl"], r["tasks"]) for n, r in evals.items()}
    n = next(iter(evals.values()))["tasks"][a.tasks[0]]["n"]
    lines += [
        "",
        f"Held-out perplexity: λ = 1, on the recipe's held-out blocks ({a.config}); {mid_note}. Final checkpoints (`bitft eval`): PPL = {a.ppl_data or 'WikiText-2'}, {a.ppl_windows} × "
        f"{a.ppl_seqlen} tokens; tasks: first {n} examples, acc in % (the seeds' table), one standard error "
        f"≈ ±{50 / math.sqrt(n):.1f} points at 50%. Machine: {machine}.",
        "",
        seed_table(rows, drop_empty=True),
        "",
        "Held-out λ=1 perplexity against tokens:",
        "",
        "| tokens | " + " | ".join(runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for t in sorted({t for c in runs.values() for t, _ in c["eval"]}):
        lines.append(f"| {t:,} | " + " | ".join(fmt(dict(c["eval"]).get(t)) for c in runs.values()) + " |")
    return "\n".join(lines) + "\n"


def run_env(threads: int) -> dict:
    """The environment of every recipe and eval run: THREADS threads, offline, no compilation."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TORCHDYNAMO_DISABLE="1",
                HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")


def report(name: str, evals: dict, a, extra: list[str], out: Path, mid_step: int, mid_note: str, t0: float) -> None:
    """OUT/NAME.{png,md,json} from the variants' curves and EVALS; the table printed."""
    runs = {v: curves(out / v) for v in a.variants}
    if len({c["tokens"] for c in runs.values()}) != 1:
        sys.exit(f"the variants saw different numbers of tokens: { {v: c['tokens'] for v, c in runs.items()} }")
    plot(runs, out / f"{name}.png")
    from bitft.machine import cpu_line  # here: `import bitft` costs seconds (torch, transformers) a call that trains nothing

    md = table(runs, evals, a, cpu_line(), mid_step, mid_note)
    write(out / f"{name}.md", md)
    write(out / f"{name}.json", json.dumps({"settings": vars(a) | {"extra": extra}, "curves": runs, "evals": evals},
                                           indent=1))
    print("\n" + md)
    print(f"wrote {out / name}.{{png,md,json}} ({(time.perf_counter() - t0) / 60:.1f} min this call)")


def base_parser(doc: str, variants, out: str) -> argparse.ArgumentParser:
    """The flags every study script shares (this one, distill_ablation, recipe_study); each adds its own."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0],
                                epilog="Flags it does not know go to every recipe run (e.g. --learning_rate 1e-4).")
    p.add_argument("--model", default="smollm2", help="source to convert (default: the SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--config", default="configs/demo/warmup.yaml", help="the recipe config every variant starts from")
    p.add_argument("--variants", nargs="+", default=list(variants), choices=variants)
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per variant (equal tokens)")
    p.add_argument("--eval-steps", type=int, default=10, help="held-out λ=1 perplexity every N steps")
    p.add_argument("--tasks", nargs="+", default=["arc_easy", "hellaswag", "piqa"])
    p.add_argument("--limit", type=int, default=200, help="examples per task")
    p.add_argument("--ppl-windows", type=int, default=4, help="WikiText-2 windows")
    p.add_argument("--ppl-seqlen", type=int, default=2048, help="tokens per WikiText-2 window")
    p.add_argument("--ppl-data", help="another text for the perplexity (bitft eval --data; default: WikiText-2 test)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=out)
    return p


def start(a) -> tuple[Path, dict, float]:
    """(output folder, run environment, start time) of a study, run from the repository root."""
    os.chdir(REPO)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    return out, run_env(a.threads), time.perf_counter()


def main():
    p = base_parser(__doc__, VARIANTS, "runs/warmup-ablation")
    p.add_argument("--warmup-steps", type=int, help="W: steps until λ reaches 1 (default: half of --steps)")
    p.add_argument("--k", type=float, default=10.0, help="sigmoid slope")
    p.add_argument("--no-original", action="store_true", help="skip evaluating the original model")
    a, extra = p.parse_known_args()
    if a.warmup_steps is None:
        a.warmup_steps = a.steps // 2
    if not 0 < a.warmup_steps <= a.steps:
        p.error(f"--warmup-steps must be in 1..{a.steps} (the run's steps), got {a.warmup_steps}")
    out, env, t0 = start(a)
    for v in a.variants:
        train(v, schedule_flags(v, a.warmup_steps, a.k), a, extra, out, env)
    evals = {}
    if not a.no_original:
        from bitft.sources import resolve_source

        evals["original"] = evaluate("original", str(resolve_source(a.model)), a, out, env, ["--backend", "transformers"])
    for v in a.variants:
        evals[v] = evaluate(v, str(out / v), a, out, env)

    report("warmup_ablation", evals, a, extra, out, a.warmup_steps,
           f"step {a.warmup_steps} = W, where linear and sigmoid reach λ = 1", t0)


if __name__ == "__main__":
    main()
