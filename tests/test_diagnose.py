"""`bitft diagnose`: each fake-quantization mode against an independent computation, block errors, refusal."""

import copy
import json

import pytest
import torch
import torch.nn as nn

import bitft
from bitft.cli import main
from bitft.diagnose import block_errors, diagnose, quantized
from bitft.evaluate import perplexity
from bitft.quant import quantize_weight
from helpers import cli_refuses, tiny_model
from test_evaluate import char_tokenizer, text_file, tiny_folder_with_tokenizer  # noqa: F401 (fixture)


@pytest.fixture
def windows():
    torch.manual_seed(3)
    return torch.randint(0, 128, (3, 32))


def converted(seed=0):
    model = tiny_model("llama", seed=seed)
    # a random model's weights are too small for int8 to matter: scale them into the range where it does
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return bitft.convert_model(copy.deepcopy(model), lam=0.0), model


def test_each_mode_equals_its_independent_computation(windows):
    model, original = converted()
    r = diagnose(model, windows)
    p = r["perplexity"]
    assert p["original"] == perplexity(original, windows)  # λ = 0 is the original model, bit for bit
    assert len({round(v, 6) for v in p.values()}) == len(p)  # every mode changes the function
    bitft.set_lambda(model, 1.0)
    assert p["W1.58A8"] == pytest.approx(perplexity(model, windows), rel=1e-6)  # the deployed forward
    bitft.set_lambda(model, 0.0)
    ternary = copy.deepcopy(original)  # weights only: plain nn.Linear on absmean-ternarized weights
    for m in ternary.modules():
        if isinstance(m, nn.Linear) and m is not ternary.lm_head:
            m.weight.data = quantize_weight(m.weight.data)
    assert p["W1.58A16"] == pytest.approx(perplexity(ternary, windows), rel=1e-5)
    assert r["kinds"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    q_only = copy.deepcopy(model)
    for name, m in bitft.surgery.bit_linears(q_only).items():
        m.lam = 1.0 if name.endswith("q_proj") else 0.0
    assert p["q_proj"] == pytest.approx(perplexity(q_only, windows), rel=1e-6)
    # the modes leave the model as they found it
    assert bitft.get_lambda(model) == 0.0 and all("forward" not in m.__dict__ for m in bitft.surgery.bit_linears(model).values())


def test_per_block_and_block_errors(windows):
    model, _ = converted()
    r = diagnose(model, windows, per_block=True)
    assert r["blocks"] == [0, 1] and {"block 0", "block 1"} <= set(r["perplexity"])
    e, acc = r["block_error"], r["accumulated_error"]
    assert e[0] == pytest.approx(acc[0], rel=1e-5)  # block 0 sees the same (full-precision) input either way
    assert all(x > 0 for x in e + acc)
    # e_1 by hand: block 1 alone ternary, positions ≥ 1, on block 0's full-precision output
    outs = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, k=k: outs.__setitem__(k, o[0] if isinstance(o, tuple) else o))
             for k, layer in enumerate(model.model.layers)]
    num = den = 0.0
    for w in windows:
        with torch.no_grad(), quantized(model, select=lambda _: False):
            model(w[None])
        fp = outs[1]
        with torch.no_grad(), quantized(model, select=lambda name: ".layers.1." in name):
            model(w[None])
        num += (outs[1][:, 1:] - fp[:, 1:]).pow(2).sum().item()
        den += fp[:, 1:].pow(2).sum().item()
    for h in hooks:
        h.remove()
    assert e[1] == pytest.approx(num / den, rel=1e-4)
    assert block_errors(model, windows) == (e, acc)  # deterministic


def test_cli_table_plot_and_json(tmp_path, capsys, text_file):  # noqa: F811
    folder = tiny_folder_with_tokenizer(tmp_path / "m")
    png = tmp_path / "d.png"
    argv = ["diagnose", folder, "--data", text_file, "--seqlen", 64, "--windows", 2, "--plot", png]
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert "W1.58A8" in out and "down_proj" in out and "worst kind of layer" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(a) for a in argv[:-2]] + ["--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["windows"] == [2, 64] and r["parameters"] == sum(p.numel() for p in tiny_model("llama").parameters())
    assert r["ppl_ratio"]["original"] == 1.0


def test_a_model_larger_than_memory_is_refused_before_loading(tmp_path, capsys, monkeypatch, text_file):  # noqa: F811
    import bitft.diagnose as d

    folder = tiny_folder_with_tokenizer(tmp_path / "m")
    monkeypatch.setattr(d, "available_memory", lambda: 2**20)
    monkeypatch.setattr("bitft.sources.load_model", lambda *a, **k: pytest.fail("loaded"))
    err = cli_refuses(capsys, tmp_path, ["diagnose", folder, "--data", text_file, "--seqlen", 64])
    assert "parameters" in err and "GiB available" in err and "larger machine" in err
