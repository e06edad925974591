"""Distillation from the full-precision teacher against plain cross-entropy, at equal tokens: docs/studies/distill_ablation.md.

    python scripts/distill_ablation.py                  # SmolLM2-135M, 4 variants × 120 steps × 512 tokens
    python scripts/distill_ablation.py --seed 1 --variants ce kd_attn --out runs/distill-ablation-seed1

Each variant is the warmup recipe with the demo config (recipes/warmup_10B.py, configs/demo/warmup.yaml:
λ linear over the first half, through `accelerate launch --cpu`), the same model, data order, seed,
learning rate and steps; only the training loss differs (bitft.train.distill):

    ce              cross-entropy only (today's recipe)
    kd              (1 − α)·CE + α·τ²·KL(teacher ‖ student) on the logits        --alpha, --temperature
    kd_attn         kd + w · Q/K/V relation KL at the last layer (MiniLM-v2)     --attention-weight
    kd_attn_subln   kd_attn with SubLN (an RMSNorm before every activation quantizer)

The teacher is the original model in full precision. Held-out perplexity is the λ=1 cross-entropy on
the recipe's held-out blocks every --eval-steps steps, whatever the loss; each final checkpoint goes
through `bitft eval` (WikiText-2 perplexity and a task subset). The machinery is the warmup ablation's
(scripts/warmup_ablation.py). Writes OUT/distill_ablation.{png,md,json}; finished runs are kept.
"""

from __future__ import annotations

from warmup_ablation import base_parser, evaluate, report, start, train

VARIANTS = ("ce", "kd", "kd_attn", "kd_attn_subln")


def variant_flags(name: str, a) -> list[str]:
    kd = ["--distill_alpha", str(a.alpha), "--distill_temperature", str(a.temperature)]
    attn = ["--attention_distill_weight", str(a.attention_weight)]
    return {"ce": [], "kd": kd, "kd_attn": kd + attn, "kd_attn_subln": kd + attn + ["--subln", "true"]}[name]


def main():
    p = base_parser(__doc__, VARIANTS, "runs/distill-ablation")
    p.add_argument("--alpha", type=float, default=0.5, help="distill_alpha of the KD variants")
    p.add_argument("--temperature", type=float, default=1.0, help="distill_temperature of the KD variants")
    p.add_argument("--attention-weight", type=float, default=1.0, help="attention_distill_weight of the *_attn variants")
    p.add_argument("--train-only", action="store_true", help="train the variants, evaluate and tabulate later")
    a, extra = p.parse_known_args()
    out, env, t0 = start(a)
    for v in a.variants:
        train(v, variant_flags(v, a), a, extra, out, env)
    if a.train_only:
        return
    evals = {v: evaluate(v, str(out / v), a, out, env) for v in a.variants}
    half = a.steps // 2
    report("distill_ablation", evals, a, extra, out, half, f"step {half}: the demo's λ warmup ends, CE after", t0)


if __name__ == "__main__":
    main()
