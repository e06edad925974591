"""Perplexity over non-overlapping windows (the convention of GPTQ-style eval_ppl scripts).

The text is tokenized once, without special tokens; it is cut into ⌊N / seqlen⌋ windows of
exactly seqlen tokens (the tail is dropped); each window is scored on its own, so the first
token of a window has no context. PPL = exp(Σ NLL / (windows · (seqlen − 1))): every window
contributes its seqlen − 1 predicted tokens.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def token_windows(tokenizer, text: str, seqlen: int, limit: int | None = None) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if limit is not None:
        n = min(n, limit)
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, progress: bool = False) -> float:
    """exp(mean next-token NLL) of the model over the given [n, seqlen] windows."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for w in tqdm(windows, desc="perplexity", disable=not progress):
        w = w.unsqueeze(0).to(device)
        logits = model(w).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], w[0, 1:], reduction="sum")
        total += nll.item()
        count += w.shape[1] - 1
    return math.exp(total / count)
