"""Show what conversion does to a real model: λ=0 is the original, λ=1 is ternary (untrained).

    python scripts/check_conversion.py runs/demo/converted --source path/to/model.gguf --windows 4

Prints a markdown table: WikiText-2 test perplexity (non-overlapping windows, see bitft.evaluate)
and the largest logit difference from the original model, for the original and for the converted
checkpoint at λ=0 and λ=1.
"""

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import bitft
from bitft.sources import load_model
from bitft.evaluate import perplexity, token_windows
from bitft.resources import resolve_path

DEFAULT_TEXT = "shipped:eval/wikitext2_test.raw"  # WikiText-2 test, installed with bitft


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("converted", help="a folder written by `bitft convert`")
    p.add_argument("--source", required=True, help="the model it was converted from (folder, .gguf, hub id)")
    p.add_argument("--text", default=DEFAULT_TEXT, help="raw text file or shipped:NAME to score (default: WikiText-2 test)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=4)
    args = p.parse_args()

    loaded = load_model(args.source)
    original, tokenizer = loaded.model, loaded.tokenizer
    converted = AutoModelForCausalLM.from_pretrained(args.converted, dtype=torch.float32).eval()
    windows = token_windows(tokenizer, Path(resolve_path(args.text)).read_text(), args.seqlen, args.windows)
    with torch.no_grad():
        ref = original(windows[:1]).logits

    rows = []
    for name, model, lam in (("original", original, None), ("converted", converted, 0.0), ("converted", converted, 1.0)):
        if lam is not None:
            bitft.set_lambda(model, lam)
        t0 = time.perf_counter()
        with torch.no_grad():
            diff = (model(windows[:1]).logits - ref).abs().max().item()
        ppl = perplexity(model, windows, progress=True)
        rows.append((name, "-" if lam is None else f"{lam:g}", ppl, diff, time.perf_counter() - t0))

    print(f"\nWikiText-2 test, {len(windows)} windows x {args.seqlen} tokens, float32, CPU\n")
    print("| model | λ | perplexity | max abs logit diff vs original | seconds |")
    print("|---|---|---|---|---|")
    for name, lam, ppl, diff, secs in rows:
        print(f"| {name} | {lam} | {ppl:.4g} | {diff:.3g} | {secs:.1f} |")
    if rows[1][3] != 0.0:
        raise SystemExit("λ=0 should reproduce the original logits exactly; it did not")


if __name__ == "__main__":
    main()
