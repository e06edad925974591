"""Run by tests and scripts/compare_exports.py in a fresh process: load a checkpoint with stock transformers only (no bitft import),
save its logits for the given token ids and, optionally, N greedy tokens.
usage: stock_logits.py CHECKPOINT TOKENS.pt OUT.pt [N_NEW_TOKENS [NUM_HIDDEN_LAYERS]]"""

import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ckpt, tokens, out = sys.argv[1:4]
new = int(sys.argv[4]) if len(sys.argv) > 4 else 0
truncate = {"num_hidden_layers": int(sys.argv[5])} if len(sys.argv) > 5 else {}
model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, **truncate).eval()
assert "bitft" not in sys.modules, "bitft was imported"
layers = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Linear")})
ids = torch.load(tokens)
with torch.no_grad():
    logits = model(ids).logits
    greedy = model.generate(ids, max_new_tokens=new, do_sample=False)[:, ids.shape[1]:] if new else None
torch.save({"logits": logits, "linear_classes": layers, "greedy": greedy}, out)
