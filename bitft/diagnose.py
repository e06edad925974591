"""Where a model breaks under BitNet b1.58 (`bitft diagnose MODEL`): fake quantization one part at a time.

Perplexity over `bitft eval --ppl`'s windows (bitft.evaluate: non-overlapping, no special tokens), the
decoder's linear layers (the ones `bitft convert` swaps) quantized one way at a time, with bitft's own
quantizers (bitft.quant) and BitLinear:

    original   λ = 0: the master weights in full precision
    W16A8      y = q_a(x) · Wᵀ        int8 per-token absmax activations only
    W1.58A16   y = x · q_w(W)ᵀ        ternary absmean weights only (one scale per tensor)
    W1.58A8    BitLinear at λ = 1     the format, exactly the deployed forward
    kind K     W1.58A8 on the layers named K (q_proj, k_proj, ..., down_proj) only, the rest full precision
    block k    W1.58A8 on decoder block k only (--per-block: one perplexity per block)

and, on the same windows, each block's relative output error with its own full-precision input h_k

    e_k = Σ_{t≥1} ‖B_k^q(h_k) − B_k(h_k)‖² / Σ_{t≥1} ‖B_k(h_k)‖²

(what one block loses alone; the block-wise reconstruction phase, bitft.train.blockwise, trains it down),
and the accumulated error of the all-ternary model against the original after each block,
E_k = Σ_{t≥1} ‖h_{k+1}^q − h_{k+1}‖² / Σ_{t≥1} ‖h_{k+1}‖². Position 0 is left out of both: the first
token carries massive activations (norms ~100× the others in SmolLM2) that would be the whole sum.

A model that does not fit the machine's memory is refused in one line before anything is loaded:
it needs its parameters in float32 twice (loading holds a second copy) plus 1 GiB of activations.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bitft.errors import BitftError

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- memory, before loading
def available_memory() -> int:
    """Bytes the kernel says a new allocation can take (MemAvailable), or the physical memory elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parameter_count(path: Path) -> int:
    """Parameters of the model at PATH (a .gguf file or a model folder) without loading a weight."""
    if path.is_file():
        from bitft.sources import check_gguf

        return sum(n for _, _, n, _ in check_gguf(path)[1])
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
        config.quantization_config = None  # the architecture's shapes, whatever the storage (packed, bitft)
        with torch.device("meta"):
            return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    except Exception as e:
        raise BitftError(f"cannot read the architecture of {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                         "bitft diagnose needs a causal LM folder or .gguf file") from None


def check_memory(source: str, dtype=torch.float32) -> int:
    """The parameter count of SOURCE, or a BitftError when it cannot be diagnosed in this machine's memory."""
    from bitft.sources import resolve_source

    n = parameter_count(resolve_source(source))
    size = torch.tensor([], dtype=dtype).element_size()
    need, have = 2 * n * size + 2**30, available_memory()
    if need > have:
        raise BitftError(f"{source} has {n / 1e9:.2f} B parameters: diagnosing it in {str(dtype).replace('torch.', '')} "
                         f"needs ~{need / 2**30:.1f} GiB of memory, this machine has {have / 2**30:.1f} GiB available; "
                         "run it on a larger machine")
    return n


# ----------------------------------------------------------------------------- quantization modes
def _partial(module, x, weights: bool, acts: bool):
    """A BitLinear with only its weights or only its activations quantized (bitft.quant), no gradient path needed."""
    from bitft.quant import quantize_activation, quantize_weight

    if module.rms_norm is not None:
        x = module.rms_norm(x)
    return F.linear(quantize_activation(x) if acts else x, quantize_weight(module.weight) if weights else module.weight,
                    module.bias)


@contextlib.contextmanager
def quantized(model, select=lambda name: True, weights: bool = True, acts: bool = True):
    """Within the block: the BitLinear layers whose names SELECT accepts quantize their weights and/or activations
    (both: λ = 1, BitLinear's own forward), the others run at λ = 0; λ and forwards are put back after."""
    from bitft.surgery import bit_linears

    layers = bit_linears(model)
    saved = {n: m.lam for n, m in layers.items()}
    try:
        for name, m in layers.items():
            on = select(name)
            m.lam = 1.0 if on and weights and acts else 0.0
            if on and weights != acts:
                m.forward = lambda x, m=m: _partial(m, x, weights, acts)
        yield model
    finally:
        for name, m in layers.items():
            m.lam = saved[name]
            m.__dict__.pop("forward", None)


def block_of(name: str) -> int | None:
    """Decoder block index of a module name ('model.layers.12.mlp.up_proj' -> 12)."""
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None


# ----------------------------------------------------------------------------- block errors
@torch.no_grad()
def block_errors(model, windows: torch.Tensor) -> tuple[list[float], list[float]]:
    """(e_k, E_k) of the module docstring, summed over WINDOWS ([n, seqlen]) with position 0 left out."""
    from bitft.train.feature_kd import decoder_layers

    layers = decoder_layers(model)
    n = len(layers)
    local_num, acc_num, den = [0.0] * n, [0.0] * n, [0.0] * n
    device = next(model.parameters()).device
    for w in windows:
        ids = w.to(device).unsqueeze(0)
        inputs, fp_out, q_out = {}, {}, {}

        def keep(store, k, with_input):
            def pre(mod, args, kwargs):
                if with_input:
                    inputs[k] = (args, kwargs)

            def post(mod, args, kwargs, out):
                store[k] = (out[0] if isinstance(out, tuple) else out).detach()
            return pre, post

        for store, with_input, mode in ((fp_out, True, {"weights": False, "acts": False, "select": lambda _: False}),
                                        (q_out, False, {})):
            hooks = []
            for k, layer in enumerate(layers):
                pre, post = keep(store, k, with_input)
                hooks += [layer.register_forward_pre_hook(pre, with_kwargs=True),
                          layer.register_forward_hook(post, with_kwargs=True)]
            try:
                with quantized(model, **mode):
                    model(ids, use_cache=False)  # a KV cache kept in the captured arguments would grow on a re-run
            finally:
                for h in hooks:
                    h.remove()
        for k, layer in enumerate(layers):
            target = fp_out[k][:, 1:].float()
            den[k] += target.pow(2).sum().item()
            acc_num[k] += (q_out[k][:, 1:].float() - target).pow(2).sum().item()
            args, kwargs = inputs[k]
            with quantized(model, lambda name, k=k: block_of(name) == k):
                out = layer(*args, **kwargs)
            local_num[k] += ((out[0] if isinstance(out, tuple) else out)[:, 1:].float() - target).pow(2).sum().item()
    return [a / d for a, d in zip(local_num, den)], [a / d for a, d in zip(acc_num, den)]


# ----------------------------------------------------------------------------- the diagnosis
def diagnose(model, windows: torch.Tensor, per_block: bool = False, progress=None) -> dict:
    """The perplexities and block errors of the module docstring for a converted MODEL (BitLinear layers)."""
    from bitft.evaluate import perplexity
    from bitft.surgery import bit_linears

    say = progress or (lambda line: None)
    names = list(bit_linears(model))
    if not names:
        raise BitftError("the model has no BitLinear layers to quantize: load it through bitft.sources with convert={}")
    rows: dict[str, float] = {}

    def ppl(label, **mode):
        t0 = time.perf_counter()
        with quantized(model, **mode):
            rows[label] = perplexity(model, windows)
        say(f"{label:<12} {rows[label]:>14,.2f}   ({time.perf_counter() - t0:.0f} s)")

    ppl("original", select=lambda _: False)
    ppl("W16A8", weights=False)
    ppl("W1.58A16", acts=False)
    ppl("W1.58A8")
    kinds = [k for k in KINDS if any(n.endswith("." + k) for n in names)]
    kinds += sorted({n.rsplit(".", 1)[-1] for n in names} - set(kinds))  # other families' names (fc1, ...)
    for kind in kinds:
        ppl(kind, select=lambda name, kind=kind: name.endswith("." + kind))
    blocks = sorted({b for b in map(block_of, names) if b is not None})
    if per_block:
        for b in blocks:
            ppl(f"block {b}", select=lambda name, b=b: block_of(name) == b)
    local, accumulated = block_errors(model, windows)
    return {"perplexity": rows, "kinds": kinds, "blocks": blocks, "block_error": local,
            "accumulated_error": accumulated, "windows": list(windows.shape)}


def table(result: dict) -> str:
    """The diagnosis as a terminal table."""
    p = result["perplexity"]
    base = p["original"]
    lines = [f"{'model':<14} {'perplexity':>14} {'× original':>11}"]
    lines += [f"{k:<14} {v:>14,.2f} {v / base:>11.3g}" for k, v in p.items() if not k.startswith("block ")]
    lines += ["", f"{'block':<6} {'e_k (alone)':>12} {'E_k (all ternary)':>18}" + (f" {'ppl, block k only':>18}" if any(
        k.startswith("block ") for k in p) else "")]
    for i, (e, acc) in enumerate(zip(result["block_error"], result["accumulated_error"])):
        ppl = p.get(f"block {i}")
        lines.append(f"{i:<6} {e:>12.4f} {acc:>18.4f}" + (f" {ppl:>18,.2f}" if ppl is not None else ""))
    return "\n".join(lines)


def plot(result: dict, path: str | Path, title: str = "") -> Path:
    """A PNG: perplexity per mode and layer kind (log scale), and the per-block errors (and perplexities)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = result["perplexity"]
    head = [k for k in p if not k.startswith("block ")]
    per_block = [p[f"block {b}"] for b in result["blocks"] if f"block {b}" in p]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    ax.bar(range(len(head)), [p[k] for k in head], color=["#4c72b0"] * 4 + ["#dd8452"] * (len(head) - 4))
    ax.set_xticks(range(len(head)), head, rotation=45, ha="right")
    ax.set_yscale("log")
    ax.axhline(p["original"], color="k", lw=0.8, ls="--")
    ax.set_ylabel("perplexity (log)")
    ax.set_title("all layers one way; one kind of layer W1.58A8")
    ax = axes[1]
    x = list(range(len(result["block_error"])))
    ax.plot(x, result["block_error"], "o-", label="e_k: block k alone, full-precision input")
    ax.plot(x, result["accumulated_error"], "s-", label="E_k: all blocks ternary, after block k")
    ax.set_yscale("log")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("relative squared error (positions ≥ 1)")
    if per_block:
        ax2 = ax.twinx()
        ax2.plot(x[:len(per_block)], per_block, "^:", color="#c44e52", label="perplexity, block k only W1.58A8")
        ax2.set_ylabel("perplexity, block k only ternary", color="#c44e52")
        ax2.set_yscale("log")
        ax2.legend(loc="lower right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("per decoder block")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(source: str, data: str | None = None, seqlen: int = 2048, windows: int | None = 4, per_block: bool = False,
        dtype=torch.float32, progress=None) -> dict:
    """Check memory, load SOURCE at λ = 0 (converted on the fly unless it is a bitft checkpoint), diagnose it."""
    from bitft.evaluate import ppl_text, token_windows
    from bitft.sources import load_model

    if seqlen < 2:
        raise BitftError(f"--seqlen must be at least 2, not {seqlen}")
    if windows is not None and windows < 1:
        raise BitftError(f"--windows must be a positive number, not {windows}")
    n = check_memory(source, dtype)
    text, where = ppl_text(data)
    t0 = time.perf_counter()
    loaded = load_model(source, dtype=dtype, lam=0.0, convert={})
    if loaded.tokenizer is None:
        raise BitftError(f"{source} has no tokenizer files: save the tokenizer beside the model")
    model = loaded.model.eval()
    context = getattr(model.config, "max_position_embeddings", None) or seqlen
    if seqlen > context:
        raise BitftError(f"--seqlen {seqlen} is longer than the model's context ({context} tokens)")
    try:
        ids = token_windows(loaded.tokenizer, text, seqlen, windows)
    except ValueError as e:
        raise BitftError(f"{where}: {e}: pass a smaller --seqlen or a longer text") from None
    result = diagnose(model, ids, per_block, progress)
    result.update(model=source, what=loaded.what, parameters=n, data=where, seqlen=seqlen,
                  seconds=round(time.perf_counter() - t0, 1))
    result["ppl_ratio"] = {k: v / result["perplexity"]["original"] for k, v in result["perplexity"].items()}
    result["worst"] = max(result["kinds"], key=lambda k: result["perplexity"][k])
    return result
