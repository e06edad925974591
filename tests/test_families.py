"""bitft.families: every ternary family is recognized, loaded strictly, and computes its true forward.

- strict loading: a checkpoint with one extra and one missing tensor is refused, naming both;
- 1bitLLM (`BitnetForCausalLM`, inner_attn_ln / ffn_layernorm): bitft's λ=1 forward equals transformers'
  BitNetForCausalLM (SiLU, online quantization) to float32 rounding; no remote code runs;
- packed (HF1BitLLM-style bf16 scales, and bitft's own --packed output): unpacked master weights whose λ=1
  forward equals stock transformers' packed forward bit for bit;
- BitNet with master weights (2B4T-bf16 shape, relu²): as before;
- convert of an already-ternary model says so and writes λ=1; λ<1 is refused in one line.
"""

from __future__ import annotations

import json

import pytest
import torch
import helpers
from helpers import bitnet_reference, cli_refuses, hf1bitllm_folder, llama_cpp_run, onebitllm_folder, tiny_model
from safetensors.torch import load_file, save_file

import bitft
import bitft.convert
from bitft.errors import BitftError
from bitft.families import ONEBITLLM, PACKED, master_weight, recognize
from bitft.sources import load_model

IDS = torch.tensor([[1, 5, 9, 33, 64, 100, 127, 2, 17, 80, 3, 45]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def stock_logits(folder, tmp_path):
    """Logits of FOLDER loaded by stock transformers in a process that never imports bitft."""
    return helpers.stock_logits(folder, IDS, tmp_path)


def test_unused_and_missing_tensors_are_refused_naming_them(tmp_path, capsys):
    folder = tmp_path / "src"
    tiny_model("llama").save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    state["model.layers.1.self_attn.extra_ln.weight"] = torch.ones(64)
    del state["model.layers.0.mlp.down_proj.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BitftError) as e:
        load_model(str(folder))
    msg = str(e.value)
    assert "model.layers.{1}.self_attn.extra_ln.weight" in msg and "model.layers.{0}.mlp.down_proj.weight" in msg
    assert "full precision" in msg and "\n" not in msg
    # bitft convert takes the byte-copy path: an extra tensor alone is refused there too
    state["model.layers.0.mlp.down_proj.weight"] = torch.zeros(64, 128)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    err = cli_refuses(capsys, tmp_path, ["convert", folder, "--output", tmp_path / "out"])
    assert "model.layers.{1}.self_attn.extra_ln.weight" in err and "1 checkpoint tensors it would drop" in err


@pytest.fixture
def onebitllm(tmp_path):
    ref = bitnet_reference(tmp_path / "reference")
    return onebitllm_folder(tmp_path / "1bitllm", tmp_path / "reference"), ref


def test_1bitllm_equals_the_true_forward(onebitllm):
    folder, ref = onebitllm
    assert recognize(json.loads((folder / "config.json").read_text())) is ONEBITLLM
    loaded = load_model(str(folder))  # its modeling_bitnet.py raises if executed
    assert loaded.family == ONEBITLLM.name and bitft.get_lambda(loaded.model) == 1.0
    assert len(loaded.model.config.bitft["modules"]) == 14 and loaded.model.config.hidden_act == "silu"
    ours, want = logits(loaded.model), logits(ref)
    assert (ours - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(ours.argmax(-1), want.argmax(-1))
    # the old bug: the same folder read as a plain Llama (sub-norms dropped) is far off; the test can tell
    from transformers import LlamaForCausalLM

    plain = LlamaForCausalLM.from_pretrained(folder)
    bitft.convert_model(plain, lam=1.0)
    assert (logits(plain) - want).abs().max() > 100 * (ours - want).abs().max()


def test_convert_of_a_ternary_model_says_so_and_refuses_lambda_below_1(onebitllm, tmp_path, capsys):
    from bitft.cli import main

    folder, ref = onebitllm
    err = cli_refuses(capsys, tmp_path, ["convert", folder, "--output", tmp_path / "half", "--lambda", "0.5"])
    assert "already ternary" in err and "λ=0.5" in err
    assert main(["convert", str(folder), "--output", str(tmp_path / "out")]) == 0
    assert "is already ternary (1bitLLM BitNet): written as a bitft checkpoint at λ=1" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "bitnet" and cfg["bitft"]["lambda"] == 1.0 and "auto_map" not in cfg
    again = load_model(str(tmp_path / "out")).model
    assert torch.equal(logits(again), logits(load_model(str(folder)).model))


def test_master_weights_reproduce_codes_and_scale_exactly():
    from bitft.quant import packed_weight_scale, weight_codes

    torch.manual_seed(0)
    for zero_share in (0.05, 0.4, 0.8):  # including far more zeros than absmean itself would give
        codes = torch.randint(-1, 2, (96, 64), dtype=torch.int8) * (torch.rand(96, 64) > zero_share).to(torch.int8)
        # 1/(1/inv) of a float32 absmean: what bitft's --packed writes, always reproduced exactly
        for ws in (packed_weight_scale(1 / torch.tensor(0.0123)), packed_weight_scale(1 / torch.tensor(0.137))):
            m, err = master_weight(codes, ws)
            got, inv = weight_codes(m)
            assert torch.equal(got, codes) and packed_weight_scale(inv) == ws and err == 0
        # 7.3125 (a bf16 scale) is no float32's 1/(1/inv): the nearest is within one ulp
        m, err = master_weight(codes, torch.tensor(7.3125))
        assert torch.equal(weight_codes(m)[0], codes) and 0 < err < 1.2e-7


@pytest.mark.slow  # a fresh stock-transformers process
def test_hf1bitllm_packed_unpacks_to_the_exact_forward(tmp_path):
    folder = hf1bitllm_folder(tmp_path / "hf1bitllm")
    loaded = load_model(str(folder))
    assert loaded.family == PACKED.name and len(loaded.model.config.bitft["modules"]) == 14
    stock = stock_logits(folder, tmp_path)
    assert stock["linear_classes"] == ["BitLinear", "Linear"]  # transformers' packed class (+ lm_head)
    # arbitrary bf16 scales: exact where float32 absmean can give them, else one ulp off (the load says so)
    ours, want = logits(loaded.model), stock["logits"]
    print(f"HF1BitLLM-style: {loaded.what}; max |diff| {(ours - want).abs().max():.2e} of {want.abs().max():.2f}")
    assert "scales exact on" in loaded.what
    assert (ours - want).abs().max() <= 1e-6 * want.abs().max() and torch.equal(ours.argmax(-1), want.argmax(-1))
    # convert -> packed export -> stock transformers in a fresh process: bitft's λ=1 forward, bit for bit
    from bitft.export.packed import export_packed

    bitft.convert.convert_checkpoint(str(folder), tmp_path / "ckpt")
    export_packed(tmp_path / "ckpt", tmp_path / "repacked")
    again = stock_logits(tmp_path / "repacked", tmp_path)["logits"]
    assert torch.equal(again, logits(load_model(str(tmp_path / "ckpt")).model))


@pytest.mark.slow
def test_bitft_packed_export_round_trips_exactly(tmp_path):
    from bitft.export.packed import export_packed

    model = bitft.convert_model(tiny_model("llama"), lam=1.0)
    model.save_pretrained(tmp_path / "ckpt")
    export_packed(tmp_path / "ckpt", tmp_path / "packed")
    again = load_model(str(tmp_path / "packed"))
    assert again.family == PACKED.name
    assert torch.equal(logits(again.model), logits(model))
    # and back out: a packed export of the unpacked model is byte-identical in its ternary tensors
    bitft.convert.convert_checkpoint(str(tmp_path / "packed"), tmp_path / "unpacked")
    export_packed(tmp_path / "unpacked", tmp_path / "packed2")
    a, b = load_file(tmp_path / "packed" / "model.safetensors"), load_file(tmp_path / "packed2" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith(("proj.weight", "weight_scale")))


def test_bitnet_master_weights_load_as_before(tmp_path):
    ref = bitnet_reference(tmp_path / "2b4t", act="relu2", tie=True)
    loaded = load_model(str(tmp_path / "2b4t"))
    assert loaded.family == "BitNet (master weights)" and bitft.get_lambda(loaded.model) == 1.0
    ours, want = logits(loaded.model), logits(ref)
    assert (ours - want).abs().max() <= 1e-5 * want.abs().max()


def test_ternary_families_refuse_a_lambda_warmup(onebitllm):
    folder, _ = onebitllm
    with pytest.raises(BitftError, match=r"already ternary .*λ=0 has no meaning"):
        load_model(str(folder), lam=0.0, convert={"targets": None, "exclude": None, "subln": False})


@pytest.mark.slow  # llama.cpp
def test_1bitllm_runs_in_llama_cpps_bitnet_graph(tmp_path, smollm2_folder, capsys):
    """1bitLLM-shaped (SiLU, sub-norms, tied) -> bitft convert -> GGUF `bitnet` graph: llama.cpp's tokens and
    next tokens agree with bitft's λ=1 forward; the relu² variant is written for bitnet.cpp's bitnet-b1.58
    graph, which mainline refuses."""
    import numpy as np
    from helpers import WIDE, with_tokenizer
    from transformers import AutoTokenizer

    from bitft.export.gguf import export_gguf

    pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")
    wide = {k: v for k, v in WIDE.items()}
    bitnet_reference(tmp_path / "ref", tie=True, **wide)
    folder = with_tokenizer(onebitllm_folder(tmp_path / "1bitllm", tmp_path / "ref"), smollm2_folder)
    bitft.convert.convert_checkpoint(str(folder), tmp_path / "ckpt")
    rows = dict(export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", float_type="f32"))
    assert rows["architecture"].startswith("bitnet") and "ternary TQ2_0 tensors" in rows
    tok = AutoTokenizer.from_pretrained(folder)
    text = "Ternary weights 1.58 bits: café, naïve  spaces\tand 🦙\n42"
    ids = tok.encode(text)
    run = llama_cpp_run(tmp_path / "m.gguf", ids, [(text, False, False)])  # a fresh process: a crash fails this test
    assert run["tokens"][0] == ids
    theirs = run["logits"]
    model = load_model(str(tmp_path / "ckpt")).model
    ours = logits(model, torch.tensor([ids]))[0].numpy()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).mean()
    corr = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
    with capsys.disabled():
        print(f"1bitLLM-shaped in llama.cpp bitnet: next-token agreement {agree:.2f}, correlation {corr:.5f}")
    assert agree >= 0.9 and corr > 0.999

    relu2 = tmp_path / "relu2"
    bitnet_reference(relu2, act="relu2", tie=True, **wide)
    with_tokenizer(relu2, smollm2_folder)
    bitft.convert.convert_checkpoint(str(relu2), tmp_path / "relu2-ckpt")
    rows = dict(export_gguf(tmp_path / "relu2-ckpt", tmp_path / "r.gguf"))  # for bitnet.cpp: mainline has no relu²
    assert rows["architecture"].startswith("bitnet-b1.58,") and "bitnet.cpp" in rows["runs in"]
    from bitft.llamacpp import open_gguf

    with pytest.raises(ValueError):  # mainline llama.cpp does not know the graph (bitnet.cpp runs it: test_bitnet_cpp.py)
        open_gguf(tmp_path / "r.gguf", n_ctx=64, verbose=False)


def test_gguf_export_of_an_untied_bitnet_is_refused_before_any_tensor_is_quantized(onebitllm, tmp_path, capsys,
                                                                                  monkeypatch):
    """llama.cpp's bitnet graph has no output tensor: an lm_head of its own is refused up front, nothing written."""
    import bitft.export.gguf as gguf_export

    folder, _ = onebitllm  # random lm_head, untied
    bitft.convert.convert_checkpoint(str(folder), tmp_path / "ckpt")
    monkeypatch.setattr(gguf_export, "ternarize", lambda t: pytest.fail("quantized before the refusal"))
    err = cli_refuses(capsys, tmp_path, ["export", tmp_path / "ckpt", "--gguf", "--output", tmp_path / "m.gguf"])
    assert "has its own lm_head" in err and "--packed" in err
    assert not list(tmp_path.glob("*m.gguf*"))


def test_subln_bitnet_placement_makes_a_llama_a_bitnet(tmp_path, capsys):
    """--subln bitnet: two sub-norms per block (before o_proj and down_proj), the model a BitNetForCausalLM
    with SiLU that reloads, trains as usual and loads in stock transformers' BitNet (online) to rounding."""
    from bitft.cli import main

    src = tmp_path / "llama"
    tiny_model("llama").save_pretrained(src)
    assert main(["convert", str(src), "-o", str(tmp_path / "out"), "--subln", "bitnet"]) == 0
    assert "bitnet (before o_proj and down_proj" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["BitNetForCausalLM"] and cfg["hidden_act"] == "silu" and not cfg["bitft"]["subln"]
    keys = set(load_file(tmp_path / "out" / "model.safetensors"))
    assert {f"model.layers.{i}.{n}.weight" for i in (0, 1) for n in ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm")} <= keys
    ours = load_model(str(tmp_path / "out"))
    assert ours.family == "bitft checkpoint" and len(ours.model.config.bitft["modules"]) == 14
    # with norms of weight 1 the model is a Llama with RMSNorm(x) fed to o_proj and down_proj
    with torch.no_grad():
        for n, p in ours.model.named_parameters():
            if "sub_norm" in n:
                p.uniform_(0.5, 1.5)
    ours.model.save_pretrained(tmp_path / "trained")
    # a fresh process of stock transformers (no bitft) sees transformers' BitNet with AutoBitLinear
    stock = stock_logits(tmp_path / "trained", tmp_path)
    want = logits(load_model(str(tmp_path / "trained")).model)
    assert (stock["logits"] - want).abs().max() <= 1e-4 * want.abs().max()
    with pytest.raises(BitftError, match="not a Llama"):
        bitft.convert.convert_checkpoint(str(_qwen(tmp_path)), tmp_path / "q", subln="bitnet")


def _qwen(tmp_path):
    tiny_model("qwen2").save_pretrained(tmp_path / "qwen2")
    return tmp_path / "qwen2"


@pytest.mark.slow  # llama.cpp
def test_llama_with_bitnet_subln_exports_to_the_bitnet_graph(tmp_path, smollm2_folder):
    import numpy as np
    from helpers import wide_config, with_tokenizer
    from transformers import AutoModelForCausalLM

    from bitft.export.gguf import export_gguf

    pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(wide_config("llama")).save_pretrained(tmp_path / "llama")
    bitft.convert.convert_checkpoint(str(tmp_path / "llama"), tmp_path / "ckpt", subln="bitnet")
    model = load_model(str(tmp_path / "ckpt")).model
    with torch.no_grad():  # "trained" sub-norms, so that a misplaced or dropped one shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "trained")
    with_tokenizer(tmp_path / "trained", smollm2_folder)
    export_gguf(tmp_path / "trained", tmp_path / "m.gguf", float_type="f32")
    ids = list(range(100, 140))
    theirs = llama_cpp_run(tmp_path / "m.gguf", ids)["logits"]
    ours = logits(model, torch.tensor([ids]))[0].numpy()
    agree, corr = (ours.argmax(-1) == theirs.argmax(-1)).mean(), np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
    print(f"Llama + subln bitnet in llama.cpp bitnet: next-token agreement {agree:.2f}, correlation {corr:.5f}")
    assert agree >= 0.9 and corr > 0.999


@pytest.mark.slow  # fresh stock-transformers processes
@pytest.mark.parametrize("family", ["1bitllm", "2b4t"])
def test_ternary_family_convert_packed_export_runs_in_stock_transformers(family, tmp_path):
    """convert -> --packed -> stock transformers in a fresh process: bitft's λ=1 forward, bit for bit."""
    from bitft.export.packed import export_packed

    if family == "1bitllm":
        bitnet_reference(tmp_path / "ref")
        src = onebitllm_folder(tmp_path / "src", tmp_path / "ref")
    else:
        src = tmp_path / "src"
        bitnet_reference(src, act="relu2", tie=True)
    bitft.convert.convert_checkpoint(str(src), tmp_path / "ckpt")
    export_packed(tmp_path / "ckpt", tmp_path / "packed")
    stock = stock_logits(tmp_path / "packed", tmp_path)
    assert "BitLinear" in stock["linear_classes"]
    assert torch.equal(stock["logits"], logits(load_model(str(tmp_path / "ckpt")).model))
