"""Load a checkpoint with stock transformers only (no bitft import), save its logits for the given token ids and,
optionally, N greedy tokens. Run by scripts/compare_exports.py and the tests, always in a process of its own.

usage: stock_logits.py CHECKPOINT TOKENS.pt OUT.pt [N_NEW_TOKENS [NUM_HIDDEN_LAYERS]]
       stock_logits.py --serve      one JSON list of those arguments per stdin line, "ok" or "error ..." per
                                    stdout line: one process for many checkpoints (the tests: one per worker)
"""

import json
import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def run(ckpt, tokens, out, new=0, layers=None) -> None:
    truncate = {"num_hidden_layers": int(layers)} if layers else {}
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, **truncate).eval()
    assert "bitft" not in sys.modules, "bitft was imported"
    classes = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Linear")})
    ids = torch.load(tokens)
    with torch.no_grad():
        logits = model(ids).logits
        greedy = model.generate(ids, max_new_tokens=int(new), do_sample=False)[:, ids.shape[1]:] if int(new) else None
    torch.save({"logits": logits, "linear_classes": classes, "greedy": greedy}, out)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        for line in sys.stdin:
            try:
                run(*json.loads(line))
                print("ok", flush=True)
            except Exception as e:  # the caller fails its test with this line; the next request still runs
                print("error " + f"{type(e).__name__}: {e}".replace("\n", " "), flush=True)
    else:
        run(*sys.argv[1:6])
