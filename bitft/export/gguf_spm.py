"""SentencePiece vocabularies for GGUF (Llama-2, Mistral-7B, Gemma-2/3, Phi-3, Unigram models).

llama.cpp has two SentencePiece tokenizers, chosen by `tokenizer.ggml.model`:
    llama  (SPM)  merges adjacent symbols into the vocabulary piece of highest *score*, falls back to <0xNN>
                  byte pieces: SentencePiece-BPE, whose scores order the merges (Llama-2, Mistral-7B, Gemma)
    t5     (UGM)  Viterbi over piece log-probabilities, with SentencePiece's normalizer (precompiled charsmap,
                  dummy prefix, extra-whitespace removal): SentencePiece-Unigram, exactly; no byte fallback
The pieces, scores and types come from `tokenizer.model` (the SentencePiece protobuf; its piece types are
GGUF's token types, 1:1) when the folder has one, else from `tokenizer.json` (Unigram: its scores; BPE with
byte fallback: score = -rank of the first merge that builds the piece, which is how llama.cpp's greedy
highest-score merge reproduces the rank order). Added tokens are CONTROL (special) or USER_DEFINED, as
transformers says. Whether a space is prepended comes from the files; whether BOS/EOS are added, from
transformers itself (tokenize with and without special tokens).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from bitft.errors import BitftError

BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def is_sentencepiece(tokenizer_json: dict) -> bool:
    """A tokenizer.json of the SentencePiece kind: Unigram, or BPE over "▁"-escaped text (not byte-level)."""
    model = tokenizer_json["model"]
    rest = json.dumps([tokenizer_json.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")])
    if model["type"] == "Unigram":
        return True
    return model["type"] == "BPE" and "ByteLevel" not in rest and ("\u2581" in rest or bool(model.get("byte_fallback")))


def _proto(path: Path):
    """The SentencePiece ModelProto in PATH, or None when PATH is not one (e.g. a tiktoken file)."""
    try:
        from google.protobuf.message import DecodeError
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise BitftError(f"{path} needs the sentencepiece package to be read: pip install sentencepiece") from None
    m = sentencepiece_model_pb2.ModelProto()
    try:
        m.ParseFromString(path.read_bytes())
    except DecodeError:
        return None
    return m if len(m.pieces) else None


def _from_proto(path: Path, m):
    """(kind, pieces, scores, types, flags) of a SentencePiece model file (parsed: M)."""
    kind = {1: "unigram", 2: "bpe"}.get(m.trainer_spec.model_type)
    if kind is None:
        raise BitftError(f"{path} is a SentencePiece {m.trainer_spec.ModelType.Name(m.trainer_spec.model_type)} model; "
                         "llama.cpp reads Unigram and BPE ones only: export it --packed instead")
    ns = m.normalizer_spec
    if m.trainer_spec.treat_whitespace_as_suffix or not ns.escape_whitespaces:
        raise BitftError(f"{path} puts whitespace after pieces or leaves it unescaped, which llama.cpp's "
                         "SentencePiece tokenizers do not do: export it --packed instead")
    flags = {"add_space_prefix": ns.add_dummy_prefix, "remove_extra_whitespaces": ns.remove_extra_whitespaces,
             "precompiled_charsmap": bytes(ns.precompiled_charsmap), "byte_fallback": m.trainer_spec.byte_fallback}
    return (kind, [p.piece for p in m.pieces], [p.score for p in m.pieces], [int(p.type) for p in m.pieces], flags)


def _find(node, type_name: str) -> list[dict]:
    """Every component of TYPE_NAME in a tokenizer.json normalizer / pre-tokenizer (Sequences opened)."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [c for n in node.get("normalizers", node.get("pretokenizers", [])) for c in _find(n, type_name)]
    return [node] if node.get("type") == type_name else []


def _from_json(tj: dict):
    """(kind, pieces, scores, types, flags) of a SentencePiece-kind tokenizer.json."""
    import gguf

    model, norm, pre = tj["model"], tj.get("normalizer"), tj.get("pre_tokenizer")
    T = gguf.TokenType
    if model["type"] == "Unigram":
        kind = "unigram"
        pieces = [p for p, _ in model["vocab"]]
        scores = [float(s) for _, s in model["vocab"]]
        types = [T.NORMAL] * len(pieces)
        if model.get("unk_id") is not None:
            types[model["unk_id"]] = T.UNKNOWN
    else:
        kind = "bpe"
        by_id = {i: p for p, i in model["vocab"].items()}
        pieces = [by_id.get(i, f"[PAD{i}]") for i in range(max(by_id) + 1)]
        first_rank: dict[str, int] = {}
        for r, pair in enumerate(model["merges"]):
            a, b = pair.split(" ", 1) if isinstance(pair, str) else pair
            first_rank.setdefault(a + b, r)
        floor = -float(len(model["merges"]) + 1)  # pieces no merge builds (characters, bytes): below every merge
        scores = [-float(first_rank[p]) if p in first_rank else floor for p in pieces]
        types = [T.UNUSED if i not in by_id else T.NORMAL for i in range(len(pieces))]
        if model.get("unk_token") in model["vocab"]:
            types[model["vocab"][model["unk_token"]]] = T.UNKNOWN
    if model.get("byte_fallback"):
        types = [T.BYTE if BYTE_PIECE.fullmatch(p) else t for p, t in zip(pieces, types)]
    # SentencePiece's user-defined pieces, which transformers isolates with a Split pre-tokenizer
    for split in _find(pre, "Split"):
        if split.get("behavior") == "Isolated" and "Regex" in split.get("pattern", {}):
            user = re.compile(split["pattern"]["Regex"])
            types = [T.USER_DEFINED if t == T.NORMAL and user.fullmatch(p) else t for p, t in zip(pieces, types)]
    charsmap = [n["precompiled_charsmap"] for n in _find(norm, "Precompiled")]
    prefix = bool(_find(norm, "Prepend")) or any(m.get("prepend_scheme", "always") != "never" for m in _find(pre, "Metaspace"))
    squeeze = any(" {2,}" in json.dumps(n.get("pattern")) for n in _find(norm, "Replace"))
    flags = {"add_space_prefix": prefix, "remove_extra_whitespaces": squeeze,
             "precompiled_charsmap": base64.b64decode(charsmap[0]) if charsmap and charsmap[0] else b"",
             "byte_fallback": bool(model.get("byte_fallback"))}
    return kind, pieces, scores, [int(t) for t in types], flags


def spm_vocab(folder: Path, n_vocab: int):
    """(tokenizer.ggml.model, tokens, scores, types, flags, tokenizer) of FOLDER's SentencePiece tokenizer."""
    import gguf
    from transformers import AutoTokenizer

    proto = _proto(folder / "tokenizer.model") if (folder / "tokenizer.model").is_file() else None
    if proto is not None:
        kind, pieces, scores, types, flags = _from_proto(folder / "tokenizer.model", proto)
    elif (folder / "tokenizer.json").is_file():
        kind, pieces, scores, types, flags = _from_json(json.loads((folder / "tokenizer.json").read_text()))
    else:
        raise BitftError(f"{folder}/tokenizer.model is not a SentencePiece model and there is no tokenizer.json: "
                         "a GGUF file must carry the tokenizer")
    if kind == "unigram" and flags["byte_fallback"]:
        raise BitftError("the tokenizer is a SentencePiece Unigram with byte fallback, which llama.cpp's Unigram "
                         "tokenizer lacks (characters out of the vocabulary would become <unk>): export it --packed instead")
    tok = AutoTokenizer.from_pretrained(folder)
    if len(pieces) > n_vocab:
        raise BitftError(f"the tokenizer has {len(pieces)} pieces but the model only {n_vocab} embeddings: "
                         "resize the embeddings, or export it --packed")
    T = gguf.TokenType
    pad = range(len(pieces), n_vocab)  # embeddings past the vocabulary: UNUSED, as llama.cpp's converter writes them
    tokens, scores, types = pieces + [f"[PAD{i}]" for i in pad], scores + [-1000.0] * len(pad), types + [int(T.UNUSED)] * len(pad)
    for i, added in tok.added_tokens_decoder.items():
        if i >= n_vocab:
            raise BitftError(f"added token {added.content!r} has id {i}, past the model's {n_vocab} embeddings: "
                             "resize the embeddings, or export it --packed")
        if types[i] in (T.UNKNOWN, T.BYTE) and tokens[i] == added.content:
            continue  # <unk> and byte pieces keep their type
        # llama.cpp matches user-defined tokens in the raw text, before spaces become "▁"
        tokens[i] = added.content if added.special else added.content.replace("\u2581", " ")
        types[i] = int(T.CONTROL if added.special else T.USER_DEFINED)
    return ("t5" if kind == "unigram" else "llama"), tokens, scores, types, flags, tok


def special_policy(tok) -> dict[str, bool]:
    """Whether transformers adds BOS / EOS to a plain encode: what llama.cpp's add_bos/add_eos must say."""
    plain = tok("a b", add_special_tokens=False).input_ids
    full = tok("a b").input_ids
    bos = tok.bos_token_id is not None and len(full) > len(plain) and full[0] == tok.bos_token_id
    eos = tok.eos_token_id is not None and len(full) > len(plain) + bos and full[-1] == tok.eos_token_id
    return {"bos": bool(bos), "eos": bool(eos)}
