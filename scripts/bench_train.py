"""Train-step time and peak memory: the plain model against BitLinear at λ=1, λ=0.5 and with distillation.

    python scripts/bench_train.py [--shapes smollm2 llama2048] [--repeats 2] [--steps 3] [--threads 2]
                                  [--impls plain fast blend kd kd_bf16 kd_topk kd_cache kd_recompute reference]
                                  [--top-k 32] [--device cpu|cuda]
                                  [--heap keep|glibc] [--mmap-threshold BYTES]

A step is forward + backward + AdamW step (fused: the Trainer's default) on a random-init Llama (no download) with random tokens.
Every case runs in a fresh process (plain, BitLinear and the reference alternating, --repeats
rounds); a process runs one warmup step (AdamW allocates its state there) and then --steps timed
steps, and the case's time is the fastest step of all its processes. Peak memory: the process's
peak RSS on CPU (ru_maxrss: model, optimizer and activations all count), torch.cuda.max_memory_allocated
on CUDA; the largest over its processes. CPU runs float32; CUDA runs bf16 autocast over float32
master weights. `--heap keep` (default) sets the heap as the recipes do for a CPU run
(bitft.train.cpu_heap: freed blocks stay in the heap, no page faults per step), `--heap glibc` leaves
glibc's default (every block above 32 MiB mapped and faulted in anew each step).

impls: `plain` = the unconverted model; `fast` = bitft's BitLinear at λ=1 (int8 saved activations,
cached weight codes, integer matmul); `blend` = the same at λ=0.5 (a λ warmup's steps); `kd` = `fast`
plus logits distillation from the full-precision teacher (0.5·CE + 0.5·KL as the recipe computes them:
the teacher under inference_mode, the CE and the KL in one pass over the vocabulary with the gradient
kept from the forward, bitft.train.logits_kd); `kd_bf16` = `kd` with the
teacher in bfloat16 (`teacher_dtype: bfloat16`; its logits are cast to float32 for the KL); `kd_recompute` = the same
with `distill_recompute` (the backward recomputes the teacher's logits); `kd_topk` = `kd` against the
teacher's top-k plus a tail class (bitft.train.sparse_kd, `distill_top_k`); `kd_cache` = the same
top-k read from a teacher cache (computed before the timed steps: the step has no teacher); `reference` = BitLinear
running the textbook fake-quant forward (`BitLinear.fake_quant_forward`, bitft ≤ 0.1).

Prints a markdown table, one row per shape and impl: step seconds and peak memory, each also as a
ratio to the plain model and to BitLinear at λ=1 measured in the same run.
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


IMPLS = {"plain": "plain model", "fast": "BitLinear λ=1", "blend": "BitLinear λ=0.5", "kd": "BitLinear λ=1 + KD",
         "kd_bf16": "BitLinear λ=1 + KD, bf16 teacher",
         "kd_recompute": "BitLinear λ=1 + KD, recompute", "kd_topk": "BitLinear λ=1 + KD top-k",
         "kd_cache": "BitLinear λ=1 + KD top-k, teacher cache", "reference": "fake-quant λ=1 (bitft ≤ 0.1)"}


def run_case(shape: str, impl: str, steps: int, threads: int, device: str, top_k: int = 32,
             heap: str = "keep") -> dict:
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if device == "cpu" and heap == "keep":
        from bitft.train.cpu_heap import keep_heap

        keep_heap()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = SHAPES[shape]
    model = LlamaForCausalLM(LlamaConfig(**spec["config"], attn_implementation="sdpa")).to(device)
    if impl != "plain":
        import bitft
        from bitft.bitlinear import BitLinear

        bitft.convert_model(model, lam=0.5 if impl == "blend" else 1.0)
        if impl == "reference":
            BitLinear.forward = BitLinear.fake_quant_forward
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the Trainer's default (torch ≥ 2.8)
    b, t = spec["batch"]
    ids = torch.randint(0, spec["config"]["vocab_size"], (b, t), device=device)
    cuda = device == "cuda"

    teacher = cached = None
    if impl.startswith("kd"):
        from bitft.train.distill import plain_copy
        from bitft.train.logits_kd import ce_and_kd, next_token_targets
        from bitft.train.sparse_kd import sparse_kd_sum, teacher_top_k

        teacher, keep = plain_copy(model), impl != "kd_recompute"
        if impl == "kd_bf16":  # teacher_dtype: bfloat16 (avx512_bf16 / AMX CPUs, GPUs)
            teacher = teacher.to(torch.bfloat16)
        mask = torch.ones(b, t - 1, dtype=torch.bool, device=device)
        if impl == "kd_cache":  # what CachedBlocks gives a step: float16 log-probs, ids, read before it
            with torch.inference_mode():
                hidden = teacher.base_model(input_ids=ids).last_hidden_state[:, :-1]
                logp, top = teacher_top_k(hidden, teacher.get_output_embeddings(), top_k)
            cached, teacher = (logp.half().clone(), top.to(torch.int32).clone()), None

    def loss_of():
        if teacher is not None and impl != "kd_topk":  # the recipe's step: one pass computes the CE and the KL
            with torch.inference_mode() if keep else torch.no_grad():
                hidden = teacher.base_model(input_ids=ids).last_hidden_state
            n = mask.sum().item()
            return ce_and_kd(model(input_ids=ids).logits, next_token_targets(ids), hidden,
                             teacher.get_output_embeddings(), 0.5 / n, 0.5 / n, keep_grad=keep)[0]
        out = model(input_ids=ids, labels=ids)
        if cached is not None:
            kd = sparse_kd_sum(out.logits[:, :-1], cached[0].float(), cached[1].long(), mask)
            return 0.5 * out.loss + 0.5 * kd / mask.sum()
        if teacher is None:
            return out.loss
        with torch.inference_mode():  # kd_topk
            hidden = teacher.base_model(input_ids=ids).last_hidden_state[:, :-1]
            logp, top = teacher_top_k(hidden, teacher.get_output_embeddings(), top_k)
        return 0.5 * out.loss + 0.5 * sparse_kd_sum(out.logits[:, :-1], logp, top, mask) / mask.sum()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = loss_of()
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
    p.add_argument("--impls", nargs="+", default=["plain", "fast", "blend", "kd", "kd_topk", "kd_cache"], choices=list(IMPLS))
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per case (best of)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process, after one warmup step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top-k", type=int, default=32, help="kd_topk / kd_cache: teacher tokens per position")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--heap", choices=["keep", "glibc"], default=None,
                   help="CPU: keep freed blocks in the heap as the recipes do (bitft.train.cpu_heap; the default), "
                        "or glibc's default (the default with --mmap-threshold)")
    p.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                   help="glibc MALLOC_MMAP_THRESHOLD_ for every case: blocks above it are mmapped and returned "
                        "to the OS when freed, so peak RSS tracks live tensors rather than heap fragmentation")
    p.add_argument("--case", nargs=2, metavar=("SHAPE", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mmap_threshold is not None and args.heap == "keep":
        p.error("--mmap-threshold sets where glibc maps large blocks; --heap keep maps none: use --heap glibc")
    args.heap = args.heap or ("glibc" if args.mmap_threshold is not None else "keep")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.case:
        print("RESULT " + json.dumps(run_case(*args.case, args.steps, args.threads, args.device, args.top_k, args.heap)), flush=True)
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
                       "--threads", str(args.threads), "--device", args.device, "--top-k", str(args.top_k),
                       "--heap", args.heap]
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
        f"CPU float32, {args.threads} threads, capability {cap}, heap {args.heap}"
    print(f"\n{dev}; forward+backward+AdamW step, best of {args.repeats} fresh processes × {args.steps} steps; "
          f"peak {'max_memory_allocated' if args.device == 'cuda' else 'RSS'}"
          f"{'' if args.mmap_threshold is None else f', MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}'}\n")
    print("| shapes | step | s | × plain | × BitLinear λ=1 | peak MiB | × plain |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        pl, fa = best(shape, "plain"), best(shape, "fast")
        for impl in args.impls:
            r = best(shape, impl)
            if r is None:
                continue
            x_pl = f"{r[0] / pl[0]:.2f}" if pl else "–"
            x_fa = f"{r[0] / fa[0]:.2f}" if fa else "–"
            m_pl = f"{r[1] / pl[1]:.2f}" if pl else "–"
            print(f"| {SHAPES[shape]['label']} | {IMPLS[impl]} | {r[0]:.2f} | {x_pl} | {x_fa} | {r[1]:.0f} | {m_pl} |")


if __name__ == "__main__":
    main()
