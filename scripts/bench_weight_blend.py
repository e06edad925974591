"""The weight blend of a 0 < λ < 1 step, timed alone: lerp(W, Q(W), λ) over every linear of a model's shapes.

    python scripts/bench_weight_blend.py [--shapes smollm2 llama2048] [--threads 2] [--repeats 5]

BitLinear forms the blended weight twice per step (the forward, and the backward's grad_x); the
λ = 1 step never forms float weights in its forward. Rows, side by side in one run: `fresh copy`
(lerp into a new tensor, bitft before this script) and `in place` (bitft.bitlinear._weight_at:
lerp into the dequantize workspace, the same bits), alternating. Best of --repeats passes, ms
per pass.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench_train import SHAPES
from bitft.bitlinear import _weight_at
from bitft.kernels import codes_of, dequantize, weight_codes


def linear_shapes(cfg: dict) -> list[tuple[int, int]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)] * cfg["num_hidden_layers"]


def best_ms(fns, repeats: int) -> list[float]:
    """Best ms of each of FNS, run alternately (the allocator's state moves both alike)."""
    best = [float("inf")] * len(fns)
    for r in range(repeats + 1):
        for j, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            if r:  # the first round warms up
                best[j] = min(best[j], 1000 * (time.perf_counter() - t))
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["smollm2"], choices=sorted(SHAPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lam", type=float, default=0.5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"CPU float32, {a.threads} threads, λ = {a.lam}, best of {a.repeats} passes\n")
    print("| shapes | weights | fresh copy ms | in place ms | ratio |\n|---|---|---|---|---|")
    for name in a.shapes:
        ws = [torch.randn(o, i) * 0.02 for o, i in linear_shapes(SHAPES[name]["config"])]
        codes = [weight_codes(w, packed=True) for w in ws]  # as BitLinear's cache holds them

        def fresh():
            for w, (c, inv) in zip(ws, codes):
                torch.lerp(w, dequantize(codes_of(c), inv, w.dtype, "wf"), a.lam)

        def in_place():
            for w, (c, inv) in zip(ws, codes):
                _weight_at(w, codes_of(c), inv, a.lam)

        f, i = best_ms([fresh, in_place], a.repeats)
        print(f"| {name} | {sum(w.numel() for w in ws) / 1e6:.1f}M | {f:.0f} | {i:.0f} | {i / f:.2f} |")


if __name__ == "__main__":
    main()
