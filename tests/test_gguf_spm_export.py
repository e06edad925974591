"""A model with a SentencePiece tokenizer through `bitft export --gguf`, run by llama.cpp; and a model
converted *from* a GGUF, whose export writes that GGUF's tokenizer back verbatim."""

import json
import types

import numpy as np
import pytest
import torch
from helpers import WIDE, llama_cpp_run
from test_gguf_vocab_spm import TEXT, fields, real_vocab, spm_folder, spm_models  # noqa: F401 (spm_models: a fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import bitft
from bitft.convert import convert_checkpoint
from bitft.export.gguf import export_gguf
from bitft.export.gguf_vocab_copy import SIDE_FILE, carry_source_tokenizer

pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")
from bitft.llamacpp import open_gguf  # noqa: E402


def tiny_spm_llama(folder, spm_model=None, tokenizer=None, vocab_size=1280):
    """A random λ=1 Llama (every linear TQ-packable) with a SentencePiece-BPE tokenizer: SPM_MODEL (trained here,
    1200 pieces, so 80 embeddings past the vocabulary) or the transformers TOKENIZER of a real vocabulary."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**WIDE, "vocab_size": vocab_size}, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random norms and sharp attention, as helpers.wide_model does
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    model = bitft.convert_model(model, lam=1.0)
    if tokenizer is None:
        spm_folder(spm_model, folder, "model", tokenizer_class="LlamaTokenizer")
    else:
        tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("vocab", ["trained", "llama-spm"])
def test_tiny_llama_with_sentencepiece_tokenizer_runs_in_llama_cpp(spm_models, tmp_path, vocab):  # noqa: F811
    if vocab == "trained":
        model = tiny_spm_llama(tmp_path / "ckpt", spm_models["bpe"])
    else:  # Llama-2's real 32000-piece vocabulary, as transformers reads it from llama.cpp's vocab file
        path = real_vocab(vocab)
        model = tiny_spm_llama(tmp_path / "ckpt", tokenizer=AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name),
                               vocab_size=32000)
    rows = dict(export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", float_type="f32"))
    assert rows["architecture"] == "llama, tokenizer llama (SentencePiece BPE)" and "ternary TQ2_0 tensors" in rows
    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    ids = tok(TEXT).input_ids
    run = llama_cpp_run(tmp_path / "m.gguf", ids, [(TEXT, True, True)], n_ctx=256)  # a fresh process
    assert run["tokens"][0] == ids  # tokens and the BOS policy
    theirs = run["logits"]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).mean()
    corr = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
    print(f"tiny SentencePiece Llama ({vocab} vocabulary): next-token agreement {agree:.3f} over {len(ids)} positions, corr {corr:.5f}")
    assert ours[-1].argmax() == theirs[-1].argmax() and agree >= 0.85 and corr > 0.999


@pytest.mark.slow
def test_model_converted_from_gguf_exports_its_tokenizer_verbatim(spm_models, tmp_path):  # noqa: F811
    """export (F16, which transformers reads) -> bitft convert x.gguf -> export: same tokenizer.ggml.* keys."""
    tiny_spm_llama(tmp_path / "ckpt", spm_models["bpe"])
    export_gguf(tmp_path / "ckpt", tmp_path / "first.gguf", qtype="f16")
    convert_checkpoint(str(tmp_path / "first.gguf"), tmp_path / "again")
    assert (tmp_path / "again" / SIDE_FILE).is_file()
    rows = dict(export_gguf(tmp_path / "again", tmp_path / "second.gguf"))
    assert rows["architecture"] == "llama, tokenizer llama copied from the source GGUF"
    assert fields(tmp_path / "second.gguf") == fields(tmp_path / "first.gguf")
    llm = open_gguf(tmp_path / "second.gguf", n_ctx=64, n_threads=2, verbose=False, vocab_only=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    assert llm.tokenize(TEXT.encode(), add_bos=True, special=True) == tok(TEXT).input_ids


def test_training_runs_carry_the_source_tokenizer(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir(), out.mkdir()
    (src / SIDE_FILE).write_text(json.dumps({"fields": {}}))
    model = types.SimpleNamespace(config=types.SimpleNamespace(_name_or_path=str(src)))
    carry_source_tokenizer(model, out)
    assert (out / SIDE_FILE).read_text() == (src / SIDE_FILE).read_text()
    carry_source_tokenizer(types.SimpleNamespace(config=types.SimpleNamespace(_name_or_path="org/name")), tmp_path)


@pytest.mark.smollm2
def test_smollm2_converted_from_its_gguf_exports_that_gguf_tokenizer(smollm2_gguf, tmp_path):
    """The demo's path: bitft convert smollm2 (a GGUF) -> export --gguf writes SmolLM2's own tokenizer keys."""
    convert_checkpoint(str(smollm2_gguf), tmp_path / "ckpt")
    rows = dict(export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf"))
    assert rows["architecture"] == "llama, tokenizer gpt2 copied from the source GGUF"
    assert fields(tmp_path / "m.gguf") == fields(smollm2_gguf)
    llm = open_gguf(tmp_path / "m.gguf", n_ctx=64, n_threads=2, verbose=False, vocab_only=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == tok(TEXT, add_special_tokens=False).input_ids
