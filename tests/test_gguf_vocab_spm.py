"""SentencePiece vocabularies in `bitft export --gguf`, checked by llama.cpp's own tokenizer.

Two SentencePiece models are trained here on WikiText-2 (BPE with byte fallback, like Llama-2 / Gemma;
Unigram, like T5-style models), and llama.cpp's vocabulary test files stand in for real ones
(`make setup` unpacks them into .cache/llama-vocab: ggml-vocab-llama-spm, -phi-3, -gemma-4, each with
the tokenizations llama.cpp expects). Each vocabulary is written to a vocab-only GGUF by the export's own
code and tokenized by llama.cpp, against transformers (and against llama.cpp's expected ids).
"""

import difflib
import json
import shutil
from pathlib import Path

import pytest
from helpers import REPO, family_tokenizer
from transformers import AutoTokenizer

from bitft.errors import BitftError
from bitft.export.gguf_vocab import gguf_vocab
from bitft.export.gguf_vocab_copy import SIDE_FILE, save_source_tokenizer
from bitft.gguf_header import kv_bytes

gguf = pytest.importorskip("gguf")
spm = pytest.importorskip("sentencepiece")

WIKI = (REPO / "bitft/resources/eval/wikitext2_test.raw").read_text()[:20000]
# digits, accents, runs of spaces, tabs, newlines, an emoji (out of the trained vocabularies: bytes or <unk>)
TEXT = "Price: 12345 € — café naïve Ünïcödé   three spaces\there\t\ttabs\n\nnew  lines 🦙 end 3.14"
VOCABS = Path(REPO / ".cache" / "llama-vocab")


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
    """Two SentencePiece models trained on WikiText-2: {kind: path of the .model}."""
    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text((REPO / "bitft/resources/eval/wikitext2_test.raw").read_text()[:300000])
    out = {}
    for kind in ("bpe", "unigram"):
        spm.SentencePieceTrainer.train(
            input=str(d / "corpus.txt"), model_prefix=str(d / kind), vocab_size=1200, model_type=kind,
            byte_fallback=kind == "bpe", split_digits=True, allow_whitespace_only_pieces=True,
            normalization_rule_name="identity" if kind == "bpe" else "nmt_nfkc", remove_extra_whitespaces=kind != "bpe",
            user_defined_symbols=["<|user|>"], control_symbols=["<|end|>"], minloglevel=2)
        out[kind] = d / f"{kind}.model"
    return out


def spm_folder(model: Path, folder: Path, source: str, tokenizer_class: str | None = None) -> Path:
    """A tokenizer folder from a SentencePiece model: `model` keeps tokenizer.model, `json` has only what
    transformers saves (tokenizer.json, as in a trained checkpoint)."""
    folder.mkdir(parents=True)
    shutil.copy(model, folder / "tokenizer.model")
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if tokenizer_class:
        cfg["tokenizer_class"] = tokenizer_class
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.save_pretrained(folder)
    if source == "json":
        (folder / "tokenizer.model").unlink()
    return folder


def vocab_gguf(folder: Path, out: Path, n_vocab: int | None = None):
    """The export's tokenizer of FOLDER, alone in a GGUF file (llama.cpp loads it vocab_only)."""
    n = n_vocab or len(AutoTokenizer.from_pretrained(folder))
    vocab = gguf_vocab(folder, n, None)
    writer = gguf.GGUFWriter(out, "llama")
    vocab.write(writer, folder)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return vocab


def llama_vocab(path: Path):
    pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")
    from bitft.llamacpp import open_gguf

    return open_gguf(path, vocab_only=True, verbose=False)


def agreement(a: list[int], b: list[int]) -> float:
    """Share of tokens in the longest common alignment of two tokenizations."""
    same = sum(m.size for m in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks())
    return same / max(len(a), len(b), 1)


def fields(path) -> dict:
    """The tokenizer.ggml.* keys of a GGUF (path or GGUFReader): {key: (GGUF types, value)}."""
    reader = path if isinstance(path, gguf.GGUFReader) else gguf.GGUFReader(path)
    return {k: (f.types, f.contents()) for k, f in reader.fields.items() if k.startswith("tokenizer.ggml.")}


@pytest.mark.slow
@pytest.mark.parametrize("kind, graph", [("bpe", "llama"), ("unigram", "t5")])
@pytest.mark.parametrize("source", ["model", "json"])
def test_sentencepiece_vocabulary_tokenizes_as_transformers(spm_models, tmp_path, kind, graph, source):
    folder = spm_folder(spm_models[kind], tmp_path / "tok", source)
    vocab = vocab_gguf(folder, tmp_path / "v.gguf", n_vocab=1280)  # 80 embeddings past the vocabulary
    assert vocab.model == graph and vocab.tokens[1279] == "[PAD1279]"
    f = fields(tmp_path / "v.gguf")
    types = f["tokenizer.ggml.token_type"][1]
    assert (types.count(gguf.TokenType.BYTE) == 256) == (kind == "bpe")  # byte fallback pieces <0x00>..<0xFF>
    assert types[3] == gguf.TokenType.CONTROL and types[4] == gguf.TokenType.USER_DEFINED  # <|end|>, <|user|>
    llm, tok = llama_vocab(tmp_path / "v.gguf"), AutoTokenizer.from_pretrained(folder)
    # (user-defined pieces are left out: llama.cpp splits them off like special tokens, docs/export.md#sentencepiece-vocabularies-in-gguf)
    for text in (TEXT, WIKI, "Hello world", " leading space", "x<|end|>y", "x <|end|> y"):
        ours = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert ours == tok(text, add_special_tokens=False).input_ids, text[:40]
    sp = spm.SentencePieceProcessor(model_file=str(spm_models[kind]))
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == sp.encode(TEXT)  # SentencePiece itself
    assert llm.tokenize(b"Hello", add_bos=True, special=False) == tok("Hello").input_ids  # the BOS policy


@pytest.mark.slow
def test_non_legacy_llama_tokenizer_differs_only_at_a_leading_space(spm_models, tmp_path):
    """transformers' LlamaTokenizer (legacy=False) adds no "▁" to a text that starts with a space, SentencePiece
    and llama.cpp add one: the only difference, and a known one (docs/export.md#sentencepiece-vocabularies-in-gguf)."""
    folder = spm_folder(spm_models["bpe"], tmp_path / "tok", "json", tokenizer_class="LlamaTokenizer")
    vocab_gguf(folder, tmp_path / "v.gguf")
    llm, tok = llama_vocab(tmp_path / "v.gguf"), AutoTokenizer.from_pretrained(folder)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == tok(TEXT, add_special_tokens=False).input_ids
    ours, theirs = llm.tokenize(WIKI.encode(), add_bos=False, special=True), tok(WIKI, add_special_tokens=False).input_ids
    assert WIKI.startswith(" ") and ours[1:] == theirs and tok.convert_ids_to_tokens(ours[:1]) == ["\u2581"]


def real_vocab(name: str) -> Path:
    path = VOCABS / f"ggml-vocab-{name}.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing: `make setup` unpacks llama.cpp's vocabulary files from the llama-cpp-python sdist")
    return path


def cases(path: Path):
    inp = path.with_name(path.name + ".inp").read_text().split("\n__ggml_vocab_test__\n")
    out = path.with_name(path.name + ".out").read_text().split("\n")
    return [(text, [int(t) for t in ids.split()]) for text, ids in zip(inp, out)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-spm", "phi-3"])
def test_real_vocabulary_rebuilt_from_tokenizer_json(name, tmp_path):
    """A real vocabulary as `bitft convert x.gguf` leaves it (transformers' tokenizer.json, no tokenizer.model),
    rebuilt by the export: llama.cpp gives the ids llama.cpp's own test expects, and transformers' ids."""
    path = real_vocab(name)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok.save_pretrained(tmp_path / "tok")
    vocab = vocab_gguf(tmp_path / "tok", tmp_path / "v.gguf")
    assert vocab.model == "llama" and vocab.flags["add_space_prefix"]
    llm = llama_vocab(tmp_path / "v.gguf")
    for text, expected in cases(path):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == expected, text
    ours, theirs = llm.tokenize(WIKI.encode(), add_bos=False), tok(WIKI, add_special_tokens=False).input_ids
    print(f"{name}: WikiText-2 20k chars, llama.cpp {len(ours)} tokens, transformers {len(theirs)}, "
          f"agreement {agreement(ours, theirs):.5f}")
    # phi-3's tokenizer.json prepends "▁" like SentencePiece; llama-spm's (Metaspace, prepend "first") not
    # before a leading space: WikiText-2 starts with one
    assert ours == theirs if name == "phi-3" else ours[1:] == theirs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-spm", "phi-3", "gemma-4"])
def test_source_gguf_tokenizer_is_copied_verbatim(name, tmp_path):
    """A model converted from a GGUF exports that GGUF's tokenizer.ggml.* keys unchanged (gemma-4 included, which
    transformers cannot even load)."""
    path = real_vocab(name)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    reader = gguf.GGUFReader(path)  # what convert does: a minute for gemma-4's 262k tokens and 515k merges
    save_source_tokenizer(reader, folder)
    n = len(reader.fields["tokenizer.ggml.tokens"].data)
    vocab = gguf_vocab(folder, n, None)
    writer = gguf.GGUFWriter(tmp_path / "v.gguf", "llama")
    vocab.write(writer, folder)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    ours, theirs = kv_bytes(tmp_path / "v.gguf", "tokenizer.ggml."), kv_bytes(path, "tokenizer.ggml.")
    assert ours.keys() == theirs.keys() and len(ours) >= 3
    assert all(ours[k] == theirs[k] for k in theirs), [k for k in theirs if ours[k] != theirs[k]]  # types, values
    llm = llama_vocab(tmp_path / "v.gguf")
    for text, expected in cases(path):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == expected, text


def test_unigram_with_byte_fallback_is_refused(tmp_path, spm_models):
    d = tmp_path / "m"
    (d).mkdir()
    spm.SentencePieceTrainer.train(input=str(spm_models["bpe"].with_name("corpus.txt")), model_prefix=str(d / "u"),
                                   vocab_size=600, model_type="unigram", byte_fallback=True, minloglevel=2)
    folder = spm_folder(d / "u.model", tmp_path / "tok", "model")
    with pytest.raises(BitftError, match="Unigram with byte fallback.*--packed"):
        gguf_vocab(folder, 600, None)


def test_tokenizer_pre_is_refused_for_sentencepiece(tmp_path, spm_models):
    folder = spm_folder(spm_models["bpe"], tmp_path / "tok", "json")
    with pytest.raises(BitftError, match="SentencePiece: drop it"):
        gguf_vocab(folder, 1200, "llama-bpe")


def test_side_file_that_disagrees_with_the_tokenizer_is_refused(tmp_path, spm_models):
    """A gguf_tokenizer.json left from another tokenizer would silently change tokenization: refused."""
    folder = spm_folder(spm_models["bpe"], tmp_path / "tok", "json")
    doc = {"source": "x.gguf", "fields": {"tokenizer.ggml.model": {"type": "STRING", "value": "llama"},
                                          "tokenizer.ggml.tokens": {"type": "ARRAY", "element": "STRING",
                                                                    "value": ["<unk>", "<s>", "</s>", "other"]}}}
    (folder / SIDE_FILE).write_text(json.dumps(doc))
    with pytest.raises(BitftError, match=f"remove .*{SIDE_FILE}"):
        gguf_vocab(folder, 1200, None)


def test_tiktoken_tokenizer_model_beside_a_byte_level_tokenizer_json_is_not_sentencepiece(tmp_path):
    """Llama-3 folders ship a tiktoken-format tokenizer.model: tokenizer.json decides."""
    folder = tmp_path / "tok"
    shutil.copytree(family_tokenizer("llama3.2"), folder)
    assert (folder / "tokenizer.model").is_file()
    vocab = gguf_vocab(folder, 128256, None)
    assert (vocab.model, vocab.pre) == ("gpt2", "llama-bpe")
