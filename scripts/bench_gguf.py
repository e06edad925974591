"""Which GGUF to use on this CPU: prompt and decode speed of each ternary type, in mainline llama.cpp and bitnet.cpp.

    python scripts/bench_gguf.py [--bitnet-cpp DIR] [--layers 4] [--wide-layers 2] [--threads 2] [--runs 3]

Random Llamas at λ=1, converted and exported by bitft (`bitft export --gguf --type T`), so every linear is
ternary (rows multiples of 256): a 2048-wide shape (FFN 5632, 16 heads; --layers) and Llama-3-8B's widths
(hidden 4096, FFN 14336, 32 query / 8 key-value heads; --wide-layers: a whole 8B model does not fit
a small machine). Both use a 49,152-entry vocabulary (SmolLM2's tokenizer), its F16 head the same in every
file. Types: F16 (the float baseline), TQ1_0, TQ2_0 and bitnet.cpp's I2_S. Each file, side by side in one run:
- mainline llama.cpp (llama-cpp-python, the `gguf` extra): F16, TQ1_0, TQ2_0 (it has no I2_S);
- bitnet.cpp (microsoft/BitNet; its binaries folder from --bitnet-cpp or $BITNET_CPP_DIR), `llama-bench`:
  all four; skipped, saying so, without it.
Prompt = 64 tokens in one batch; decode = 32 tokens one at a time after it; --threads threads; the median
(llama-cpp-python) or mean (llama-bench) of --runs runs after a warm-up. Prints a markdown table and the CPU.
Measure on an idle machine only: a job beside it reorders the rows.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import bitft
from bitft.export.gguf import export_gguf
from bitft.machine import cpu_line
from bitft.sources import embedded_smollm2, load_gguf

PROMPT, DECODE = 64, 32
SHAPES = {"2048-wide": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16),
          "Llama-3-8B widths": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                    num_key_value_heads=8)}
TYPES = ("f16", "tq1_0", "tq2_0", "i2_s")


def mainline_tps(path: Path, threads: int, runs: int) -> tuple[float, float]:
    """(prompt, decode) tokens/s through llama-cpp-python, opened as bitft opens a GGUF (bitft.llamacpp)."""
    from bitft.llamacpp import open_gguf

    llm = open_gguf(path, n_ctx=256, n_threads=threads, n_threads_batch=threads, n_batch=PROMPT, verbose=False)
    prompt, decode = [], []
    for r in range(runs + 1):  # the first run warms caches and is dropped
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(list(range(100, 100 + PROMPT)))
        t1 = time.perf_counter()
        for i in range(DECODE):
            llm.eval([200 + i])
        if r:
            prompt.append(PROMPT / (t1 - t0))
            decode.append(DECODE / (time.perf_counter() - t1))
    return statistics.median(prompt), statistics.median(decode)


def bitnet_cpp_tps(bench: Path, path: Path, threads: int, runs: int) -> tuple[float, float]:
    """(prompt, decode) tokens/s through bitnet.cpp's llama-bench."""
    out = subprocess.run([str(bench), "-m", str(path), "-p", str(PROMPT), "-n", str(DECODE), "-t", str(threads),
                          "-r", str(runs), "-o", "json"], capture_output=True, text=True, check=True).stdout
    tps = {("prompt" if r["n_prompt"] else "decode"): r["avg_ts"] for r in json.loads(out)}
    return tps["prompt"], tps["decode"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bitnet-cpp", default=os.environ.get("BITNET_CPP_DIR"),
                   help="bitnet.cpp's binaries folder (build/bin), default $BITNET_CPP_DIR")
    p.add_argument("--layers", type=int, default=4, help="layers of the 2048-wide shape")
    p.add_argument("--wide-layers", type=int, default=2, help="layers of the Llama-3-8B-wide shape")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    bench = Path(args.bitnet_cpp).expanduser() / "llama-bench" if args.bitnet_cpp else None
    if bench is not None and not bench.is_file():
        p.error(f"{bench} not found: --bitnet-cpp takes bitnet.cpp's build/bin folder")

    _, tokenizer = load_gguf(embedded_smollm2())  # any BPE tokenizer with 49152 entries will do
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bitft-bench-gguf-"))
    try:
        for shape, widths in SHAPES.items():
            layers = args.layers if shape == "2048-wide" else args.wide_layers
            cfg = LlamaConfig(vocab_size=49152, num_hidden_layers=layers, max_position_embeddings=2048,
                              tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, **widths)
            torch.manual_seed(0)
            model = bitft.convert_model(AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16), lam=1.0)
            model.save_pretrained(work / "ckpt")
            tokenizer.save_pretrained(work / "ckpt")
            del model
            for t in TYPES:
                out = work / f"{t}.gguf"
                table = dict(export_gguf(work / "ckpt", out, qtype=t))
                mainline = mainline_tps(out, args.threads, args.runs) if t != "i2_s" else None
                theirs = bitnet_cpp_tps(bench, out, args.threads, args.runs) if bench else None
                rows.append((f"{shape}, {layers} layers", t.upper(), out.stat().st_size, table["bits per linear weight"],
                             mainline, theirs))
                out.unlink()
                out.with_suffix(".md").unlink(missing_ok=True)
            shutil.rmtree(work / "ckpt")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def fmt(x):
        return f"{x[0]:.0f} / {x[1]:.1f}" if x else "-"

    print(f"\nCPU: {cpu_line()}; {args.threads} threads; prompt {PROMPT} tokens / decode {DECODE} tokens, tokens/s"
          + ("" if bench else "; bitnet.cpp not given (--bitnet-cpp): its column is empty") + "\n")
    print("| model | type | file MiB | bits per linear weight | llama.cpp prompt / decode | bitnet.cpp prompt / decode |")
    print("|---|---|---|---|---|---|")
    for shape, t, size, bits, mainline, theirs in rows:
        print(f"| {shape} | {t} | {size / 2**20:.0f} | {bits} | {fmt(mainline)} | {fmt(theirs)} |")


if __name__ == "__main__":
    main()
