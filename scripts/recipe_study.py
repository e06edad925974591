"""Which warmup recipe gives the best ternary model per minute: successive halving at equal CPU time.

    python scripts/recipe_study.py                          # SmolLM2-135M, the demo data, 8 variants
    python scripts/recipe_study.py --keep 2 --seeds 42 1    # finalists and the plain recipe in two seeds
    python scripts/recipe_study.py --seeds 1 &  python scripts/recipe_study.py --seeds 42   # seeds side by side
                                                            # (CPU time: the two barely slow each other's figures)

Every variant is the warmup recipe (recipes/warmup_10B.py, configs/demo/warmup.yaml) with its own flags
(VARIANTS below: λ schedule, learning rate, distillation α and τ). The budget is what the plain recipe
(CE, λ linear over half the run, lr 3e-4, --steps steps) spends; a variant gets as many optimizer steps
as that budget buys at its own cost per step, so each run completes its own LR and λ schedules within
it. Time is process CPU time inside optimizer steps (`step_cpu_seconds`, bitft.train.callbacks): other
jobs on the machine barely move it, where wall-clock would be slowed 3-10x; on an idle machine the wall
minutes of a step are its CPU minutes. Use --threads 1: with several threads, OpenMP's waiting threads
spin, and a busy machine then inflates CPU time too. Costs per step come from a short probe per cost class
(CE at λ<1, CE at λ=1, distillation at λ=1).

    round 1   every variant at --first-fraction of the budget       (held-out λ=1 perplexity at its end)
    round 2   the --keep best and the plain recipe at the full budget, in every --seeds seed
              (+ WikiText-2 perplexity of each final model: a winner must win off the training text too)

Writes OUT/recipe_study.{md,json,png}. Finished runs are kept (same settings), so a second call only
tabulates. The machinery (train, evaluate, parser) is scripts/warmup_ablation.py's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from warmup_ablation import base_parser, evaluate, start, train, write

KD = ["--distill_alpha", "0.5", "--distill_temperature", "1"]
VARIANTS = {  # name: (cost class, flags); every variant but plain starts at λ=1 unless it says ramp
    "plain": ("ramp", ["--learning_rate", "3e-4"]),
    "ce_lr1e-3": ("ce", ["--learning_rate", "1e-3"]),
    "ce_lr2e-3": ("ce", ["--learning_rate", "2e-3"]),
    "ce_ramp10_lr1e-3": ("ramp10", ["--learning_rate", "1e-3"]),
    "kd_lr1e-3": ("kd", ["--learning_rate", "1e-3", *KD]),
    "kd_lr2e-3": ("kd", ["--learning_rate", "2e-3", *KD]),
    "kd_tau2_lr2e-3": ("kd", ["--learning_rate", "2e-3", "--distill_alpha", "0.5", "--distill_temperature", "2"]),
    "kd_a0.9_lr2e-3": ("kd", ["--learning_rate", "2e-3", "--distill_alpha", "0.9", "--distill_temperature", "1"]),
}
PROBES = {"blend": ["--lambda_schedule", "constant", "--lambda_value", "0.5"], "ce": [], "kd": KD}


def schedule(kind: str, steps: int) -> list[str]:
    ramp = {"ramp": steps // 2, "ramp10": max(1, steps // 10)}.get(kind, 0)
    return ["--lambda_schedule", "linear", "--lambda_warmup_steps", str(ramp)]


def step_costs(d: Path) -> list[float]:
    """CPU seconds of each optimizer step of the run in D (logged every step)."""
    hist = json.loads((d / "trainer_state.json").read_text())["log_history"]
    cum = [(h["step"], h["step_cpu_seconds"]) for h in hist if "step_cpu_seconds" in h]
    return [(c1 - c0) / (s1 - s0) for (s0, c0), (s1, c1) in zip(cum, cum[1:])]


def probe(a, out: Path, env) -> dict:
    """CPU seconds per step of each cost class: the median of steps 3.. of a short run."""
    costs = {}
    run = argparse.Namespace(**{**vars(a), "steps": a.probe_steps, "eval_steps": a.probe_steps})  # a: the user's
    for kind, flags in PROBES.items():
        if kind != "blend":
            flags = flags + schedule("ce", run.steps)
        train(f"probe_{kind}", flags + ["--logging_steps", "1"], run, [], out, env)
        costs[kind] = statistics.median(step_costs(out / f"probe_{kind}")[2:])
    costs["ramp"] = (costs["blend"] + costs["ce"]) / 2  # λ<1 for the first half
    costs["ramp10"] = 0.1 * costs["blend"] + 0.9 * costs["ce"]
    return costs


def run_variant(name: str, steps: int, seed: int, a, extra, out: Path, env) -> dict:
    kind, flags = VARIANTS[name]
    run = argparse.Namespace(**{**vars(a), "steps": steps, "eval_steps": max(1, steps // 6)})
    tag = f"{name}-{steps}steps-seed{seed}"
    train(tag, flags + schedule(kind, steps) + ["--seed", str(seed), "--logging_steps", "1"], run, extra, out, env)
    d = out / tag
    hist = json.loads((d / "trainer_state.json").read_text())["log_history"]
    cpu = {h["step"]: h["step_cpu_seconds"] for h in hist if "step_cpu_seconds" in h}
    evals = [(cpu.get(h["step"], 0.0) / 60, h["eval_perplexity"]) for h in hist if "eval_perplexity" in h]
    res = json.loads((d / "warmup_results.json").read_text())
    return {"name": name, "seed": seed, "steps": steps, "tokens": res["tokens"], "cpu_minutes": max(cpu.values()) / 60,
            "wall_minutes": res["train_minutes"], "held_out_ppl": evals[-1][1], "curve": evals, "dir": str(d)}


def plot(finals: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for r in finals:
        ax.plot([m for m, _ in r["curve"]], [p for _, p in r["curve"]], marker="o", ms=3, label=f"{r['name']} (seed {r['seed']})")
    ax.set(xlabel="CPU minutes inside optimizer steps", ylabel="held-out perplexity at λ = 1", yscale="log",
           title="The ternary model against the minutes paid (SmolLM2-135M)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    p = base_parser(__doc__, tuple(VARIANTS), "runs/recipe-study")
    p.add_argument("--first-fraction", type=float, default=0.25, help="round 1 budget, a fraction of the plain run's")
    p.add_argument("--keep", type=int, default=2, help="variants promoted to the full budget")
    p.add_argument("--seeds", type=int, nargs="+", default=[42], help="seeds of round 2")
    p.add_argument("--first-seed", type=int, default=42, help="seed of round 1")
    p.add_argument("--probe-steps", type=int, default=6, help="steps of each cost probe")
    a, extra = p.parse_known_args()
    if a.probe_steps < 4:  # the median is over steps 3.. (the first two warm up)
        p.error(f"--probe-steps must be at least 4, got {a.probe_steps}")
    out, env, t0 = start(a)
    full_steps = a.steps
    costs = probe(a, out, env)
    budget = full_steps * costs["ramp"]  # the plain recipe's CPU seconds
    print("CPU s/step:", {k: round(v, 2) for k, v in costs.items()}, f"budget {budget / 60:.1f} CPU min", flush=True)

    def steps_for(name, fraction):
        return max(4, round(fraction * budget / costs[VARIANTS[name][0]]))

    first = [run_variant(n, steps_for(n, a.first_fraction), a.first_seed, a, extra, out, env) for n in a.variants]
    ranked = sorted(first, key=lambda r: r["held_out_ppl"])
    promoted = [r["name"] for r in ranked if r["name"] != "plain"][: a.keep]
    finals = [run_variant(n, full_steps if n == "plain" else steps_for(n, 1.0), s, a, extra, out, env)
              for s in a.seeds for n in ["plain", *promoted]]
    for r in finals:
        r["wikitext2_ppl"] = evaluate(Path(r["dir"]).name, r["dir"], a, out, env)["perplexity"]["ppl"]

    lines = [f"Round 1: each variant at {a.first_fraction:g} of the plain recipe's budget ({budget / 60 * a.first_fraction:.1f} CPU min), seed {a.first_seed}.", "",
             "| variant | steps | tokens | CPU min | wall min | held-out λ=1 ppl |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['steps']} | {r['tokens']:,} | {r['cpu_minutes']:.2f} | {r['wall_minutes']:.2f} | {r['held_out_ppl']:,.0f} |" for r in ranked]
    lines += ["", f"Round 2: the full budget ({budget / 60:.1f} CPU min), seeds {a.seeds}.", "",
              "| variant | seed | steps | tokens | tokens/CPU-s | CPU min | wall min | held-out λ=1 ppl | WikiText-2 ppl |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['seed']} | {r['steps']} | {r['tokens']:,} | {r['tokens'] / (60 * r['cpu_minutes']):.0f} | "
              f"{r['cpu_minutes']:.2f} | {r['wall_minutes']:.2f} | {r['held_out_ppl']:,.0f} | {r['wikitext2_ppl']:,.0f} |" for r in finals]
    from bitft.machine import cpu_line

    lines += ["", f"CPU s per step: {', '.join(f'{k} {v:.2f}' for k, v in costs.items())}. Machine: {cpu_line()}, {a.threads} threads. "
              f"WikiText-2: {a.ppl_windows} × {a.ppl_seqlen} tokens."]
    md = "\n".join(lines) + "\n"
    plot(finals, out / "recipe_study.png")
    write(out / "recipe_study.md", md)
    write(out / "recipe_study.json", json.dumps({"costs": costs, "budget_cpu_s": budget, "first": first, "finals": finals,
                                                 "settings": vars(a) | {"extra": extra}}, indent=1))
    print("\n" + md + f"\nwrote {out}/recipe_study.{{md,json,png}} ({(time.perf_counter() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
