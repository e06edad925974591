"""`bitft export --gguf`, checked by llama.cpp itself (llama-cpp-python, the `gguf` extra)."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import bitft
import bitft.convert
from bitft.export.gguf import export_gguf
from helpers import cli_refuses, tiny_model, wide_llama, with_tokenizer

pytestmark = pytest.mark.slow  # llama.cpp

llama_cpp = pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")


@pytest.fixture(scope="module")
def wide(tmp_path_factory, smollm2_folder):
    """A random Llama whose widths are multiples of 256, so every linear is ternary-packed."""
    folder = tmp_path_factory.mktemp("wide") / "ckpt"
    return wide_llama(folder, smollm2_folder), folder


def llama_logits(path, ids):
    llm = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, n_threads=2, verbose=False)
    llm.eval(ids)
    return llm, np.array(llm.scores[: len(ids)])


def compare(ours: torch.Tensor, theirs: np.ndarray):
    ours = ours.float().numpy()
    rel = np.abs(ours - theirs).max() / np.abs(ours).max()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).mean()
    corr = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
    return rel, agree, corr


@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0"])
def test_llama_cpp_runs_the_ternary_model_and_agrees(wide, tmp_path, qtype):
    model, folder = wide
    rows = dict(export_gguf(folder, tmp_path / "m.gguf", qtype=qtype, float_type="f32", tokenizer_pre="smollm"))
    assert f"ternary {qtype.upper()} tensors" in rows and "Q8_0" not in " ".join(rows)  # every linear packed
    ids = list(range(100, 140))
    _, theirs = llama_logits(tmp_path / "m.gguf", ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    rel, agree, corr = compare(ours, theirs)
    print(f"{qtype}: max rel diff {rel:.3g}, argmax agree {agree:.2f}, corr {corr:.5f}")
    # llama.cpp quantizes activations per block (Q8_K), not per token: close, not equal
    assert corr > 0.999 and agree >= 0.9 and rel < 0.05


def test_tokenizer_and_chat_template_are_carried_over(wide, tmp_path):
    _, folder = wide
    export_gguf(folder, tmp_path / "m.gguf", tokenizer_pre="smollm")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, n_threads=2, verbose=False, vocab_only=True)
    tok = AutoTokenizer.from_pretrained(folder)
    for text in ("Hello world, this is BitNet.", "def f(x):\n    return x ** 2  # 1.58 bits"):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text).input_ids
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    assert int(llm.metadata["tokenizer.ggml.eos_token_id"]) == tok.eos_token_id


@pytest.mark.smollm2
def test_smollm2_shallow_truncations_agree_with_llama_cpp(smollm2_folder, tmp_path):
    """Untrained ternary SmolLM2 is chaotic at full depth: compare 1, 2 and 4 layers."""
    full = tmp_path / "full"
    bitft.convert.convert_checkpoint(str(smollm2_folder), full)
    ids = AutoTokenizer.from_pretrained(full)("The capital of France is Paris, and the capital of Italy is").input_ids
    for layers in (1, 2, 4):
        model = AutoModelForCausalLM.from_pretrained(full, num_hidden_layers=layers, dtype=torch.float32).eval()
        model.save_pretrained(tmp_path / f"l{layers}")
        with_tokenizer(tmp_path / f"l{layers}", smollm2_folder)
        rows = dict(export_gguf(tmp_path / f"l{layers}", tmp_path / f"l{layers}.gguf", float_type="f32", tokenizer_pre="smollm"))
        assert "ternary TQ2_0 tensors" in rows and "ternary Q8_0 tensors" in rows  # ffn_down fits, 576-wide rows do not
        _, theirs = llama_logits(tmp_path / f"l{layers}.gguf", ids)
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0]
        rel, agree, corr = compare(ours, theirs)
        print(f"SmolLM2 {layers} layer(s): max rel diff {rel:.3g}, argmax agree {agree:.2f}, corr {corr:.4f}")
        assert corr > 0.98 and agree >= 0.8


def bad(tmp_path, capsys, *args):
    return cli_refuses(capsys, tmp_path, ["export", *args, "--gguf", "-o", tmp_path / "m.gguf"])


def test_refusals(tmp_path, capsys, wide):
    _, folder = wide
    m = bitft.convert_model(tiny_model(), lam=0.5)
    m.save_pretrained(tmp_path / "half")
    assert "is at λ=0.5" in bad(tmp_path, capsys, tmp_path / "half")
    m = bitft.convert_model(tiny_model(), subln=True)
    m.save_pretrained(tmp_path / "subln")
    assert "SubLN" in bad(tmp_path, capsys, tmp_path / "subln")
    m = bitft.convert_model(tiny_model("qwen2"))
    m.save_pretrained(tmp_path / "qwen")
    assert "not a Llama-architecture" in bad(tmp_path, capsys, tmp_path / "qwen")
    assert "--type must be" in bad(tmp_path, capsys, folder, "--type", "q4_0")
