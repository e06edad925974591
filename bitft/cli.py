"""`bitft` command line: each subcommand parses its flags, calls one library function, reports."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _table(rows) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _convert(args) -> None:
    import torch

    from bitft.convert import convert_checkpoint

    targets = args.target_regex if args.target_regex else args.targets
    exclude = args.exclude_regex if args.exclude_regex else args.exclude
    t0 = time.perf_counter()
    summary = convert_checkpoint(args.source, args.output, lam=args.lam, targets=targets, exclude=exclude,
                                 subln=args.subln, overwrite=args.overwrite, gguf_dtype=getattr(torch, args.dtype))
    from bitft.surgery import summarize_names

    if summary["family"] != "full precision":
        print(f"bitft: {args.source} is already ternary ({summary['family']}): written as a bitft checkpoint at λ=1")
    print(_table([
        ("source", args.source),
        ("output", summary["output"]),
        ("architecture", summary["architecture"]),
        ("BitLinear layers", f"{len(summary['converted'])}: {summarize_names(summary['converted'])}"),
        ("lambda", f"{summary['lambda']:g}"),
        ("SubLN", {False: "off", True: "on (before every BitLinear)",
                   "bitnet": "bitnet (before o_proj and down_proj: the model is now a BitNet)"}[summary["subln"]]),
        ("how", summary["how"]),
        ("model card", str(Path(summary["output"]) / "README.md")),
        ("seconds", f"{time.perf_counter() - t0:.1f}"),
    ]))


def _info(args) -> None:
    from bitft.info import describe_checkpoint

    print(_table(describe_checkpoint(args.checkpoint)))


def _export(args) -> None:
    if args.packed:
        from bitft.export.packed import export_packed

        rows = export_packed(args.checkpoint, args.output, overwrite=args.overwrite, merge_lora=args.merge_lora)
    else:
        from bitft.export.gguf import export_gguf

        rows = export_gguf(args.checkpoint, args.output, qtype=args.type, float_type=args.float_type,
                           tokenizer_pre=args.tokenizer_pre, overwrite=args.overwrite, merge_lora=args.merge_lora)
    from bitft.card import card_path

    print(_table([("output", args.output), *rows, ("model card", str(card_path(args.output)))]))


def _plot_schedule(args) -> None:
    from bitft.schedule import LambdaSchedule, plot_schedules

    schedules = [LambdaSchedule("linear", args.warmup_steps)]
    schedules += [LambdaSchedule("sigmoid", args.warmup_steps, k=k) for k in args.k]
    plot_schedules(schedules, args.steps, args.output)
    print(f"wrote {args.output}")


def _eval(args) -> None:
    """`bitft eval`: WikiText-2 perplexity and/or zero-shot tasks; a table, or JSON with --json."""
    import json
    from pathlib import Path

    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # packed BitLinear is @torch.compile: a loss on CPU
    import torch

    from bitft.errors import BitftError
    from bitft.evaluate import load_for_eval, perplexity_from_nlls, ppl_text, split_windows, tasks_folder, window_nlls
    from bitft.tasks import TASKS, check_task_file, evaluate_task, parse_tasks, seed_row, seed_table

    if not args.ppl and not args.tasks:
        raise BitftError("nothing to evaluate: pass --ppl and/or --tasks (e.g. --tasks all)")
    for flag, value in (("--limit", args.limit), ("--windows", args.windows)):
        if value is not None and value < 1:
            raise BitftError(f"{flag} must be a positive number, not {value}")
    if args.seqlen < 2:
        raise BitftError(f"--seqlen must be at least 2, not {args.seqlen}")
    if args.lam is not None and not 0.0 <= args.lam <= 1.0:
        raise BitftError(f"--lambda must be in [0, 1], not {args.lam:g}")
    names = parse_tasks(args.tasks) if args.tasks else []
    tasks_dir, tasks_data = tasks_folder(args.tasks_dir) if names else (None, None)
    for name in names if tasks_dir is not None else []:  # every local file checked before a model is loaded
        check_task_file(name, tasks_dir)
    text = data = None
    if args.ppl:
        text, data = ppl_text(args.data)
    progress = not args.no_progress
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its loading bars; ours (windows, examples) stay on stderr

    t0 = time.perf_counter()
    backend, tokenizer, what = load_for_eval(args.model, args.backend, args.lam, getattr(torch, args.dtype))
    result = {"model": args.model, "backend": backend.name, "what": what,
              "load_seconds": round(time.perf_counter() - t0, 1)}
    rows = [("model", args.model), ("backend", f"{backend.name}: {what}")]
    if text is not None:
        t1 = time.perf_counter()
        ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
        n_tokens = ids.numel()
        try:
            windows = split_windows(ids, args.seqlen, args.windows or args.limit)
        except ValueError as e:
            raise BitftError(f"{data}: {e}: pass a smaller --seqlen or a longer text") from None
        if args.seqlen > backend.max_length:
            raise BitftError(f"--seqlen {args.seqlen} is longer than the model's context ({backend.max_length} tokens)")
        nlls = window_nlls(backend, windows, progress)
        ppl = perplexity_from_nlls(nlls, args.seqlen)
        result["perplexity"] = {
            "data": data, "seqlen": args.seqlen, "windows": len(nlls), "windows_available": n_tokens // args.seqlen,
            "text_tokens": n_tokens, "predicted_tokens": len(nlls) * (args.seqlen - 1),
            "mean_nll": sum(nlls) / (len(nlls) * (args.seqlen - 1)), "ppl": ppl,
            "seconds": round(time.perf_counter() - t1, 1)}
        rows.append(("perplexity", f"{ppl:.4f}  ({data}, {len(nlls)} of {n_tokens // args.seqlen} windows x "
                                   f"{args.seqlen} tokens, non-overlapping, no special tokens)"))
    if names:
        result["tasks"] = {}
        result["tasks_data"] = tasks_data
        for name in names:
            result["tasks"][name] = evaluate_task(backend, tokenizer, name, tasks_dir, args.limit, progress)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["summary"] = seed_row(result["perplexity"]["ppl"] if "perplexity" in result else None, result.get("tasks", {}))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(_table(rows))
    if names:
        print(f"\nzero-shot (lm-evaluation-harness task configs on {result['tasks_data']}, log-likelihood of each choice){'' if args.limit is None else f', first {args.limit} examples'}\n")
        print("| task | n | acc | acc_norm |")
        print("|---|---|---|---|")
        for name, r in result["tasks"].items():
            cell = lambda m: f"{r[m]:.4f} ± {r[m + '_stderr']:.4f}" if m in r else "-"  # noqa: E731
            print(f"| {TASKS[name].title} | {r['n']} | {cell('acc')} | {cell('acc_norm')} |")
    print(f"\nthe BitNet papers' table (acc, %; Avg over the tasks run):\n\n{seed_table({Path(args.model).name: result['summary']})}")
    print(f"\n{result['seconds']:.0f} s")


def _diagnose(args) -> None:
    """`bitft diagnose`: perplexity with each part of the model ternary, block errors; a table, a PNG, or JSON."""
    import json

    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch

    from bitft.diagnose import plot, run, table

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    say = None if args.json else (lambda line: print(line, flush=True))
    r = run(args.model, args.data, args.seqlen, args.windows or args.limit or 4, args.per_block, getattr(torch, args.dtype), say)
    if args.plot:
        r["plot"] = str(plot(r, args.plot, f"{args.model}: {r['data']}, {r['windows'][0]} x {r['seqlen']} tokens"))
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(f"\n{args.model} ({r['what']}, {r['parameters']:,} parameters); {r['data']}, {r['windows'][0]} windows x "
          f"{r['seqlen']} tokens\n\n{table(r)}\n\nworst kind of layer: {r['worst']}; {r['seconds']:.0f} s"
          + (f"; plot {r['plot']}" if args.plot else ""))


def _teacher_cache(args) -> None:
    from bitft.train.teacher_cache import cache_for_recipe

    m = cache_for_recipe(["--config", args.config, *args.recipe_flags], Path(args.output), top_k=args.top_k,
                         batch_size=args.batch_size, max_blocks=args.max_blocks, overwrite=args.overwrite)
    print(f"{args.output}: {m['blocks']:,} blocks ({m['tokens']:,} tokens), top {m['top_k']} at τ={m['temperature']:g}, "
          f"{m['bytes'] / 2**20:.1f} MiB ({m['bytes_per_token'] * 1e6 / 2**30:.2f} GiB per million tokens), {m['seconds']:.0f} s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitft", description="Turn Hugging Face causal LMs into BitNet b1.58 models.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="swap the decoder's linear layers for BitLinear and save a checkpoint")
    c.add_argument("source", help="hub id (org/name), local model folder, .gguf file, or smollm2")
    c.add_argument("--output", "-o", required=True, help="folder to write (must be new or empty unless --overwrite)")
    c.add_argument("--lambda", dest="lam", type=float, default=1.0,
                   help="blend in [0, 1]: 0 = the original model, 1 = ternary (default 1)")
    c.add_argument("--targets", nargs="+", help="convert only these linear layers: exact names or suffixes (q_proj)")
    c.add_argument("--target-regex", help="convert only linear layers whose full name matches this regex")
    c.add_argument("--exclude", nargs="+", help="keep these linear layers full precision: exact names or suffixes")
    c.add_argument("--exclude-regex", help="keep linear layers whose full name matches this regex full precision")
    c.add_argument("--subln", nargs="?", const="all", default=False, choices=["all", "bitnet"],
                   help="add RMSNorms before activation quantizers (SubLN): all (the default of the bare flag: before "
                        "every BitLinear) or bitnet (two per block, before o_proj and down_proj: a Llama becomes a "
                        "BitNet that llama.cpp's bitnet graph runs)")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype a GGUF source is dequantized to (a safetensors folder keeps its own; default float32)")
    c.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    c.set_defaults(func=_convert)

    e = sub.add_parser("export", help="write a λ=1 checkpoint as a packed 2-bit model or a llama.cpp GGUF file")
    e.add_argument("checkpoint", help="a folder written by `bitft convert` or a training run, at λ=1")
    fmt = e.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--packed", action="store_true", help="transformers' BitNet format (uint8, 4 weights a byte)")
    fmt.add_argument("--gguf", action="store_true", help="a GGUF file for llama.cpp (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma-3, BitNet with SiLU)")
    e.add_argument("--output", "-o", required=True, help="folder (--packed) or .gguf file (--gguf) to write")
    e.add_argument("--type", default="tq2_0", help="--gguf: tq2_0 (2.06 bits), tq1_0 (1.69 bits), i2_s (2 bits, bitnet.cpp only), "
                                                   "or the exact baselines q8_0, f16 (default tq2_0)")
    e.add_argument("--float-type", default="f16", choices=["f16", "f32"],
                   help="--gguf: type of embeddings and lm_head (default f16)")
    e.add_argument("--tokenizer-pre", default=None,
                   help="--gguf: override llama.cpp's pre-tokenizer name (default: detected from the tokenizer, "
                        "as llama.cpp's converter does; e.g. llama-bpe, qwen2, smollm)")
    e.add_argument("--merge-lora", action="store_true", help="merge LoRA adapters into the master weights first")
    e.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    e.set_defaults(func=_export)

    ps = sub.add_parser("plot-schedule", help="draw λ schedules (linear, sigmoid) as a PNG")
    ps.add_argument("--steps", type=int, default=1500)
    ps.add_argument("--warmup-steps", type=int, default=1000)
    ps.add_argument("--k", type=float, nargs="+", default=[5.0, 10.0, 20.0], help="sigmoid slopes")
    ps.add_argument("--output", "-o", default="lambda_schedules.png")
    ps.set_defaults(func=_plot_schedule)

    ev = sub.add_parser("eval", help="perplexity over non-overlapping windows, zero-shot tasks (lm-evaluation-harness)")
    ev.add_argument("model", help="model folder, hub id, bitft checkpoint, packed export, .gguf file, or smollm2")
    ev.add_argument("--ppl", action="store_true", help="perplexity of --data over non-overlapping --seqlen windows")
    ev.add_argument("--data", help="raw text file for --ppl, or shipped:NAME (default: WikiText-2 test from the hub; "
                                    "offline, the copy shipped with bitft)")
    ev.add_argument("--seqlen", type=int, default=2048, help="--ppl window length in tokens (default 2048)")
    ev.add_argument("--tasks", nargs="+", metavar="TASK",
                    help="zero-shot tasks: all, or any of arc_easy arc_challenge hellaswag piqa boolq openbookqa winogrande")
    ev.add_argument("--tasks-dir", help="folder of the tasks' jsonl files with the hub's fields (default: the harness's "
                                         "hub datasets; offline, the files shipped with bitft: shipped:eval)")
    ev.add_argument("--limit", type=int, help="only the first N windows (--ppl) and N examples of each task")
    ev.add_argument("--windows", type=int, help="only the first N windows for --ppl (overrides --limit there)")
    ev.add_argument("--lambda", dest="lam", type=float,
                    help="evaluate a bitft checkpoint at this λ instead of its saved one")
    ev.add_argument("--backend", choices=["auto", "transformers", "llama.cpp"], default="auto",
                    help="auto: llama.cpp for a .gguf when llama-cpp-python imports, else transformers")
    ev.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="transformers backend: dtype to load the model in (default float32)")
    ev.add_argument("--json", action="store_true", help="print the results as one JSON object")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars (on stderr)")
    ev.set_defaults(func=_eval)

    tc = sub.add_parser("teacher-cache", help="run the distillation teacher once over a warmup recipe's blocks: "
                                              "its top-k log-probabilities, for runs with `teacher_cache: DIR`")
    tc.add_argument("--config", required=True, help="the warmup recipe's YAML (model, data, τ, teacher)")
    tc.add_argument("--output", "-o", required=True, help="folder to write")
    tc.add_argument("--top-k", type=int, default=32, help="teacher tokens kept per position (default 32)")
    tc.add_argument("--batch-size", type=int, default=8, help="blocks per teacher forward (default 8)")
    tc.add_argument("--max-blocks", type=int, help="only the first N training blocks (default: all; a stream: max_steps' worth)")
    tc.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    tc.set_defaults(func=_teacher_cache)

    dg = sub.add_parser("diagnose", help="where a model breaks: perplexity with activations, weights, each kind of layer "
                                         "and each block ternary; each block's output error (table, PNG)")
    dg.add_argument("model", help="model folder, hub id, bitft checkpoint (diagnosed from its master weights), .gguf, or smollm2")
    dg.add_argument("--data", help="raw text file, or shipped:NAME (default: WikiText-2 test, as bitft eval --ppl)")
    dg.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default 2048)")
    dg.add_argument("--windows", type=int, help="windows per perplexity (default 4: every row is a pass over them)")
    dg.add_argument("--limit", type=int, help="the same as --windows (bitft eval's name)")
    dg.add_argument("--per-block", action="store_true", help="also one perplexity per decoder block ternary alone (slow: one pass each)")
    dg.add_argument("--plot", metavar="PNG", help="write the plot here")
    dg.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="dtype to load the model in")
    dg.add_argument("--json", action="store_true", help="print the results as one JSON object")
    dg.set_defaults(func=_diagnose)

    i = sub.add_parser("info", help="print what a checkpoint is, as a table")
    i.add_argument("checkpoint", help="checkpoint folder, .gguf file, or smollm2")
    i.set_defaults(func=_info)
    return p


def main(argv=None) -> int:
    from bitft.errors import run_main

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command != "teacher-cache" and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.recipe_flags = extra  # teacher-cache: the recipe's own --key value overrides
    if getattr(args, "targets", None) and getattr(args, "target_regex", None):
        parser.error("give --targets or --target-regex, not both")
    if getattr(args, "exclude", None) and getattr(args, "exclude_regex", None):
        parser.error("give --exclude or --exclude-regex, not both")
    return run_main(lambda _: args.func(args), "bitft")


if __name__ == "__main__":
    sys.exit(main())
