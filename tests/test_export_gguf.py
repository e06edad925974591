"""`bitft export --gguf`, checked by llama.cpp itself (llama-cpp-python, the `gguf` extra)."""

import numpy as np
import pytest
import torch
from helpers import (
    FAMILY_TOKENIZERS,
    TINY,
    cli_refuses,
    llama_cpp_run,
    family_tokenizer,
    tiny_model,
    wide_model,
    with_tokenizer,
)
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    OlmoConfig,
    Qwen3Config,
)

import bitft
import bitft.convert
from bitft.errors import BitftError
from bitft.export.gguf import export_gguf
from bitft.llamacpp import open_gguf

pytestmark = pytest.mark.slow  # llama.cpp

llama_cpp = pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")


@pytest.fixture(scope="module")
def wide(tmp_path_factory, smollm2_folder):
    """A random Llama whose widths are multiples of 256, so every linear is ternary-packed."""
    folder = tmp_path_factory.mktemp("wide") / "ckpt"
    return wide_model("llama", folder, smollm2_folder), folder


ARCHS = ["llama", "llama3.1", "mistral", "qwen2", "qwen3", "gemma3"]
TEXTS = ("Hello world, this is BitNet.", "def f(x):\n    return x ** 2  # 1.58 bits", "3.14159 -- ünïcödé 我想 🦙\tand  double  spaces")


def llama_logits(path, ids, texts=()):
    """(token ids of each of TEXTS without BOS, special tokens parsed; logits of IDS), in a fresh process."""
    out = llama_cpp_run(path, ids, [(t, False, True) for t in texts])
    return out["tokens"], out["logits"]


def compare(ours: torch.Tensor, theirs: np.ndarray):
    ours = ours.float().numpy()
    rel = np.abs(ours - theirs).max() / np.abs(ours).max()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).mean()
    corr = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
    return rel, agree, corr


@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0"])
def test_llama_cpp_runs_the_ternary_model_and_agrees(wide, tmp_path, qtype):
    model, folder = wide
    rows = dict(export_gguf(folder, tmp_path / "m.gguf", qtype=qtype, float_type="f32"))
    assert f"ternary {qtype.upper()} tensors" in rows and "Q8_0" not in " ".join(rows)  # every linear packed
    ids = list(range(100, 140))
    _, theirs = llama_logits(tmp_path / "m.gguf", ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    rel, agree, corr = compare(ours, theirs)
    print(f"{qtype}: max rel diff {rel:.3g}, argmax agree {agree:.2f}, corr {corr:.5f}")
    # llama.cpp quantizes activations per block (Q8_K), not per token: close, not equal
    assert corr > 0.999 and agree >= 0.9 and rel < 0.05


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_runs_in_llama_cpp_and_agrees(arch, smollm2_folder, tmp_path):
    """A random λ=1 model of each graph: same next-token logits (up to activation quantization) and tokens."""
    model = wide_model(arch, tmp_path / "ckpt", smollm2_folder)
    # transformers loads SmolLM2's tokenizer in a qwen2 folder as Qwen2Tokenizer (Qwen's split regex): a
    # tokenizer of no known family, refused unless named; llama.cpp's `qwen2` is that regex
    pre = "qwen2" if arch == "qwen2" else None
    if pre:
        with pytest.raises(BitftError, match="--tokenizer-pre"):
            export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    rows = dict(export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", float_type="f32", tokenizer_pre=pre))
    assert rows["architecture"] == f"{GRAPH[arch]}, pre-tokenizer {pre or 'smollm'}"  # detected, or the override
    assert "ternary TQ2_0 tensors" in rows and "Q8_0" not in " ".join(rows)
    ids = list(range(100, 140))
    their_tokens, theirs = llama_logits(tmp_path / "m.gguf", ids, TEXTS)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    rel, agree, corr = compare(ours, theirs)
    print(f"{arch}: max rel diff {rel:.3g}, argmax agree {agree:.2f}, corr {corr:.5f}")
    # sharp attention makes activation-quantization differences grow (gemma3: 0.047); a wrong rotary layout,
    # rope_freqs, norm offset or sliding pattern gives rel >= 0.14 or corr <= 0.99 (docs/export.md#gguf-for-llamacpp-bitftexportggufpy)
    assert corr > 0.999 and agree >= 0.85 and rel < 0.08
    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    for text, theirs in zip(TEXTS, their_tokens):
        assert theirs == tok(text, add_special_tokens=False).input_ids


GRAPH = {"llama": "llama", "llama3.1": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}


@pytest.mark.parametrize("family, config", [
    ("llama3.2", lambda: LlamaConfig(**{**TINY, "vocab_size": 128256}, tie_word_embeddings=False)),
    ("qwen3", lambda: Qwen3Config(**{**TINY, "vocab_size": 151936})),  # padded past the tokenizer's 151669
])
def test_real_tokenizers_are_detected_and_tokenize_as_in_transformers(family, config, tmp_path):
    bitft.convert_model(AutoModelForCausalLM.from_config(config())).save_pretrained(tmp_path / "ckpt")
    with_tokenizer(tmp_path / "ckpt", family_tokenizer(family))
    rows = dict(export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf"))
    assert rows["architecture"].endswith(f"pre-tokenizer {FAMILY_TOKENIZERS[family][3]}")
    llm = open_gguf(tmp_path / "m.gguf", n_ctx=64, n_threads=2, verbose=False, vocab_only=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    for text in TEXTS + ("I've been 'told he's there, 'RE you sure?  12345678 ......!!!", "\n\n \t x<|im_end|>"):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False).input_ids
    ids = tok("Hello world", add_special_tokens=True).input_ids
    assert llm.tokenize(b"Hello world", add_bos=True, special=False) == ids  # the BOS policy is carried over too


def test_tokenizer_and_chat_template_are_carried_over(wide, tmp_path):
    _, folder = wide
    export_gguf(folder, tmp_path / "m.gguf")
    llm = open_gguf(tmp_path / "m.gguf", n_ctx=64, n_threads=2, verbose=False, vocab_only=True)
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
        rows = dict(export_gguf(tmp_path / f"l{layers}", tmp_path / f"l{layers}.gguf", float_type="f32"))
        assert "ternary TQ2_0 tensors" in rows and "ternary F16 tensors" in rows  # ffn_down fits, 576-wide rows do not (F16: AMX-safe)
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
    m = bitft.convert_model(AutoModelForCausalLM.from_config(OlmoConfig(**TINY)))
    m.save_pretrained(tmp_path / "olmo")
    assert "OlmoForCausalLM has no llama.cpp graph" in bad(tmp_path, capsys, tmp_path / "olmo")
    m = bitft.convert_model(AutoModelForCausalLM.from_config(MistralConfig(**TINY, sliding_window=64)))
    m.save_pretrained(tmp_path / "swa")
    assert "sliding-window attention (64 tokens)" in bad(tmp_path, capsys, tmp_path / "swa")
    assert "--type must be" in bad(tmp_path, capsys, folder, "--type", "q4_0")
