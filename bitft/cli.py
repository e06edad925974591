"""`bitft` command line: each subcommand parses its flags, calls one library function, reports."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _table(rows) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _convert(args) -> None:
    import torch

    from bitft.checkpoint import convert_checkpoint

    targets = args.target_regex if args.target_regex else args.targets
    exclude = args.exclude_regex if args.exclude_regex else args.exclude
    t0 = time.perf_counter()
    summary = convert_checkpoint(args.source, args.output, lam=args.lam, targets=targets, exclude=exclude,
                                 subln=args.subln, overwrite=args.overwrite, gguf_dtype=getattr(torch, args.dtype))
    from bitft.surgery import summarize_names

    print(_table([
        ("source", args.source),
        ("output", summary["output"]),
        ("architecture", summary["architecture"]),
        ("BitLinear layers", f"{len(summary['converted'])}: {summarize_names(summary['converted'])}"),
        ("lambda", f"{summary['lambda']:g}"),
        ("SubLN", "on" if summary["subln"] else "off"),
        ("how", summary["how"]),
        ("seconds", f"{time.perf_counter() - t0:.1f}"),
    ]))


def _info(args) -> None:
    from bitft.checkpoint import describe_checkpoint

    print(_table(describe_checkpoint(args.checkpoint)))


def _export(args) -> None:
    if args.packed:
        from bitft.export.packed import export_packed

        rows = export_packed(args.checkpoint, args.output, overwrite=args.overwrite, merge_lora=args.merge_lora)
    else:
        from bitft.export.gguf import export_gguf

        rows = export_gguf(args.checkpoint, args.output, qtype=args.type, float_type=args.float_type,
                           tokenizer_pre=args.tokenizer_pre, overwrite=args.overwrite, merge_lora=args.merge_lora)
    print(_table([("output", args.output), *rows]))


def _plot_schedule(args) -> None:
    from bitft.schedule import LambdaSchedule, plot_schedules

    schedules = [LambdaSchedule("linear", args.warmup_steps)]
    schedules += [LambdaSchedule("sigmoid", args.warmup_steps, k=k) for k in args.k]
    plot_schedules(schedules, args.steps, args.output)
    print(f"wrote {args.output}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitft", description="Turn Hugging Face causal LMs into BitNet b1.58 models.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="swap the decoder's linear layers for BitLinear and save a checkpoint")
    c.add_argument("source", help="hub id (org/name), local model folder, or .gguf file")
    c.add_argument("--output", "-o", required=True, help="folder to write (must be new or empty unless --overwrite)")
    c.add_argument("--lambda", dest="lam", type=float, default=1.0,
                   help="blend in [0, 1]: 0 = the original model, 1 = ternary (default 1)")
    c.add_argument("--targets", nargs="+", help="convert only these linear layers: exact names or suffixes (q_proj)")
    c.add_argument("--target-regex", help="convert only linear layers whose full name matches this regex")
    c.add_argument("--exclude", nargs="+", help="keep these linear layers full precision: exact names or suffixes")
    c.add_argument("--exclude-regex", help="keep linear layers whose full name matches this regex full precision")
    c.add_argument("--subln", action="store_true", help="add an RMSNorm before each activation quantizer (SubLN)")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype a GGUF source is dequantized to (a safetensors folder keeps its own; default float32)")
    c.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    c.set_defaults(func=_convert)

    e = sub.add_parser("export", help="write a λ=1 checkpoint as a packed 2-bit model or a llama.cpp GGUF file")
    e.add_argument("checkpoint", help="a folder written by `bitft convert` or a training run, at λ=1")
    fmt = e.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--packed", action="store_true", help="transformers' BitNet format (uint8, 4 weights a byte)")
    fmt.add_argument("--gguf", action="store_true", help="a GGUF file for llama.cpp (Llama-architecture models)")
    e.add_argument("--output", "-o", required=True, help="folder (--packed) or .gguf file (--gguf) to write")
    e.add_argument("--type", default="tq2_0", help="--gguf: tq2_0 (2.06 bits), tq1_0 (1.69 bits), or the exact baselines q8_0, f16 (default tq2_0)")
    e.add_argument("--float-type", default="f16", choices=["f16", "f32"],
                   help="--gguf: type of embeddings and lm_head (default f16)")
    e.add_argument("--tokenizer-pre", default="default",
                   help="--gguf: llama.cpp's pre-tokenizer name (llama-bpe for Llama-3, smollm for SmolLM2)")
    e.add_argument("--merge-lora", action="store_true", help="merge LoRA adapters into the master weights first")
    e.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    e.set_defaults(func=_export)

    ps = sub.add_parser("plot-schedule", help="draw λ schedules (linear, sigmoid) as a PNG")
    ps.add_argument("--steps", type=int, default=1500)
    ps.add_argument("--warmup-steps", type=int, default=1000)
    ps.add_argument("--k", type=float, nargs="+", default=[5.0, 10.0, 20.0], help="sigmoid slopes")
    ps.add_argument("--output", "-o", default="lambda_schedules.png")
    ps.set_defaults(func=_plot_schedule)

    i = sub.add_parser("info", help="print what a checkpoint is, as a table")
    i.add_argument("checkpoint", help="checkpoint folder")
    i.set_defaults(func=_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "targets", None) and getattr(args, "target_regex", None):
        print("bitft: error: give --targets or --target-regex, not both", file=sys.stderr)
        return 2
    if getattr(args, "exclude", None) and getattr(args, "exclude_regex", None):
        print("bitft: error: give --exclude or --exclude-regex, not both", file=sys.stderr)
        return 2
    from bitft.checkpoint import BitftError

    try:
        args.func(args)
    except BitftError as e:
        if os.environ.get("BITFT_DEBUG"):
            raise
        print(f"bitft: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
