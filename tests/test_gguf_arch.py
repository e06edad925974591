"""GGUF export without llama.cpp: rope-scaling factors, pre-tokenizer detection and its refusals (fast)."""

import json

import pytest
import torch
from helpers import LLAMA31_ROPE, TINY, cli_refuses
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import bitft
from bitft.export.gguf import export_gguf
from bitft.export.gguf_arch import llama3_rope_freqs

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_llama3_rope_freqs_divide_hf_frequencies_exactly(head_dim):
    """llama.cpp divides each base frequency by rope_freqs: the result must be HF's llama3 inv_freq."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for rope in (LLAMA31_ROPE, dict(LLAMA31_ROPE, original_max_position_embeddings=8192)):  # test's and Llama-3.1's
        cfg = LlamaConfig(**TINY, head_dim=head_dim, rope_parameters=dict(rope))
        hf, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
        theta = rope["rope_theta"]
        base = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        ours = base / torch.from_numpy(llama3_rope_freqs(rope, head_dim, theta)).double()
        torch.testing.assert_close(ours, hf.double(), rtol=1e-6, atol=0)
        assert (llama3_rope_freqs(rope, head_dim, theta) != 1).any()  # the case exercises scaling


def homemade_tokenizer(folder, byte_fallback=False):
    """A byte-level BPE tokenizer trained here, of no known family (its probe hash is in no table)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=byte_fallback))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|end|>"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog 0123456789"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>").save_pretrained(folder)
    return folder


def tiny_ckpt(folder, **cfg):
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY, "vocab_size": 300, **cfg}))
    bitft.convert_model(model, lam=1.0).save_pretrained(folder)
    return folder


def test_unknown_pre_tokenizer_is_refused_and_override_writes_it(tmp_path, capsys):
    ckpt = homemade_tokenizer(tiny_ckpt(tmp_path / "ckpt"))
    err = cli_refuses(capsys, tmp_path, ["export", ckpt, "--gguf", "-o", tmp_path / "m.gguf"])
    assert "not one llama.cpp knows" in err and "--tokenizer-pre" in err
    rows = dict(export_gguf(ckpt, tmp_path / "m.gguf", tokenizer_pre="gpt-2"))
    assert rows["architecture"] == "llama, pre-tokenizer gpt-2"
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"


def test_byte_level_tokenizer_with_byte_fallback_is_refused(tmp_path, capsys):
    """Byte-level BPE (gpt2) has no byte pieces, SentencePiece (llama) no byte-level alphabet: neither fits."""
    ckpt = homemade_tokenizer(tiny_ckpt(tmp_path / "ckpt"), byte_fallback=True)
    assert json.loads((ckpt / "tokenizer.json").read_text())["model"]["byte_fallback"]
    err = cli_refuses(capsys, tmp_path, ["export", ckpt, "--gguf", "-o", tmp_path / "m.gguf", "--tokenizer-pre", "gpt-2"])
    assert "byte-level BPE with byte fallback" in err and "--packed" in err


def test_rope_freqs_tensor_and_untied_output_are_written(tmp_path):
    ckpt = homemade_tokenizer(tiny_ckpt(tmp_path / "ckpt", tie_word_embeddings=False, rope_parameters=dict(LLAMA31_ROPE)))
    export_gguf(ckpt, tmp_path / "m.gguf", tokenizer_pre="gpt-2")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    assert list(tensors["rope_freqs.weight"].data) == pytest.approx(llama3_rope_freqs(LLAMA31_ROPE, head_dim, 500000.0))
    assert "output.weight" in tensors and "token_embd.weight" in tensors


@pytest.mark.parametrize("rope, message", [
    (dict(rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=64), "rope scaling 'yarn'"),
    (dict(rope_type="dynamic", rope_theta=1e4, factor=2.0), "rope scaling 'dynamic'"),
])
def test_unsupported_rope_scaling_is_refused(tmp_path, capsys, rope, message):
    ckpt = homemade_tokenizer(tiny_ckpt(tmp_path / "ckpt", rope_parameters=rope))
    assert message in cli_refuses(capsys, tmp_path, ["export", ckpt, "--gguf", "-o", tmp_path / "m.gguf"])
