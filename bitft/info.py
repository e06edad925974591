"""`bitft info`: what a checkpoint folder is, read from config.json and safetensors headers (no tensor loaded)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from bitft.errors import BitftError
from bitft.files import safetensors_header


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


LINEAR = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")


def describe_gguf(path: Path) -> list[tuple[str, str]]:
    """`bitft info` of a .gguf file: its metadata and tensor types (bitnet.cpp's I2_S included), no tensor loaded."""
    from bitft.export.gguf_i2s import i2s_rows, is_bitnet_cpp_file
    from bitft.gguf_header import read_header
    from bitft.sources import check_gguf

    meta = check_gguf(path)[0]  # one line if damaged
    tensors = read_header(path, with_shapes=True)[1]
    types: dict[str, int] = {}
    for _, kind, n, *_ in tensors:
        types[kind] = types.get(kind, 0) + n
    lin = [t for t in tensors if LINEAR.fullmatch(t[0])]
    bitnet_cpp = is_bitnet_cpp_file(meta, set(types))
    rows = [("path", str(path)),
            ("format", f"GGUF ({meta.get('general.architecture', '?')} graph, "
                       + ("bitnet.cpp (microsoft/BitNet) only)" if bitnet_cpp else "llama.cpp)")),
            ("parameters", f"{sum(types.values()):,} in {len(tensors)} tensors"),
            ("tensor types", ", ".join(f"{k} {v:,}" for k, v in sorted(types.items())))]
    if lin:
        lin_types = sorted({t[1] for t in lin})
        rows += [("linear layers", f"{len(lin)} tensors, " + ", ".join(lin_types)),
                 ("bits per linear weight", f"{8 * sum(t[3] for t in lin) / sum(t[2] for t in lin):.3f}")]
    return rows + i2s_rows(meta, lin) + [("bytes on disk", f"{path.stat().st_size:,} ({_human(path.stat().st_size)})")]


def describe_checkpoint(path: str | os.PathLike) -> list[tuple[str, str]]:
    """`bitft info`: (field, value) rows read from config.json and safetensors headers, no tensor loaded.
    A .gguf file (or `smollm2`) is described from its GGUF metadata."""
    from bitft.sources import SMOLLM2, embedded_smollm2
    from bitft.surgery import summarize_names

    if str(path) == SMOLLM2 and not Path(path).exists():
        path = embedded_smollm2()
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return describe_gguf(path)
    if not (path / "config.json").is_file():
        rows = leftover_rows(path) if path.is_dir() else []
        if rows:  # a folder of outputs: what interrupted writes left in it
            return [("path", str(path))] + rows
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
    from bitft.families import recognize

    family = recognize(config)
    meta = config.get("bitft")
    qc = config.get("quantization_config") or {}
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    rows = [
        ("path", str(path)),
        ("architecture", f"{(config.get('architectures') or ['?'])[0]} ({config.get('model_type')})"),
        ("family", f"{family.name}" + ("  (already ternary: bitft loads it as BitLinear at λ=1)" if family.ternary else "")),
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
    return rows + leftover_rows(path) + leftover_rows(path.parent, path.name)


def leftover_rows(folder: Path, target: str | None = None) -> list[tuple[str, str]]:
    """A row per temporary an interrupted export or conversion left in FOLDER (bitft.files.leftovers),
    only those of TARGET when given."""
    from bitft.files import leftovers

    return [("leftover", f"{t['path'].name}: {_human(t['bytes'])} of an unfinished write of {t['target']} by process "
                         f"{t['pid']}" + (f" on {t['host']}" if t["host"] else "") +
                         (" (gone: the next write of it removes this)" if t["stale"] else " (still running)"))
            for t in leftovers(folder) if target is None or t["target"] == target]
