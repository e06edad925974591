import pytest
import torch
import torch.nn as nn

import bitft
from bitft import BitLinear
from bitft.quant import quantize_weight
from bitft.surgery import bit_linears, select_modules, summarize_names
from helpers import tiny_model


def test_converts_every_decoder_linear_and_nothing_else(arch):
    model = tiny_model(arch)
    layers = model.config.num_hidden_layers
    bitft.convert_model(model)
    converted = bit_linears(model)
    assert len(converted) == 7 * layers  # q k v o gate up down
    assert {n.rsplit(".", 1)[1] for n in converted} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert type(model.lm_head) is nn.Linear
    assert type(model.get_input_embeddings()) is nn.Embedding
    assert model.config.bitft["modules_to_not_convert"] == ["lm_head"]


def test_lambda_zero_is_the_original_model_bit_for_bit(arch, tokens):
    model = tiny_model(arch)
    ref = model(tokens).logits
    bitft.convert_model(model, lam=0.0)
    assert torch.equal(model(tokens).logits, ref)


def test_lambda_one_uses_ternary_weights_with_one_scale_per_tensor(arch, tokens):
    model = tiny_model(arch)
    bitft.convert_model(model, lam=1.0)
    for name, m in bit_linears(model).items():
        q = quantize_weight(m.weight)
        s = m.weight.abs().mean()
        assert set((q / s).round().unique().tolist()) <= {-1.0, 0.0, 1.0}, name
        assert torch.allclose(q, (q / s).round() * s, atol=1e-6), name
    assert not torch.allclose(model(tokens).logits, tiny_model(arch)(tokens).logits)


def test_set_and_get_lambda_keep_the_config_in_step(tokens):
    model = bitft.convert_model(tiny_model(), lam=0.0)
    assert bitft.get_lambda(model) == 0.0 and model.config.quantization_config["quant_method"] == "bitft"
    bitft.set_lambda(model, 1)
    assert bitft.get_lambda(model) == 1.0
    assert model.config.bitft["lambda"] == 1.0
    qc = model.config.quantization_config
    assert (qc["quant_method"], qc["linear_class"], qc["quantization_mode"]) == ("bitnet", "autobitlinear", "online")
    with pytest.raises(ValueError, match="λ must be in"):
        bitft.set_lambda(model, 1.01)
    assert bitft.get_lambda(model) == 1.0


def test_lambda_out_of_range_is_refused_before_any_change():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"λ must be in \[0, 1\]"):
        bitft.convert_model(model, lam=-0.5)
    assert not bit_linears(model)


def test_converting_twice_is_refused():
    model = bitft.convert_model(tiny_model())
    with pytest.raises(ValueError, match="already has BitLinear"):
        bitft.convert_model(model)


def test_set_lambda_on_a_plain_model_says_convert_first():
    with pytest.raises(ValueError, match="convert it first"):
        bitft.set_lambda(tiny_model(), 0.5)


# -------------------------------------------------------------- selection (peft's target_modules rules)

def names(model, **kw):
    return select_modules(model, **kw)


def test_targets_by_suffix_exact_name_and_regex():
    model = tiny_model()
    assert names(model, targets=["q_proj", "v_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert names(model, targets=["model.layers.1.mlp.down_proj"]) == ["model.layers.1.mlp.down_proj"]
    # a suffix matches at a dot boundary only: "proj" is not a suffix of "q_proj"
    with pytest.raises(ValueError, match="'proj' matches no linear layer"):
        names(model, targets=["proj"])
    # a string is a regex over the full name
    assert names(model, targets=r"model\.layers\.0\.mlp\..*") == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    with pytest.raises(ValueError, match="matches no linear layer"):
        names(model, targets="q_proj")  # regex must match the whole name


def test_exclude_removes_from_the_selection():
    model = tiny_model()
    chosen = names(model, exclude=["down_proj", "model.layers.0.self_attn.q_proj"])
    assert len(chosen) == 14 - 2 - 1
    assert all(not n.endswith("down_proj") for n in chosen)
    assert names(model, targets=["mlp.up_proj"], exclude=r".*layers\.0\..*") == ["model.layers.1.mlp.up_proj"]


def test_selection_that_matches_nothing_lists_the_layers_and_leaves_the_model_alone():
    model = tiny_model()
    with pytest.raises(ValueError) as e:
        bitft.convert_model(model, targets=["c_attn"])
    msg = str(e.value)
    assert "'c_attn' matches no linear layer" in msg
    assert "model.layers.{0..1}.{self_attn.q_proj,self_attn.k_proj" in msg
    assert not bit_linears(model)


def test_lm_head_and_embeddings_are_never_candidates():
    model = tiny_model()
    with pytest.raises(ValueError, match="'lm_head' matches no linear layer"):
        names(model, targets=["lm_head"])


def test_invalid_regex_and_empty_selection_are_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="invalid"):
        names(model, targets="(q_proj")
    with pytest.raises(ValueError, match="leave nothing to convert"):
        names(model, targets=["q_proj"], exclude=["q_proj"])


def test_summarize_names_groups_by_layer_index():
    ns = [f"model.layers.{i}.mlp.{p}" for i in range(30) for p in ("up_proj", "down_proj")] + ["lm_head"]
    assert summarize_names(ns) == "model.layers.{0..29}.{mlp.up_proj,mlp.down_proj}, lm_head"
    assert summarize_names(["model.layers.3.mlp.up_proj", "model.layers.7.mlp.up_proj"]) == "model.layers.{3,7}.mlp.up_proj"


def test_subln_adds_a_norm_before_the_quantizer(tokens):
    model = bitft.convert_model(tiny_model(), subln=True, lam=1.0)
    m = model.model.layers[0].mlp.down_proj
    assert m.rms_norm is not None and m.rms_norm.weight.shape == (m.in_features,)
    assert torch.isfinite(model(tokens).logits).all()


def test_peft_lora_wraps_bitlinear(tokens):
    from peft import LoraConfig, get_peft_model

    model = bitft.convert_model(tiny_model(), lam=1.0)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    base = peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base, BitLinear)
    out = peft_model(tokens, labels=tokens)
    out.loss.backward()
    assert bitft.get_lambda(peft_model) == 1.0
