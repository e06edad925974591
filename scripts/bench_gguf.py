"""llama.cpp decode speed of ternary GGUF types against Q8_0 and F16, on this CPU.

    python scripts/bench_gguf.py [--layers 8] [--threads 2] [--tokens 64] [--runs 5]

A random Llama whose widths are multiples of 256 (hidden 2048, FFN 5632, 16 heads) so that every
linear is ternary-packed, converted at λ=1 and exported with `bitft export --gguf --type T` for T in
TQ2_0, TQ1_0, Q8_0, F16. Decode = one token at a time after an 8-token prompt, through
llama-cpp-python with a fixed thread count; the median of several runs. Prints a markdown table.
A last pair of rows is a Llama-3.x-shaped model (Llama-3.2-1B's widths: hidden 2048, FFN 8192, 32 query
and 8 key/value heads, 128256-entry vocabulary, `llama3` rope scaling), same layer count, F16 and TQ2_0.
"""

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import bitft
from bitft.export.gguf import export_gguf
from bitft.sources import embedded_smollm2, load_gguf


def decode_tps(path: Path, threads: int, tokens: int, runs: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=threads, n_batch=64, verbose=False)
    speeds = []
    for r in range(runs + 1):  # the first run warms caches and is dropped
        llm.reset()
        llm.eval(list(range(100, 108)))
        t0 = time.perf_counter()
        for i in range(tokens):
            llm.eval([200 + i])
        if r:
            speeds.append(tokens / (time.perf_counter() - t0))
    return statistics.median(speeds)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bitft-bench-gguf-"))
    try:
        cfg = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
                          num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                          tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        model = bitft.convert_model(AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16), lam=1.0)
        model.save_pretrained(work / "ckpt")
        _, tokenizer = load_gguf(embedded_smollm2())  # any BPE tokenizer with 49152 entries will do
        tokenizer.save_pretrained(work / "ckpt")
        del model
        rows = []
        for t in ("f16", "q8_0", "tq2_0", "tq1_0"):
            out = work / f"{t}.gguf"
            table = dict(export_gguf(work / "ckpt", out, qtype=t))
            tps = decode_tps(out, args.threads, args.tokens, args.runs)
            rows.append((t.upper(), out.stat().st_size, table["bits per linear weight"], tps))
            out.unlink()
        shutil.rmtree(work / "ckpt")
        cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=args.layers,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                          tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                          rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=8192))
        torch.manual_seed(0)
        model = bitft.convert_model(AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16), lam=1.0)
        model.save_pretrained(work / "ckpt")
        tokenizer.save_pretrained(work / "ckpt")  # the ids past 49152 become unused entries
        del model
        for t in ("f16", "tq2_0"):
            out = work / f"{t}.gguf"
            table = dict(export_gguf(work / "ckpt", out, qtype=t))
            tps = decode_tps(out, args.threads, args.tokens, args.runs)
            rows.append((f"{t.upper()}, Llama-3.2-1B shape", out.stat().st_size, table["bits per linear weight"], tps))
            out.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0][3]
    base31 = rows[4][3]
    print(f"\nllama.cpp decode, random Llama {args.layers} layers x hidden 2048 (FFN 5632), "
          f"{args.threads} threads, median of {args.runs} runs of {args.tokens} tokens\n")
    print("| linear type | file MiB | bits per linear weight | decode tokens/s | vs F16 |")
    print("|---|---|---|---|---|")
    for name, size, bits, tps in rows:
        print(f"| {name} | {size / 2**20:.0f} | {bits} | {tps:.1f} | {tps / (base31 if 'shape' in name else base):.2f}x |")


if __name__ == "__main__":
    main()
