"""Run by tests in a fresh process: load a checkpoint with stock transformers only (no bitft import)
and save its logits for the given token ids.  usage: stock_logits.py CHECKPOINT TOKENS.pt OUT.pt"""

import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ckpt, tokens, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
assert "bitft" not in sys.modules, "bitft was imported"
layers = sorted({type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)})
with torch.no_grad():
    logits = model(torch.load(tokens)).logits
torch.save({"logits": logits, "linear_classes": layers}, out)
