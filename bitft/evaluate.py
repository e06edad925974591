"""Perplexity over non-overlapping windows (the convention of GPTQ-style eval_ppl scripts), and
the model backends that `bitft eval` scores with.

Perplexity: the text is tokenized once, without special tokens (no BOS); it is cut into
⌊N / seqlen⌋ windows of exactly seqlen tokens (the tail is dropped; --limit keeps the first ones);
each window is scored on its own, so the first token of a window has no context. PPL =
exp(Σ NLL / (windows · (seqlen − 1))): every window contributes its seqlen − 1 predicted tokens.
(GPTQ's eval_ppl averages the loss over all seqlen − 1 shifted positions of each window the same
way; it multiplies by seqlen instead of seqlen − 1 before the exp, which changes nothing for equal
windows.)

Backends: `TransformersBackend` runs any model that AutoModelForCausalLM loads (a full-precision
model, a bitft checkpoint at any λ, a packed export, a GGUF dequantized by transformers);
`LlamaCppBackend` runs a .gguf file through llama-cpp-python (logits for every position, token ids
fed directly). Both see the same token ids, from the model's transformers tokenizer.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bitft.errors import BitftError


# ----------------------------------------------------------------------------- which data: hub first, shipped offline
WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
SHIPPED_WIKITEXT = "eval/wikitext2_test.raw"
_OFF = {"1", "ON", "YES", "TRUE"}


def hub_unavailable() -> str | None:
    """Why the hub cannot be used (offline mode set, or its host unreachable), or None when it can."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").upper() in _OFF:
            return f"{var}={os.environ[var]}"
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as e:
        return f"{url.hostname} unreachable ({type(e).__name__})"
    return None


def _say(line: str) -> None:
    import sys

    print(f"bitft eval: {line}", file=sys.stderr, flush=True)


def ppl_text(data: str | None) -> tuple[str, str]:
    """(text, where it came from) for --ppl: DATA (a file or shipped:NAME) if given; else WikiText-2 test
    from the hub (`Salesforce/wikitext wikitext-2-raw-v1`, rows joined with no separator); offline, the copy shipped with bitft (the same
    rows without the hub's blank ones: the same text)."""
    from bitft.resources import PREFIX, resolve_path, shipped

    if data is None:
        why = hub_unavailable()
        if why is None:
            try:
                import datasets

                rows = datasets.load_dataset(WIKITEXT[0], WIKITEXT[1], split=WIKITEXT[2])["text"]
                return "".join(rows), f"hub {WIKITEXT[0]} {WIKITEXT[1]} {WIKITEXT[2]}"
            except Exception as e:  # the hub answered but the dataset did not come: say so, fall back
                why = f"{WIKITEXT[0]} could not be loaded ({type(e).__name__})"
        _say(f"hub not used ({why}): WikiText-2 test from the copy shipped with bitft")
        data = PREFIX + SHIPPED_WIKITEXT
        path = shipped(SHIPPED_WIKITEXT)
    else:
        path = Path(resolve_path(data))
    if not path.is_file():
        raise BitftError(f"{data} not found: pass --data with a raw text file (or leave it out for WikiText-2 test)")
    return path.read_text(encoding="utf-8", errors="replace"), data


def tasks_folder(tasks_dir: str | None) -> tuple[Path | None, str]:
    """(folder of local task files or None for the harness's hub datasets, where the data came from)."""
    from bitft.resources import PREFIX, resolve_path, shipped

    if tasks_dir is not None:
        return Path(resolve_path(tasks_dir)), tasks_dir
    why = hub_unavailable()
    if why is None:
        return None, "hub (the harness's own datasets)"
    _say(f"hub not used ({why}): task files shipped with bitft")
    return shipped("eval"), PREFIX + "eval"


def token_windows(tokenizer, text: str, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """[n, seqlen] token ids: the first LIMIT of the ⌊N / seqlen⌋ whole windows of TEXT."""
    return split_windows(tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0], seqlen, limit)


def split_windows(ids: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, not {seqlen}")
    ids = torch.as_tensor(ids)
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if limit is not None:
        n = min(n, limit)
    return ids[: n * seqlen].view(n, seqlen)


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Σ −log p(ids[t+1] | ids[:t+1]) over t, from [seqlen, vocab] logits of one window."""
    return torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum").item()


def window_nlls(backend, windows: torch.Tensor, progress: bool = False) -> list[float]:
    """Summed next-token NLL of each window (seqlen − 1 predictions each)."""
    out = []
    bar = tqdm(windows, desc="perplexity", disable=not progress)
    for i, w in enumerate(bar):
        out.append(backend.window_nll(w))
        bar.set_postfix(ppl=f"{math.exp(sum(out) / ((i + 1) * (windows.shape[1] - 1))):.3f}")
    return out


def _continuation_score(logprobs: torch.Tensor, cont: torch.Tensor) -> tuple[float, bool]:
    """(Σ log p of the continuation's tokens, whether each is the argmax) from its [n, vocab] log-probs."""
    return logprobs.gather(-1, cont[:, None]).sum().item(), bool((logprobs.argmax(-1) == cont).all())


def perplexity_from_nlls(nlls: list[float], seqlen: int) -> float:
    return math.exp(sum(nlls) / (len(nlls) * (seqlen - 1)))


@torch.no_grad()
def perplexity(model_or_backend, windows: torch.Tensor, progress: bool = False) -> float:
    """exp(mean next-token NLL) over the given [n, seqlen] windows: a model or a backend."""
    backend = model_or_backend if hasattr(model_or_backend, "window_nll") else TransformersBackend(model_or_backend)
    return perplexity_from_nlls(window_nlls(backend, windows, progress), windows.shape[1])


# ----------------------------------------------------------------------------- backends

class TransformersBackend:
    name = "transformers"

    def __init__(self, model, max_length: int | None = None):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", None) or 2048

    @torch.no_grad()
    def window_nll(self, window) -> float:
        ids = torch.as_tensor(window).to(self.device)
        return _nll_sum(self.model(ids.unsqueeze(0)).logits[0], ids)

    @torch.no_grad()
    def loglikelihoods(self, pairs) -> list[tuple[float, bool]]:
        """(Σ log p(continuation | context), whether greedy decoding gives the continuation) for each
        (context ids, continuation ids), one batch (right-padded) per call; inputs longer than
        max_length + 1 lose their left end."""
        seqs, conts = [], []
        for ctx, cont in pairs:
            full = (list(ctx) + list(cont))[-(self.max_length + 1):][:-1]
            seqs.append(full)
            conts.append(list(cont))
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        logits = self.model(ids.to(self.device), attention_mask=mask.to(self.device)).logits
        out = []
        for i, (s, cont) in enumerate(zip(seqs, conts)):
            lp = logits[i, len(s) - len(cont):len(s)].float().log_softmax(-1)
            out.append(_continuation_score(lp, torch.tensor(cont, device=lp.device)))
        return out


class LlamaCppBackend:
    """A GGUF file through llama-cpp-python: token ids in, logits of every position out."""

    name = "llama.cpp"

    def __init__(self, path, threads: int | None = None):
        from bitft.llamacpp import open_gguf

        self._open = open_gguf
        self.path = str(path)
        self.threads = threads or torch.get_num_threads()
        self.llm = None
        self.n_ctx = 0
        probe = open_gguf(self.path, vocab_only=True, verbose=False)
        arch = probe.metadata.get("general.architecture", "llama")
        self.max_length = int(probe.metadata.get(f"{arch}.context_length", 2048))
        del probe

    def _context(self, n: int):
        """A llama.cpp context holding at least N tokens (re-created, larger, when needed)."""
        if self.llm is None or n > self.n_ctx:
            self.llm = None
            size = 256
            while size < n:
                size *= 2
            self.llm = self._open(self.path, n_ctx=size, n_batch=min(size, 512), logits_all=True,
                                  n_threads=self.threads, n_threads_batch=self.threads, verbose=False)
            self.n_ctx = size
        return self.llm

    def _eval(self, ids: list[int]):
        """Evaluate IDS, reusing the longest prefix already in the KV cache; scores[t] = logits after ids[t]."""
        llm = self._context(len(ids))
        keep = 0
        limit = min(llm.n_tokens, len(ids) - 1)  # re-evaluate at least the last token
        while keep < limit and llm.input_ids[keep] == ids[keep]:
            keep += 1
        llm.n_tokens = keep
        llm.eval(ids[keep:])
        return llm.scores[: len(ids)]

    def window_nll(self, window) -> float:
        ids = [int(t) for t in window]
        if len(ids) > self.max_length:
            raise BitftError(f"seqlen {len(ids)} is longer than the model's context ({self.max_length} tokens)")
        logits = torch.from_numpy(self._eval(ids).copy())
        return _nll_sum(logits, torch.tensor(ids))

    def loglikelihoods(self, pairs) -> list[tuple[float, bool]]:
        out = []
        for ctx, cont in pairs:
            full = (list(ctx) + list(cont))[-(self.max_length + 1):][:-1]
            scores = self._eval(full)
            lp = torch.from_numpy(scores[len(full) - len(cont):len(full)].copy()).float().log_softmax(-1)
            out.append(_continuation_score(lp, torch.tensor(cont)))
        return out


# ----------------------------------------------------------------------------- loading

def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:
        return False
    return True


def load_for_eval(source: str, backend: str = "auto", lam: float | None = None, dtype=torch.float32):
    """(backend, tokenizer, description) for SOURCE (any reference bitft.sources takes): a .gguf runs
    through llama.cpp by default when it imports, everything else through transformers."""
    from transformers import AutoTokenizer

    from bitft.sources import load_model, resolve_source

    path = resolve_source(source)
    if path.is_file():
        from bitft.export.gguf_i2s import refuse_bitnet_cpp_only

        refuse_bitnet_cpp_only(path)  # I2_S, bitnet-b1.58
    if path.is_file() and lam is not None:
        raise BitftError(f"{source} is a GGUF file, a fixed model: --lambda applies to bitft checkpoints (folders)")
    if backend == "auto":
        backend = "llama.cpp" if path.is_file() and llama_cpp_available() else "transformers"
    if backend == "llama.cpp":
        if not path.is_file():
            raise BitftError(f"{source} is a model folder: --backend llama.cpp takes a .gguf file "
                             "(bitft export --gguf writes one)")
        if not llama_cpp_available():
            raise BitftError("--backend llama.cpp needs llama-cpp-python: pip install 'bitft[gguf]'")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as e:
            raise BitftError(f"transformers cannot read the tokenizer of {path} "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        try:
            return LlamaCppBackend(path), tokenizer, f"GGUF {path.name} through llama.cpp"
        except Exception as e:
            raise BitftError(f"llama.cpp cannot load {path} ({e})") from None
    try:
        loaded = load_model(str(path), dtype=dtype, lam=lam)
    except ValueError as e:  # set_lambda's own check of λ
        raise BitftError(f"--lambda {lam:g}: {e}") from None
    if loaded.tokenizer is None:
        raise BitftError(f"{source} has no tokenizer files: save the tokenizer beside the model")
    return TransformersBackend(loaded.model), loaded.tokenizer, loaded.what
