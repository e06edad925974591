"""The claims that tiny random models cannot prove, on the real SmolLM2-135M-Instruct."""


import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import bitft
from bitft.convert import convert_checkpoint
from bitft.evaluate import perplexity, token_windows
from helpers import DATA, stock_logits

pytestmark = pytest.mark.smollm2  # and slow (tests/conftest.py)


@pytest.fixture(scope="module")
def windows(smollm2):
    _, tokenizer = smollm2
    return token_windows(tokenizer, (DATA / "eval" / "wikitext2_test.raw").read_text(), seqlen=512, limit=2)


def fresh(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_lambda_zero_is_smollm2_bit_for_bit_and_lambda_one_is_ternary(smollm2, smollm2_folder, windows):
    original, _ = smollm2
    with torch.no_grad():
        ref = original(windows).logits
    model = bitft.convert_model(fresh(smollm2_folder), lam=0.0)
    assert len(bitft.surgery.bit_linears(model)) == 30 * 7
    with torch.no_grad():
        assert torch.equal(model(windows).logits, ref)
    ppl0 = perplexity(model, windows)
    bitft.set_lambda(model, 1.0)
    ppl1 = perplexity(model, windows)
    # ~20 for the real model; untrained ternary is close to noise over a 49k vocabulary (1e7-1e8 measured)
    assert 10 < ppl0 < 40
    assert ppl1 > 1e4


def test_convert_the_shipped_gguf_and_stock_transformers_agrees(smollm2_gguf, tmp_path):
    out = tmp_path / "smol-bitnet"
    summary = convert_checkpoint(str(smollm2_gguf), out)
    assert len(summary["converted"]) == 210 and summary["lambda"] == 1.0
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    stock = stock_logits(out, ids, tmp_path)
    with torch.no_grad():
        ours = fresh(out)(ids).logits
    assert stock["linear_classes"] == ["AutoBitLinear", "Linear"]
    # AutoBitLinear multiplies dequantized values; bitft multiplies the integer codes and applies the
    # scales after (the packed export's order, equal bit for bit: test below). ~1e-7 apart, which
    # flips the odd int8 activation code; untrained ternary SmolLM2 amplifies those flips with depth.
    diff = (stock["logits"] - ours).abs()
    agree = (stock["logits"].argmax(-1) == ours.argmax(-1)).float().mean().item()
    corr = torch.corrcoef(torch.stack([stock["logits"].flatten(), ours.flatten()]))[0, 1].item()
    print(f"AutoBitLinear vs bitft, 30 layers: max diff {diff.max():.2e}, argmax agree {agree:.2f}, corr {corr:.4f}")
    assert corr > 0.9


def test_folder_conversion_copies_without_loading(smollm2_folder, tmp_path):
    out = tmp_path / "fast"
    summary = convert_checkpoint(str(smollm2_folder), out, lam=0.0)
    assert summary["how"].startswith("safetensors shards copied")
    assert (out / "model.safetensors").stat().st_size == (smollm2_folder / "model.safetensors").stat().st_size
    assert (out / "tokenizer.json").is_file()


def test_packed_export_of_smollm2_loads_in_stock_transformers(smollm2_folder, windows, tmp_path):
    from bitft.export.packed import export_packed

    ckpt = tmp_path / "ternary"
    convert_checkpoint(str(smollm2_folder), ckpt)  # λ=1, shards copied
    rows = dict(export_packed(ckpt, tmp_path / "packed"))
    assert rows["bits per linear weight"] == "2.000"
    ids = windows[:1, :64]
    for layers in (1, 2, 30):
        stock = stock_logits(tmp_path / "packed", ids, tmp_path, layers=layers)
        with torch.no_grad():
            ours = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, num_hidden_layers=layers)(ids).logits
        # bitft's λ=1 forward computes in the packed BitLinear's order: bit for bit at every depth
        # (bitft ≤ 0.1 multiplied dequantized values: 30 layers, next-token argmax 92% equal).
        assert torch.equal(stock["logits"], ours), f"{layers} layers: max diff {(stock['logits'] - ours).abs().max():.2e}"
