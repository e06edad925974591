"""Train-step time and peak memory: the plain model against the BitLinear model at λ=1.

    python scripts/bench_train.py [--shapes smollm2 llama2048] [--repeats 2] [--steps 3] [--threads 2]
                                  [--impls plain fast reference] [--device cpu|cuda] [--mmap-threshold BYTES]

A step is forward + backward + AdamW step on a random-init Llama (no download) with random tokens.
Every case runs in a fresh process (plain, BitLinear and the reference alternating, --repeats
rounds); a process runs one warmup step (AdamW allocates its state there) and then --steps timed
steps, and the case's time is the fastest step of all its processes. Peak memory: the process's
peak RSS on CPU (ru_maxrss: model, optimizer and activations all count), torch.cuda.max_memory_allocated
on CUDA; the largest over its processes. CPU runs float32; CUDA runs bf16 autocast over float32
master weights.

impls: `plain` = the unconverted model; `fast` = bitft's BitLinear (int8 saved activations,
cached weight codes, integer matmul); `reference` = the same BitLinear layers running the
textbook fake-quant forward (`BitLinear.fake_quant_forward`, bitft ≤ 0.1).

Prints a markdown table: shapes | plain s | BitLinear s | ratio | plain peak MiB | BitLinear peak MiB | ratio
(and the reference's columns when it ran).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SHAPES = {
    "smollm2": dict(label="SmolLM2-135M (hidden 576, FFN 1536, 30 layers, vocab 49152), batch 4 × 128",
                    config=dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                                rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=2048),
                    batch=(4, 128)),
    "llama2048": dict(label="hidden 2048, FFN 5632, 4 layers (vocab 32000), batch 2 × 256",
                      config=dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                                  num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False,
                                  rms_norm_eps=1e-5, max_position_embeddings=2048),
                      batch=(2, 256)),
}


def run_case(shape: str, impl: str, steps: int, threads: int, device: str) -> dict:
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = SHAPES[shape]
    model = LlamaForCausalLM(LlamaConfig(**spec["config"], attn_implementation="sdpa")).to(device)
    if impl != "plain":
        import bitft
        from bitft.bitlinear import BitLinear

        bitft.convert_model(model, lam=1.0)
        if impl == "reference":
            BitLinear.forward = BitLinear.fake_quant_forward
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, t = spec["batch"]
    ids = torch.randint(0, spec["config"]["vocab_size"], (b, t), device=device)
    cuda = device == "cuda"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        return loss.item()

    step()  # warmup: AdamW state, the int matmul chooser's timings, allocator
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(shape=shape, impl=impl, time=min(times), peak_mib=peak, loss=loss)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--impls", nargs="+", default=["plain", "fast", "reference"], choices=["plain", "fast", "reference"])
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per case (best of)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process, after one warmup step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="glibc MALLOC_MMAP_THRESHOLD_ for every case: blocks above it are mmapped and returned "
                        "to the OS when freed, so peak RSS tracks live tensors rather than heap fragmentation")
    p.add_argument("--case", nargs=2, metavar=("SHAPE", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.case:
        print("RESULT " + json.dumps(run_case(*args.case, args.steps, args.threads, args.device)), flush=True)
        return

    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.repeats):
        for shape in args.shapes:
            for impl in args.impls:
                cmd = [sys.executable, __file__, "--case", shape, impl, "--steps", str(args.steps),
                       "--threads", str(args.threads), "--device", args.device]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                if out.returncode or not line:
                    sys.exit(f"case {shape}/{impl} failed:\n{out.stderr[-3000:]}")
                res = json.loads(line[0][7:])
                results.setdefault((shape, impl), []).append(res)
                print(f"  round {r + 1}: {shape:10s} {impl:9s} {res['time']:.3f} s  {res['peak_mib']:.0f} MiB  "
                      f"loss {res['loss']:.4f}", file=sys.stderr, flush=True)

    def best(shape, impl):
        rs = results.get((shape, impl))
        return (min(x["time"] for x in rs), max(x["peak_mib"] for x in rs)) if rs else None

    dev = f"CUDA {torch.cuda.get_device_name()} bf16 autocast" if args.device == "cuda" else \
        f"CPU float32, {args.threads} threads, capability {cap}"
    print(f"\n{dev}; forward+backward+AdamW step, best of {args.repeats} fresh processes × {args.steps} steps; "
          f"peak {'max_memory_allocated' if args.device == 'cuda' else 'RSS'}"
          f"{'' if args.mmap_threshold is None else f', MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}'}\n")
    ref = "reference" in args.impls
    head = "| shapes | plain s | BitLinear s | ratio | plain peak MiB | BitLinear peak MiB | ratio |"
    rule = "|---|---|---|---|---|---|---|"
    if ref:
        head += " fake-quant s | ratio | fake-quant peak MiB | ratio |"
        rule += "---|---|---|---|"
    print(head)
    print(rule)
    for shape in args.shapes:
        pl, fa, rf = best(shape, "plain"), best(shape, "fast"), best(shape, "reference")
        if not (pl and fa):
            continue
        row = (f"| {SHAPES[shape]['label']} | {pl[0]:.2f} | {fa[0]:.2f} | {fa[0] / pl[0]:.2f} | {pl[1]:.0f} | "
               f"{fa[1]:.0f} | {fa[1] / pl[1]:.2f} |")
        if ref and rf:
            row += f" {rf[0]:.2f} | {rf[0] / pl[0]:.2f} | {rf[1]:.0f} | {rf[1] / pl[1]:.2f} |"
        print(row)


if __name__ == "__main__":
    main()
