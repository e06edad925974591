"""The same prompt through bitft (λ=1), stock transformers on the packed export, and llama.cpp on the GGUF.

    python scripts/compare_exports.py CHECKPOINT --packed DIR --gguf FILE [--prompt TEXT] [--tokens 24]

Prints a markdown table: each runtime's greedy continuation, and how its logits over the prompt
compare with bitft's (largest difference, next-token agreement). Stock transformers runs in a
fresh process that never imports bitft (scripts/stock_logits.py).
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import bitft

HERE = Path(__file__).parent


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--packed", help="folder written by `bitft export --packed`")
    p.add_argument("--gguf", help="file written by `bitft export --gguf`")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--raw", action="store_true", help="the prompt as plain text, without the chat template")
    args = p.parse_args()

    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                   add_generation_prompt=True) if tok.chat_template and not args.raw else args.prompt
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    if bitft.get_lambda(model) != 1.0:
        raise SystemExit(f"{args.checkpoint} is at λ={bitft.get_lambda(model)}: exports are of the λ=1 model")
    with torch.no_grad():
        ref = model(ids).logits[0].numpy()
        greedy = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)[0, ids.shape[1]:].tolist()
    rows = [("bitft, λ=1 (PyTorch)", greedy, ref)]

    if args.packed:
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(ids, f"{tmp}/ids.pt")
            subprocess.run([sys.executable, HERE / "stock_logits.py", args.packed, f"{tmp}/ids.pt", f"{tmp}/out.pt",
                            str(args.tokens)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            out = torch.load(f"{tmp}/out.pt")
        rows.append(("stock transformers, packed", out["greedy"][0].tolist(), out["logits"][0].numpy()))

    if args.gguf:
        from bitft.llamacpp import open_gguf

        llm = open_gguf(args.gguf, n_ctx=512, logits_all=True, n_threads=2, verbose=False)
        prompt = ids[0].tolist()
        llm.eval(prompt)
        logits = np.array(llm.scores[: len(prompt)])
        llm.reset()
        gen = []
        for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
            gen.append(t)
            if len(gen) == args.tokens or t == tok.eos_token_id:
                break
        rows.append((f"llama.cpp, {Path(args.gguf).name}", gen, logits))

    print(f"\nprompt: {args.prompt!r} ({ids.shape[1]} tokens{'' if args.raw else ' with the chat template'}), greedy, {args.tokens} tokens\n")
    print("| runtime | greedy continuation | max abs logit diff vs bitft | next-token agreement |")
    print("|---|---|---|---|")
    for name, gen, logits in rows:
        diff = np.abs(logits - ref).max()
        agree = (logits.argmax(-1) == ref.argmax(-1)).mean()
        shown = tok.decode(gen, skip_special_tokens=True).replace("\n", " ").replace("|", "/")
        print(f"| {name} | {shown!r} | {diff:.3g} | {agree:.2f} |")


if __name__ == "__main__":
    main()
