"""The block-wise study's table and plot (docs/studies/blockwise.md) from finished demo-warmup runs.

Each RUN folder is a `recipes/warmup_10B.py --config configs/demo/warmup.yaml` output (its warmup_config.yaml gives
the seed, the end-to-end lr and block_equalize) with, beside it,
`wikitext.json` from `bitft eval RUN --ppl --windows 4 --json`. Minutes are every phase's: the block-wise
phase (calibration streams included) plus the end-to-end Trainer's (`total_minutes`, else `train_minutes`).

    python scripts/blockwise_study.py runs/study/* --plot docs/studies/blockwise.png [--baseline 11.80 3007.40 577.1]

--baseline MIN WIKITEXT HELDOUT adds a point measured elsewhere (today's demo warmup) to the table and the plot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def row(run: Path) -> dict | None:
    results, wiki = run / "warmup_results.json", run / "wikitext.json"
    if not results.is_file() or not wiki.is_file():
        return None
    r = json.loads(results.read_text())
    b = r.get("blockwise")
    cfg = yaml.safe_load((run / "warmup_config.yaml").read_text()) if (run / "warmup_config.yaml").is_file() else {}
    return {"run": run.name, "seed": cfg.get("seed", "?"), "lr": cfg.get("learning_rate", "?"),
            "equalize": "yes" if cfg.get("block_equalize") else "no", "block_steps": sum(x["steps"] for x in b["blocks"]) if b else 0,
            "block_minutes": b["minutes_this_launch"] if b else 0.0, "e2e_steps": r["steps"],
            "minutes": r.get("total_minutes", r["train_minutes"]),
            "heldout": r["after"]["eval_perplexity"], "wikitext": json.loads(wiki.read_text())["perplexity"]["ppl"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--plot", type=Path, help="PNG: WikiText-2 perplexity against minutes")
    p.add_argument("--baseline", nargs=3, type=float, metavar=("MIN", "WIKITEXT", "HELDOUT"),
                   help="today's demo warmup, measured elsewhere")
    a = p.parse_args(argv)
    rows = [r for r in map(row, a.runs) if r is not None]
    if a.baseline:
        rows.insert(0, {"run": "demo warmup (cited)", "seed": 1, "lr": 1e-3, "equalize": "no", "block_steps": 0, "block_minutes": 0.0, "e2e_steps": 180,
                        "minutes": a.baseline[0], "wikitext": a.baseline[1], "heldout": a.baseline[2]})
    print("| run | seed | block steps (all blocks) | equalize | block-phase min | E2E steps | E2E lr | min, all phases "
          "| WikiText-2 (4 × 2048) | held-out |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['seed']} | {r['block_steps']:,} | {r['equalize']} | {r['block_minutes']:.2f} | {r['e2e_steps']} | {r['lr']:g} | {r['minutes']:.2f} | "
              f"{r['wikitext']:,.1f} | {r['heldout']:,.1f} |")
    if a.plot and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, r in enumerate(rows):  # circles: E2E only; squares: block phase + E2E; diamonds: with block_equalize; color: seed
            marker = "D" if r["equalize"] == "yes" else "s" if r["block_steps"] else "o"
            ax.scatter(r["minutes"], r["wikitext"], marker=marker, color="tab:blue" if r["seed"] == 1 else "tab:orange")
            ax.annotate(r["run"], (r["minutes"], r["wikitext"]), fontsize=7, xytext=(4, 2 if i % 2 else -10),
                        textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("minutes, all phases (2 threads)")
        ax.set_ylabel("WikiText-2 perplexity (4 × 2048, log)")
        ax.axhline(300, color="k", lw=0.8, ls="--")
        ax.set_title("demo warmup: block phase + E2E (squares; diamonds: + equalization)\n"
                     "against E2E only (circles); blue: seed 1, orange: seed 42", fontsize=9)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)
        print(f"wrote {a.plot}")


if __name__ == "__main__":
    main()
