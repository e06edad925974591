"""`bitft export --packed`: pack/unpack exactness, stock transformers loads it and agrees, refusals."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.integrations.bitnet import pack_weights, unpack_weights

import bitft
from bitft.cli import main
from bitft.quant import pack_ternary, unpack_ternary
from helpers import cli_refuses, stock_logits, tiny_model

SHAPES = [(4, 1), (4, 7), (8, 3), (12, 5), (64, 64), (128, 576), (1536, 576), (4, 3, 2), (16,)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(5))
def test_pack_unpack_is_exact_and_matches_transformers(shape, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, shape, generator=g, dtype=torch.int8)
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0] // 4, *shape[1:])
    assert torch.equal(unpack_ternary(packed), codes)
    assert torch.equal(packed, pack_weights(codes.clone()))  # transformers' packer: same bytes
    assert torch.equal(unpack_weights(packed, dtype=torch.float32), codes.float())


def test_pack_refuses_rows_not_divisible_by_4():
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_ternary(torch.zeros(6, 4, dtype=torch.int8))


def stock(ckpt, ids, tmp_path, new_tokens=0):
    return stock_logits(ckpt, ids, tmp_path, new_tokens)


def converted(tmp_path, arch="llama", subln=False, lam=1.0, config=None):
    model = bitft.convert_model(config or tiny_model(arch), lam=lam, subln=subln)
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


@pytest.mark.parametrize("subln", [False, True])
def test_stock_transformers_loads_the_packed_model_and_agrees(tmp_path, arch, tokens, subln, capsys):
    model, ckpt = converted(tmp_path, arch, subln)
    assert main(["export", str(ckpt), "--packed", "-o", str(tmp_path / "packed")]) == 0
    assert "bits per linear weight  2.0" in capsys.readouterr().out
    out = stock(tmp_path / "packed", tokens, tmp_path, new_tokens=12)
    assert out["linear_classes"] == ["BitLinear", "Linear"]  # transformers' packed BitLinear
    with torch.no_grad():
        ours = model(tokens).logits
        greedy = model.generate(tokens, max_new_tokens=12, do_sample=False)[:, tokens.shape[1]:]
    # bitft's λ=1 forward multiplies the integer codes and applies the scales after, in the packed
    # BitLinear's order and rounding: the same logits bit for bit.
    assert torch.equal(out["logits"], ours)
    assert torch.equal(out["greedy"], greedy)
    cfg = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert cfg["quantization_config"]["linear_class"] == "bitlinear" and "bitft" not in cfg


def test_packed_weights_and_scales_are_what_stock_expects(tmp_path):
    model, ckpt = converted(tmp_path)
    main(["export", str(ckpt), "--packed", "-o", str(tmp_path / "packed")])
    from safetensors.torch import load_file

    state = load_file(tmp_path / "packed" / "model.safetensors")
    w = model.model.layers[0].mlp.up_proj.weight
    codes = unpack_ternary(state["model.layers.0.mlp.up_proj.weight"])
    s = w.abs().mean()
    assert torch.equal(codes.float(), (w / s).round().clamp(-1, 1))
    # bitlinear divides by weight_scale: it holds 1 / s
    torch.testing.assert_close(state["model.layers.0.mlp.up_proj.weight_scale"], (1 / s).reshape(1))
    # embeddings and lm_head stay full precision, bit for bit (an untied lm_head is written, a tied one is not)
    assert torch.equal(state["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    if model.config.tie_word_embeddings:
        assert "lm_head.weight" not in state
    else:
        assert torch.equal(state["lm_head.weight"], model.lm_head.weight)


def bad(tmp_path, capsys, *args):
    return cli_refuses(capsys, tmp_path, ["export", *args, "--packed", "-o", tmp_path / "out"])


def test_refuses_a_checkpoint_below_lambda_one(tmp_path, capsys):
    _, ckpt = converted(tmp_path, lam=0.4)
    assert "is at λ=0.4" in bad(tmp_path, capsys, ckpt)


def test_refuses_an_unconverted_model(tmp_path, capsys):
    tiny_model().save_pretrained(tmp_path / "plain")
    assert "not a bitft checkpoint" in bad(tmp_path, capsys, tmp_path / "plain")


def test_refuses_out_features_not_divisible_by_4(tmp_path, capsys):
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=130, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    _, ckpt = converted(tmp_path, config=AutoModelForCausalLM.from_config(cfg))
    assert "not divisible by 4" in bad(tmp_path, capsys, ckpt)


def lora_checkpoint(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, ckpt = converted(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(ckpt)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    torch.manual_seed(3)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # a real update, not the zero init
    peft_model.save_pretrained(tmp_path / "adapter")
    return peft_model, tmp_path / "adapter"


def test_refuses_unmerged_lora_and_merges_on_request(tmp_path, tokens, capsys):
    peft_model, adapter = lora_checkpoint(tmp_path)
    capsys.readouterr()
    assert "--merge-lora" in bad(tmp_path, capsys, adapter)
    assert main(["export", str(adapter), "--packed", "--merge-lora", "-o", str(tmp_path / "packed")]) == 0
    merged = peft_model.merge_and_unload()  # master weights + LoRA, re-ternarized on the fly at λ=1
    with torch.no_grad():
        ours = merged(tokens).logits
    out = stock(tmp_path / "packed", tokens, tmp_path)
    assert torch.equal(out["logits"], ours)
