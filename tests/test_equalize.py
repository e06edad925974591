"""Learned equalization in the block phase (bitft.train.equalize): folded scales keep the full-precision function
(GQA, q/k/v and MLP biases), a block phase with it leaves plain blocks whose scales moved, a signal then a relaunch
gives the same losses (kill -9 through the recipe: tests/test_blockwise.py, which runs with equalization on), and
what cannot be folded exactly is refused in one line."""

from __future__ import annotations


import pytest
import torch
from torch.nn.utils import parametrize
from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig

import bitft
from bitft.config import BlockwiseArguments
from bitft.errors import ConfigError
from bitft.train import equalize
from bitft.train.blockwise import reconstruct
from helpers import TINY, tiny_model
from test_blockwise import CFG, args, ids, model_at_1, stopped_by_a_signal

EQ = {**CFG, "block_equalize": True, "block_equalize_learning_rate": 3e-2}


def llama_with_biases():
    torch.manual_seed(0)
    cfg = LlamaConfig(**TINY, attention_bias=True, mlp_bias=True)
    return AutoModelForCausalLM.from_config(cfg).eval()


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def no_parametrization_left(model):
    return not any(parametrize.is_parametrized(m) for m in model.modules()) and \
        not any(equalize.is_attached(layer) for layer in model.model.layers)


@pytest.mark.parametrize("make", [lambda: tiny_model("llama"), lambda: tiny_model("qwen2"), llama_with_biases],
                         ids=["llama-gqa", "qwen2-qkv-bias", "llama-attn-mlp-bias"])
def test_folded_scales_keep_the_full_precision_function(make):
    model = bitft.convert_model(make(), lam=0.0)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA: s_o repeated over groups
    x = ids(n=2, t=16)
    want = logits(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    for layer in model.model.layers:
        scales = equalize.attach(layer, model.config)
        with torch.no_grad():
            for t in scales.parameters():
                t.copy_(torch.randn_like(t) * 0.7)  # s between ~0.1 and ~10
    torch.testing.assert_close(logits(model, x), want, atol=1e-5, rtol=1e-5)  # parametrized
    ranges = [equalize.fold(layer) for layer in model.model.layers]
    assert no_parametrization_left(model)
    assert set(model.state_dict()) == set(before)  # the plain model's keys: exports see a Llama / Qwen2
    got = logits(model, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # folded: λ = 0 computes the original
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert all(k.startswith("model.layers.") for k in changed) and len(changed) >= 9 * len(model.model.layers)
    assert all(lo < 0.5 and hi > 2 for r in ranges for lo, hi in r.values())
    bitft.set_lambda(model, 1.0)
    assert not torch.allclose(logits(model, x), logits(bitft.convert_model(make(), lam=1.0), x))  # other ternary codes


def test_block_phase_with_equalization_leaves_plain_blocks_whose_scales_moved(tmp_path):
    model = model_at_1()
    summary = reconstruct(model, ids(), BlockwiseArguments(**EQ), args(tmp_path))
    assert no_parametrization_left(model)
    for b in summary["blocks"]:
        assert b["held_out_after"] < b["held_out_before"]
        assert set(b["equalize"]) == {"attn", "mlp", "o", "d"}
        assert any(lo < 0.99 or hi > 1.01 for lo, hi in b["equalize"].values()), b["equalize"]  # learned, not 1
    plain = model_at_1()
    for k, layer in enumerate(plain.model.layers):  # strict: exactly a plain block's tensors
        layer.load_state_dict(torch.load(tmp_path / "blockwise" / f"block_{k}.pt", weights_only=True))
    x = ids(n=2, t=16)
    assert torch.equal(logits(plain, x), logits(model, x))  # the block files are the trained model


def test_a_signal_then_a_relaunch_gives_the_same_losses_with_the_scales(tmp_path, monkeypatch):
    reference, state = stopped_by_a_signal(tmp_path, monkeypatch, EQ)
    assert "equalize.t_o" in state["weights"] and "equalize.t_o" in state["best_weights"]
    with pytest.raises(ConfigError, match="block_equalize changed") as e:  # the other config: one line, nothing loaded
        reconstruct(model_at_1(), ids(), BlockwiseArguments(**CFG), args(tmp_path / "run"))
    assert len(str(e.value).splitlines()) == 1
    model = model_at_1()
    resumed = reconstruct(model, ids(), BlockwiseArguments(**EQ), args(tmp_path / "run"))
    assert [b["losses"] for b in resumed["blocks"]] == [b["losses"] for b in reference["blocks"]]
    assert [b["held_out"] for b in resumed["blocks"]] == [b["held_out"] for b in reference["blocks"]]
    assert resumed["blocks"][1]["equalize"] == reference["blocks"][1]["equalize"]
    assert no_parametrization_left(model)


@pytest.mark.parametrize("case", ["gemma", "subln", "bitnet"])
def test_what_cannot_be_folded_exactly_is_refused_in_one_line(tmp_path, case):
    if case == "gemma":
        torch.manual_seed(0)
        model, words = bitft.convert_model(AutoModelForCausalLM.from_config(GemmaConfig(**TINY, head_dim=16)), lam=1.0), \
            r"\(1 \+ weight\)"
    else:
        model, words = bitft.convert_model(tiny_model("llama"), lam=1.0, subln=case if case == "bitnet" else True), \
            "model type bitnet" if case == "bitnet" else "SubLN"
    with pytest.raises(ConfigError, match=words) as e:
        reconstruct(model, ids(), BlockwiseArguments(**EQ), args(tmp_path))
    assert len(str(e.value).splitlines()) == 1 and str(e.value).endswith("set block_equalize: false")
    assert not any((tmp_path / "blockwise").iterdir())  # refused before any stream or state was written
