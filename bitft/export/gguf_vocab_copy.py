"""A model converted from a GGUF remembers that GGUF's tokenizer, and its GGUF export writes it back verbatim.

`bitft convert x.gguf` loads the tokenizer through transformers, which rebuilds it (tokenizer.json) and
may not round-trip every llama.cpp detail (scores, token types, add_space_prefix, the pre-tokenizer
name, a Unigram charsmap). So convert also writes every `tokenizer.ggml.*` key of x.gguf, with its GGUF
type, to `gguf_tokenizer.json` beside the weights (`save_source_tokenizer`). It is a side file: the
export, `copy_side_files` and training runs carry it along. `bitft export --gguf` writes those keys back
unchanged (`copied_fields`, then `write_raw`), padding the token arrays with UNUSED `[PADn]` entries only if
the model has more embeddings than the GGUF had tokens, after checking that the folder's tokenizer still has
the same tokens at the same ids (remove the file to export the folder's own tokenizer instead).

One direction: bitft/export/gguf_vocab.py (the export's vocabulary) imports this module and wraps the copied
fields in its GGUFVocab; this module imports nothing of the export.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

from bitft.errors import BitftError

SIDE_FILE = "gguf_tokenizer.json"
PREFIX = "tokenizer.ggml."


def save_source_tokenizer(source, folder: Path) -> None:
    """Write the tokenizer.ggml.* keys (values and GGUF types) of SOURCE (a .gguf path, or a GGUFReader of one:
    parsing a 262k-token vocabulary takes the gguf package a minute) to FOLDER/gguf_tokenizer.json."""
    import gguf

    V = gguf.GGUFValueType
    reader = source if isinstance(source, gguf.GGUFReader) else gguf.GGUFReader(source)
    fields = {}
    for key, f in reader.fields.items():
        if not key.startswith(PREFIX):
            continue
        entry = {"type": f.types[0].name}
        if f.types[0] == V.ARRAY:
            entry["element"] = f.types[1].name
            if f.types[1] in (V.UINT8, V.INT8):  # the Unigram charsmap: bytes
                entry["base64"] = base64.b64encode(bytes(int(v) & 0xFF for v in f.contents())).decode()
            else:
                entry["value"] = f.contents()
        else:
            entry["value"] = f.contents()
        fields[key] = entry
    if fields:
        doc = {"source": Path(str(getattr(reader.data, "filename", source))).name, "fields": fields}
        (Path(folder) / SIDE_FILE).write_text(json.dumps(doc, ensure_ascii=False))


def carry_source_tokenizer(model, output_dir) -> None:
    """Copy gguf_tokenizer.json from the folder MODEL was loaded from into OUTPUT_DIR (a training run's final
    save: the trainer writes weights and tokenizer, not side files). Nothing when the source has none."""
    base = getattr(model, "get_base_model", lambda: model)()
    src = Path(getattr(base.config, "_name_or_path", "") or "") / SIDE_FILE
    dst = Path(output_dir) / SIDE_FILE
    if src.is_file() and not dst.exists():
        shutil.copyfile(src, dst)


def _value(entry: dict):
    if "base64" in entry:
        return base64.b64decode(entry["base64"])
    return entry["value"]


def write_raw(writer, raw: dict) -> None:
    """Add the copied keys to WRITER with their original GGUF types."""
    import gguf

    V = gguf.GGUFValueType
    for key, entry in raw.items():
        sub = V[entry["element"]] if "element" in entry else None
        writer.add_key_value(key, _value(entry), V[entry["type"]], sub_type=sub)


def copied_fields(folder: Path, n_vocab: int) -> dict | None:
    """The tokenizer.ggml.* fields of FOLDER/gguf_tokenizer.json (key -> GGUF type and value), checked against
    the folder's tokenizer and padded to N_VOCAB tokens; None when the folder has none."""
    path = Path(folder) / SIDE_FILE
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())["fields"]
    tokens = raw[PREFIX + "tokens"]["value"]
    if len(tokens) > n_vocab:
        raise BitftError(f"{SIDE_FILE} (the source GGUF's tokenizer) has {len(tokens)} tokens but the model "
                         f"{n_vocab} embeddings: remove {path} to export the folder's own tokenizer")
    _check_same_tokens(folder, tokens, path)
    if len(tokens) < n_vocab:  # embeddings padded past the vocabulary (e.g. resized to a multiple of 64)
        pad = range(len(tokens), n_vocab)
        raw = dict(raw)
        for key, filler in (("tokens", [f"[PAD{i}]" for i in pad]), ("scores", [-1000.0] * len(pad)),
                            ("token_type", [5] * len(pad))):  # 5: UNUSED
            if PREFIX + key in raw:
                raw[PREFIX + key] = {**raw[PREFIX + key], "value": raw[PREFIX + key]["value"] + filler}
    return raw


def _check_same_tokens(folder: Path, tokens: list[str], path: Path) -> None:
    """Refuse when the folder's tokenizer (tokenizer.json) maps some id to another token than the GGUF did."""
    tj = Path(folder) / "tokenizer.json"
    if not tj.is_file():
        return
    doc = json.loads(tj.read_text())
    vocab = doc["model"]["vocab"]
    pairs = [(p, i) for i, (p, _) in enumerate(vocab)] if isinstance(vocab, list) else list(vocab.items())
    pairs += [(a["content"], a["id"]) for a in doc.get("added_tokens", [])]
    for piece, i in pairs:
        if i >= len(tokens):
            raise BitftError(f"the folder's tokenizer has {piece!r} at id {i}, past the source GGUF's {len(tokens)} tokens: "
                             f"remove {path} to export the folder's own tokenizer")
        if tokens[i] != piece and tokens[i] != piece.replace("\u2581", " "):
            raise BitftError(f"the folder's tokenizer has {piece!r} at id {i} where the source GGUF had {tokens[i]!r}: "
                             f"remove {path} to export the folder's own tokenizer")
