"""Model cards: the README.md of every conversion, export (packed and GGUF) and recipe's final model.

A card states only what the files say (config.json and its `bitft` record, the tensors written, the
run's `NAME_results.json`, `NAME_config.yaml` and `trainer_state.json`, the source's README front
matter or GGUF metadata); a fact they do not hold is left out, never guessed:
- the Hub's YAML front matter (rendered by huggingface_hub's ModelCardData): `base_model` (the hub id
  the model descends from, when it is one), `library_name` (transformers; peft for adapters; gguf),
  `license` (when the source states one), `tags: [bitnet, 1.58-bit, bitft]`, `pipeline_tag`;
- what it is: format, bits per linear weight (counted in the tensors written), λ, architecture,
  the layers converted;
- where it came from, one line per stage, oldest first: the conversion (its source), each recipe run
  (recipe, config, steps, tokens trained, held-out figures before → after), the export. A card copies
  the lines of the card of the model it was made from, so the history outlives deleted folders;
- how to load it: stock transformers (packed), `import bitft` + AutoModelForCausalLM (a bitft
  checkpoint), peft (adapters), llama-cli / llama-cpp-python (GGUF).

Where: a folder gets README.md (replacing the source README that conversion copies, whose licence is
read first). A GGUF file NAME.gguf gets NAME.md beside it, not README.md: GGUF files share folders
(several types of one model, several models), where one README.md would be clobbered by the next
export; upload NAME.md as the repo's README.md. A NAME.md that is not a bitft card is never
replaced. A card is written to a temporary file beside it, then renamed into place.
"""

from __future__ import annotations

import json
import re
from math import prod
from pathlib import Path

from bitft.errors import BitftError
from bitft.files import write_text_atomic

TAGS = ["bitnet", "1.58-bit", "bitft"]
RECIPES = {"warmup": "recipes/warmup_10B.py", "sft": "recipes/sft.py", "dpo": "recipes/dpo.py"}
HISTORY = "## Where it came from"
HELD_OUT = {"dpo": ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")}  # (exp of a DPO loss is no perplexity)
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def card_path(target) -> Path:
    """README.md inside a folder; NAME.md beside a file NAME.gguf (or NAME.EXT, NAME)."""
    target = Path(target)
    return target.with_suffix(".md") if target.suffix == ".gguf" or target.is_file() else target / "README.md"


def read_card(target) -> tuple[dict, list[str]]:
    """(front matter, history lines) of TARGET's bitft card; ({}, []) when it has none."""
    from huggingface_hub import ModelCard

    try:
        card = ModelCard.load(card_path(target)) if card_path(target).is_file() else None
    except Exception:  # not a card the Hub could parse: not bitft's
        card = None
    meta = card.data.to_dict() if card else {}
    if "bitft" not in (meta.get("tags") or []):
        return {}, []
    section = card.text.split(HISTORY, 1)[1].split("\n## ", 1)[0] if HISTORY in card.text else ""
    return meta, [line for line in section.splitlines() if line.startswith("- ")]


def _front(meta: dict | None) -> dict:
    return {k: meta[k] for k in ("base_model", "license", "license_name", "license_link") if (meta or {}).get(k)}


def _readme(path) -> dict:
    """The YAML front matter of a README (the source's own), {} when it has none or it does not parse."""
    from huggingface_hub.repocard import metadata_load

    try:
        return (metadata_load(path) or {}) if path and Path(path).is_file() else {}
    except Exception:
        return {}


def _ref(ref: str, depth: int = 0) -> tuple[dict, list[str]]:
    """(base_model / license, history lines) of the model reference REF a stage started from."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from bitft.gguf_header import read_header
    from bitft.sources import SMOLLM2, embedded_smollm2

    p = embedded_smollm2() if ref == SMOLLM2 and not Path(ref).exists() else Path(ref).expanduser()
    if p.is_dir():
        meta, lines = read_card(p)
        if meta:
            return _front(meta), lines
        if _run(p) and depth < 8:  # a run's output without a card
            return _from_files(p, depth + 1)
        hub = re.search(r"models--([^/]+)--([^/]+)/snapshots/", str(p.resolve()))  # a hub download
        return _front({**_readme(p / "README.md"), "base_model": f"{hub[1]}/{hub[2]}" if hub else None}), []
    if p.is_file() and p.suffix == ".gguf":
        return _front({"license": read_header(p)[0].get("general.license")}), []
    if not HUB_ID.fullmatch(ref):
        return {}, []
    readme = try_to_load_from_cache(ref, "README.md")
    if not isinstance(readme, str):
        try:
            readme = hf_hub_download(ref, "README.md")
        except Exception:  # offline, gated, no README: no licence stated
            readme = None
    return _front({**_readme(readme), "base_model": ref}), []


def _run(folder: Path) -> dict | None:
    """The recipe run whose output FOLDER is (name, results, config values, trainer state); None if none."""
    import yaml

    name = next((n for n in RECIPES if (folder / f"{n}_results.json").is_file()), None)
    cfg, state = folder / f"{name}_config.yaml", folder / "trainer_state.json"
    return name and {"name": name, "results": json.loads((folder / f"{name}_results.json").read_text()),
                     "config": yaml.safe_load(cfg.read_text()) if cfg.is_file() else {},
                     "state": json.loads(state.read_text()) if state.is_file() else {}}


def _num(v) -> str:
    return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"


def _run_line(folder: Path, run: dict) -> str:
    r, state, cfg, given = run["results"], run["state"], run["config"], run["results"].get("config") or {}
    start = cfg.get("model_name_or_path")
    parts = [f"trained by `{RECIPES[run['name']]}`" + (f" from `{start}`" if start else "")]
    if cfg:
        parts.append(f"config `{folder.name}/{run['name']}_config.yaml`"
                     + (f" (from `{given['file']}`" if given.get("file") else " (") + ", flags "
                     + (", ".join(f"`--{f}`" for f in given.get("flags") or []) or "none") + ")")
    if "steps" in r:
        parts.append(f"{r['steps']:,} optimizer steps")
    logged = [h for h in state.get("log_history", []) if "num_tokens" in h]  # TRL's count, padding left out
    tokens = r.get("tokens") or (logged[-1]["num_tokens"] if logged else None) or state.get("num_input_tokens_seen")
    if tokens:
        late = logged and not r.get("tokens") and logged[-1].get("step") != r.get("steps")
        parts.append(f"{int(tokens):,} tokens trained" + (f" (by step {logged[-1]['step']}, its last log)" if late else ""))
    if r.get("distill"):
        parts.append(f"distilled from {r['distill']['teacher']} (α={r['distill']['alpha']:g})")
    figures = []
    for key in HELD_OUT.get(run["name"], ("eval_loss", "eval_perplexity")):
        before, after, merged = ((r.get(k) or {}).get(key) for k in ("before", "after", "after_merged"))
        if after is not None:
            figures.append(f"{key[5:]} {_num(before) + ' → ' if before is not None else ''}{_num(after)}")
        if merged is not None:
            figures.append(f"{key[5:]} after LoRA merge + re-ternarization {_num(merged)}")
    if figures:
        lam = (r.get("after") or {}).get("eval_lambda")
        parts.append(f"held-out{f' (λ={lam:g})' if lam is not None else ''}, before → after: " + ", ".join(figures))
    return "- " + "; ".join(parts)


def _from_files(folder: Path, depth: int = 0) -> tuple[dict, list[str]]:
    """(base_model / license, history lines) of a run's output FOLDER, from its run files."""
    run, adapter = _run(folder), folder / "adapter_config.json"
    start = (run or {}).get("config", {}).get("model_name_or_path")
    if start is None and adapter.is_file():
        start = json.loads(adapter.read_text()).get("base_model_name_or_path")
    meta, lines = _ref(start, depth) if start else ({}, [])
    return meta, lines + ([_run_line(folder, run)] if run else [])


def _facts(config: dict) -> list[tuple[str, str]]:
    from bitft.surgery import summarize_names

    meta = config["bitft"]
    rows = [("architecture", f"{(config.get('architectures') or ['?'])[0]} ({config.get('model_type')}), "
                             f"{config.get('num_hidden_layers')} layers × {config.get('hidden_size')} hidden"),
            ("λ", f"{meta['lambda']:g}" + (" (ternary)" if meta["lambda"] == 1 else " (a blend of full precision and ternary)")),
            ("ternary linear layers", f"{len(meta['modules'])}: {summarize_names(meta['modules'])}"),
            ("full precision", ", ".join(filter(None, [summarize_names(meta["modules_to_not_convert"]), "embeddings, norms"]))),
            ("activations", "int8, absmax per token")]
    return rows + [("SubLN", f"an RMSNorm before each ternary layer (eps {meta['rms_norm_eps']:g})")] * bool(meta["subln"])


def _packed_bits(folder: Path, modules: list[str]) -> str:
    """Bits per linear weight of a packed export: (uint8 codes + scales) / weights, from its safetensors headers."""
    from bitft.files import safetensors_header

    names = {f"{m}.{w}" for m in modules for w in ("weight", "weight_scale")}
    found = [v for s in folder.glob("*.safetensors") for k, v in safetensors_header(s).items() if k in names]
    stored = sum({"U8": 1, "F32": 4, "F16": 2, "BF16": 2}[v["dtype"]] * prod(v["shape"]) for v in found)
    n = sum(4 * prod(v["shape"]) for v in found if v["dtype"] == "U8")
    return f"{8 * stored / max(n, 1):.3f} ({n:,} ternary weights, 4 a byte, and one scale per layer)"


def _gguf_facts(path: Path, config: dict) -> tuple[list[tuple[str, str]], str]:
    """(facts, linear types) of an exported GGUF."""
    import gguf

    from bitft.export.gguf_i2s import i2s_rows, is_bitnet_cpp_file
    from bitft.gguf_header import read_header

    meta, tensors = read_header(path, with_shapes=True)
    arch = meta["general.architecture"]
    known = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch, gguf.MODEL_ARCH.BITNET)  # bitnet-b1.58: its names
    names = gguf.get_tensor_name_map(known, config["num_hidden_layers"])
    ternary = {names.get_name(f"{m}.weight", try_suffixes=(".weight",)) for m in config["bitft"]["modules"]}
    lin = [t for t in tensors if t[0] in ternary]
    types = ", ".join(sorted({t[1] for t in lin}))
    bits = 8 * sum(t[3] for t in lin) / max(sum(t[2] for t in lin), 1)
    runtime = "bitnet.cpp" if is_bitnet_cpp_file(meta, {t[1] for t in tensors}) else "llama.cpp"
    return [("format", f"GGUF for {runtime}'s `{arch}` graph; ternary linear layers as {types}"),
            ("bits per linear weight", f"{bits:.3f}")] + i2s_rows(meta, lin), types


def _runs_in_bitnet_cpp(path: Path) -> bool:
    from bitft.export.gguf_i2s import is_bitnet_cpp_file
    from bitft.gguf_header import read_header

    meta, tensors = read_header(path)
    return is_bitnet_cpp_file(meta, {t[1] for t in tensors})


def _bitnet_cpp_load(name: str) -> str:
    return ("With bitnet.cpp (microsoft/BitNet; mainline llama.cpp and llama-cpp-python do not run this file), from "
            "its folder after building it (`python setup_env.py ...` or cmake with its I2_S kernels):\n\n```sh\n"
            f"build/bin/llama-cli -m {name} -p \"Hello\" -n 32\npython run_inference.py -m {name} -p \"Hello\"\n"
            f"build/bin/llama-perplexity -m {name} -f text.txt\n```")


def _has_repacked_types(path: Path) -> bool:
    """Q4/Q8 tensors, which llama.cpp moves into its AMX or repacked buffers (bitft writes them only as --type q8_0)."""
    from bitft.gguf_header import read_header

    _, tensors = read_header(path)
    return any(t[1].startswith(("Q4", "Q5", "Q6", "Q8", "IQ4")) for t in tensors)


def _load(kind: str, name: str, target: Path) -> str:
    if kind == "gguf" and _runs_in_bitnet_cpp(target):
        return _bitnet_cpp_load(name)
    if kind == "gguf" and _has_repacked_types(target):  # --type q8_0: llama.cpp's AMX matmul crashes on it
        return (f"With llama.cpp (`--no-repack`: on CPUs with AMX, llama.cpp's AMX matmul of Q8_0 weights crashes, "
                f"ggml-org/llama.cpp#20824):\n\n```sh\nllama-cli -m {name} --no-repack -p \"Hello\"\n```\n\n"
                f"With llama-cpp-python, through bitft (the same setting):\n\n```python\nfrom bitft.llamacpp import open_gguf\n\n"
                f"llm = open_gguf(\"{name}\")\nprint(llm(\"Hello\", max_tokens=32))\n```")
    if kind == "gguf":
        return (f"With llama.cpp:\n\n```sh\nllama-cli -m {name} -p \"Hello\"\n```\n\nWith llama-cpp-python:\n\n```python\n"
                f"from llama_cpp import Llama\n\nllm = Llama(model_path=\"{name}\")\nprint(llm(\"Hello\", max_tokens=32))\n```")
    tok = (f"tokenizer = AutoTokenizer.from_pretrained(\"{name}\")\n" if (target / "tokenizer_config.json").is_file() else "")
    if kind == "packed":
        return ("Stock transformers (no bitft needed: its BitNet integration unpacks the weights):\n\n```python\n"
                f"from transformers import AutoModelForCausalLM{', AutoTokenizer' * bool(tok)}\n\n"
                f"model = AutoModelForCausalLM.from_pretrained(\"{name}\")  # this folder, or its hub id\n{tok}```")
    cls, lib = ("AutoPeftModelForCausalLM", "peft") if kind == "adapter" else ("AutoModelForCausalLM", "transformers")
    return ("With bitft installed (its quantizer rebuilds the BitLinear layers at the saved λ):\n\n```python\n"
            f"import bitft  # noqa: F401\nfrom {lib} import {cls}\n\nmodel = {cls}.from_pretrained(\"{name}\")\n```\n\n"
            f"Without bitft: `bitft export {name} --packed{' --merge-lora' * (kind == 'adapter')} -o {name}-packed` "
            "(stock transformers) or `--gguf` (llama.cpp).")


def write_card(target, checkpoint, *, name: str | None = None, source: str | None = None) -> Path:
    """Write the card of TARGET (a folder, or a .gguf file) made from CHECKPOINT (a bitft checkpoint or LoRA
    adapter folder; TARGET itself for a run's output). SOURCE: what `bitft convert` converted. NAME: the name
    TARGET will have (a temporary folder is renamed). Returns the card's path."""
    from huggingface_hub import ModelCard, ModelCardData

    target, ckpt = Path(target), Path(checkpoint)
    name, adapter = name or target.name, ckpt / "adapter_config.json"
    base = Path(json.loads(adapter.read_text())["base_model_name_or_path"]) if adapter.is_file() else ckpt
    config = json.loads((base / "config.json").read_text())
    meta, lines = _ref(source) if source is not None else _from_files(ckpt) if target == ckpt else _ref(str(ckpt))
    if target.is_file():  # a GGUF
        kind, (facts, types) = "gguf", _gguf_facts(target, config)
        lines = lines + [f"- exported by `bitft export --gguf` ({types}) from `{ckpt}`"]
    elif source is None and target != ckpt:
        kind = "packed"
        facts = [("format", "transformers' BitNet format (quant_method bitnet, linear_class bitlinear, offline): "
                            "uint8, 4 ternary weights a byte, and a scale per layer"),
                 ("bits per linear weight", _packed_bits(target, config["bitft"]["modules"]))]
        lines = lines + [f"- exported by `bitft export --packed` from `{ckpt}`"]
    else:
        kind = "adapter" if adapter.is_file() else "checkpoint"
        facts = [("format", "bitft checkpoint: full-precision master weights and the `bitft` record in config.json; "
                            "BitLinear ternarizes them (absmean: {-1, 0, 1} × one scale per layer) in the forward")]
        facts += [("LoRA adapters", f"on the bitft checkpoint `{base}`")] * (kind == "adapter")
        if source is not None:
            lines = lines + [f"- converted from `{source}` by `bitft convert` ({len(config['bitft']['modules'])} "
                             f"linear layers to BitLinear, λ={config['bitft']['lambda']:g})"]
    data = ModelCardData(**_front(meta), library_name={"gguf": "gguf", "adapter": "peft"}.get(kind, "transformers"),
                         tags=TAGS + ["gguf"] * (kind == "gguf"), pipeline_tag="text-generation")
    body = [f"# {name}", "", "A BitNet b1.58 model (ternary linear layers, int8 activations) made with bitft.", "",
            "## What it is", "", *[f"- **{k}**: {v}" for k, v in facts + _facts(config)], "", HISTORY, "",
            *(lines or ["- (no record of its source was found)"]), "", "## How to load it", "", _load(kind, name, target), ""]
    if kind == "gguf":
        check_card_free(target, written=True)
    return write_text_atomic(card_path(target), str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))))


def check_card_free(target, written: bool = False) -> None:
    """A GGUF's card is NAME.md beside it: refuse a NAME.md that bitft did not write (the export checks
    before writing anything; WRITTEN: TARGET is already in place)."""
    path = card_path(target)
    if path.is_file() and not read_card(target)[0]:
        raise BitftError(f"{path} exists and is not a bitft model card: " + (
            f"{target} is written, its card is not (move that file away and export again)" if written
            else "move that file away, or choose another --output"))
