"""GGUF export without llama.cpp: rope-scaling factors, pre-tokenizer detection and its refusals, bitnet.cpp's I2_S
files (layout, `bitft info`, card, refusals, damaged headers) (fast)."""

import json
import struct

import numpy as np
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


# ---- bitnet.cpp's I2_S and bitnet-b1.58 (the files; bitnet.cpp itself runs them in test_bitnet_cpp.py) ----
def test_i2s_layout_is_bitnet_cpps():
    """x86: byte b of each 128-value block holds values b, b+32, b+64, b+96 (bits 7-6 .. 1-0) as code + 1;
    then the float32 scale and 28 zero bytes. ARM: 64-value blocks, 16 bytes each."""
    from bitft.export.gguf_i2s import dequantize_i2s, quantize_i2s

    torch.manual_seed(0)
    codes = torch.randint(-1, 2, (4, 384), dtype=torch.int8).numpy()
    data = quantize_i2s(codes, 0.125)
    assert data.size == codes.size // 4 + 32 and data.dtype.name == "uint8"
    flat = codes.reshape(-1) + 1
    i, b = 5, 7  # block 5, byte 7
    assert data[32 * i + b] == flat[128 * i + b] << 6 | flat[128 * i + b + 32] << 4 | flat[128 * i + b + 64] << 2 | flat[128 * i + b + 96]
    assert data[codes.size // 4: codes.size // 4 + 4].tobytes() == struct.pack("<f", 0.125) and not data[-28:].any()
    arm = quantize_i2s(codes, 0.125, block=64)
    assert arm[16 * i + b] == flat[64 * i + b] << 6 | flat[64 * i + b + 16] << 4 | flat[64 * i + b + 32] << 2 | flat[64 * i + b + 48]
    for block, d in ((128, data), (64, arm)):
        assert np.array_equal(dequantize_i2s(d, codes.shape, block), codes * np.float32(0.125))


def i2s_ckpt(folder):
    """A Llama whose down_proj rows (192) are not a multiple of 128 (q/k/v/o/gate/up rows of 128 are)."""
    return homemade_tokenizer(tiny_ckpt(folder, hidden_size=128, intermediate_size=192))


def test_i2s_export_info_card_and_eval_refusal(tmp_path, capsys):
    from bitft.cli import main
    from bitft.gguf_header import read_header

    ckpt = i2s_ckpt(tmp_path / "ckpt")
    out = tmp_path / "m.gguf"
    assert main(["export", str(ckpt), "--gguf", "--type", "i2_s", "-o", str(out), "--tokenizer-pre", "gpt-2"]) == 0
    printed = capsys.readouterr().out
    fallback = [line for line in printed.splitlines() if "I2_S fallback" in line]
    assert len(fallback) == 1 and "2 linear tensors written as 2 F16 (rows of 192 values)" in fallback[0]
    assert "llama-cli -m m.gguf" in printed
    meta, tensors = read_header(out, with_shapes=True)
    assert meta["general.file_type"] == 40 and meta["bitft.i2_s.block"] == 128
    i2s = [t for t in tensors if t[1] == "I2_S"]
    assert len(i2s) == 12 and all(t[3] == t[2] // 4 + 32 for t in i2s)
    assert {t[0] for t in tensors if ".ffn_down." in t[0]} & {t[0] for t in i2s} == set()

    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "bitnet.cpp (microsoft/BitNet) only" in info and "x86 (128-value blocks" in info
    assert fallback[0].split("I2_S fallback")[1].strip(" |") in info  # the same line as the export's
    card = out.with_suffix(".md").read_text()
    assert "bitnet.cpp" in card and "llama-cli -m m.gguf" in card and "rows of 192" in card and "I2_S" in card

    (tmp_path / "text.txt").write_text("some text to measure " * 50)
    err = cli_refuses(capsys, tmp_path, ["eval", out, "--ppl", "--data", tmp_path / "text.txt"])
    assert "bitnet.cpp only" in err and "llama-perplexity -m" in err


def test_relu2_bitnet_is_written_for_bitnet_cpps_bitnet_b158_graph(tmp_path):
    from helpers import bitnet_reference

    import bitft.convert
    from bitft.gguf_header import read_header

    bitnet_reference(tmp_path / "src", act="relu2", tie=True, hidden_size=128, intermediate_size=256)
    homemade_tokenizer(tmp_path / "src")
    bitft.convert.convert_checkpoint(str(tmp_path / "src"), tmp_path / "ckpt")
    rows = dict(export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", qtype="i2_s", tokenizer_pre="gpt-2"))
    assert rows["architecture"] == "bitnet-b1.58, pre-tokenizer gpt-2" and "bitnet.cpp" in rows["runs in"]
    meta, tensors = read_header(tmp_path / "m.gguf")
    names = {t[0] for t in tensors}
    assert meta["general.architecture"] == "bitnet-b1.58" and meta["bitnet-b1.58.block_count"] == 2
    assert {"blk.1.attn_sub_norm.weight", "blk.1.ffn_sub_norm.weight", "token_embd.weight"} <= names
    assert "output.weight" not in names  # the graph's output is the token embedding


@pytest.mark.parametrize("case, message", [
    ("qwen3", "bitnet.cpp (--type i2_s) has no qwen3 graph"),
    ("gpt-4o", "no 'gpt-4o' pre-tokenizer"),
])
def test_what_bitnet_cpp_cannot_load_is_refused_before_writing(tmp_path, capsys, case, message):
    from transformers import Qwen3Config

    if case == "qwen3":
        model = AutoModelForCausalLM.from_config(Qwen3Config(**{**TINY, "vocab_size": 300, "hidden_size": 128}))
        homemade_tokenizer(tmp_path / "ckpt")
        bitft.convert_model(model, lam=1.0).save_pretrained(tmp_path / "ckpt")
        pre = "gpt-2"
    else:
        i2s_ckpt(tmp_path / "ckpt")
        pre = "gpt-4o"
    err = cli_refuses(capsys, tmp_path, ["export", tmp_path / "ckpt", "--gguf", "--type", "i2_s", "-o", tmp_path / "m.gguf",
                                         "--tokenizer-pre", pre])
    assert message in err and "--type tq2_0" in err


def _damage(path, how):
    raw = bytearray(path.read_bytes())
    if how == "version":
        raw[4:8] = struct.pack("<I", 77)
    elif how == "counts":
        raw[8:16] = struct.pack("<Q", 1 << 60)
    elif how == "string length":  # the first key's name length
        raw[24:32] = struct.pack("<Q", 1 << 40)
    elif how == "type id":  # the last tensor's type id: 12 bytes before the end of the tensor infos
        name = b"token_embd.weight"
        at = raw.rindex(name) + len(name) + 4 + 2 * 8
        raw[at: at + 4] = struct.pack("<I", 99)
    elif how == "cut header":
        raw = raw[:200]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how, message", [
    ("version", "GGUF version 77"), ("counts", "cannot fit"), ("string length", "runs past the end"),
    ("type id", "type id 99"), ("cut header", "not a valid GGUF file"),
])
def test_a_damaged_header_is_refused_in_one_line(tmp_path, capsys, how, message):
    ckpt = i2s_ckpt(tmp_path / "ckpt")
    export_gguf(ckpt, tmp_path / "m.gguf", qtype="i2_s", tokenizer_pre="gpt-2")
    _damage(tmp_path / "m.gguf", how)
    err = cli_refuses(capsys, tmp_path, ["info", tmp_path / "m.gguf"])
    assert message in err and "not a valid GGUF file" in err


def test_kv_bytes_compares_keys_types_and_values_exactly(tmp_path):
    """bitft.gguf_header.kv_bytes: what the vocabulary tests compare instead of decoding 262k-entry arrays."""
    import gguf

    from bitft.gguf_header import kv_bytes

    def write(name, tokens, kind=gguf.TokenType.NORMAL, eos=2):
        w = gguf.GGUFWriter(tmp_path / name, "llama")
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([kind] * len(tokens))
        w.add_eos_token_id(eos)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        return kv_bytes(tmp_path / name, "tokenizer.ggml.")

    base = write("a.gguf", ["a", "b", "c"])
    assert set(base) == {"tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                         "tokenizer.ggml.eos_token_id"}
    assert write("same.gguf", ["a", "b", "c"]) == base
    for name, other in {"token": write("t.gguf", ["a", "b", "d"]), "type": write("k.gguf", ["a", "b", "c"], kind=3),
                        "scalar": write("e.gguf", ["a", "b", "c"], eos=1)}.items():
        assert other.keys() == base.keys() and other != base, name
