"""`bitft eval --ppl`: window arithmetic, the NLL by hand, every kind of model, and refusals."""

import json
import math
import os

import pytest
import torch
from transformers import PreTrainedTokenizerFast

import bitft
from bitft.cli import main
from bitft.evaluate import TransformersBackend, perplexity, split_windows, token_windows
from helpers import DATA, cli_refuses, tiny_model, wide_llama

WIKITEXT = DATA / "eval" / "wikitext2_test.raw"


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (printable ASCII and newline): 98 ids, inside the tiny vocabulary."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["<unk>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>")


def tiny_folder_with_tokenizer(path, model=None):
    (model or tiny_model("llama")).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    """The first lines of WikiText-2 test (ASCII only, for the character tokenizer)."""
    lines = [ln for ln in WIKITEXT.read_text().splitlines()[:40] if ln.isascii()]
    path = tmp_path / "text.raw"
    path.write_text("\n".join(lines))
    return path


def run_json(capsys, argv) -> dict:
    capsys.readouterr()
    assert main([str(a) for a in argv] + ["--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def run_json_process(argv) -> dict:
    """`bitft ARGV --json` in a fresh process: what loads llama.cpp, so that a native crash fails one test."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import sys; from bitft.cli import main; sys.exit(main(sys.argv[1:]))",
                        *map(str, argv), "--json", "--no-progress"], capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PYTHONFAULTHANDLER="1"))
    assert r.returncode == 0, f"bitft {' '.join(map(str, argv))}: exit {r.returncode}\n{r.stderr[-4000:]}"
    return json.loads(r.stdout)


def test_windows_are_whole_non_overlapping_and_the_tail_is_dropped():
    ids = torch.arange(10)
    w = split_windows(ids, 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # token 9 is dropped
    assert split_windows(ids, 3, limit=2).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert split_windows(ids, 10).shape == (1, 10)
    with pytest.raises(ValueError, match="fewer than one window of 11"):
        split_windows(ids, 11)
    tok = char_tokenizer()
    assert token_windows(tok, "abcdefg", 3).tolist() == [tok("abc").input_ids, tok("def").input_ids]


def test_perplexity_is_exp_of_the_mean_nll_computed_by_hand():
    model = tiny_model("llama")
    torch.manual_seed(3)
    windows = torch.randint(0, 128, (3, 17))
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(w[None]).logits[0], -1)
            for t in range(16):  # position t predicts token t+1; the first token is never predicted
                total -= logp[t, w[t + 1]].item()
                count += 1
    assert count == 3 * 16
    assert perplexity(model, windows) == pytest.approx(math.exp(total / count), rel=1e-6)
    assert perplexity(TransformersBackend(model), windows) == pytest.approx(math.exp(total / count), rel=1e-6)


def test_cli_ppl_json_matches_the_library(tmp_path, capsys, text_file):
    folder = tiny_folder_with_tokenizer(tmp_path / "m")
    out = run_json(capsys, ["eval", folder, "--ppl", "--data", text_file, "--seqlen", 64, "--limit", 3])
    ppl = out["perplexity"]
    n = len(char_tokenizer()(text_file.read_text()).input_ids)
    assert ppl["windows"] == 3 and ppl["windows_available"] == n // 64 and ppl["text_tokens"] == n
    assert ppl["predicted_tokens"] == 3 * 63
    model = tiny_model("llama")
    expected = perplexity(model, token_windows(char_tokenizer(), text_file.read_text(), 64, 3))
    assert ppl["ppl"] == pytest.approx(expected, rel=1e-5)
    assert ppl["mean_nll"] == pytest.approx(math.log(expected), rel=1e-5)
    assert out["backend"] == "transformers" and out["what"].startswith("full precision")
    # the table form
    capsys.readouterr()
    assert main(["eval", str(folder), "--ppl", "--data", str(text_file), "--seqlen", "64", "--limit", "3",
                 "--no-progress"]) == 0
    assert f"{expected:.4f}" in capsys.readouterr().out


def test_converted_checkpoint_at_another_lambda_and_packed_export(tmp_path, capsys, text_file):
    """A λ=1 bitft checkpoint evaluated at λ=0 is the original model; its packed export is λ=1."""
    from bitft.export.packed import export_packed

    original = tiny_folder_with_tokenizer(tmp_path / "orig")
    ckpt = tiny_folder_with_tokenizer(tmp_path / "ckpt", bitft.convert_model(tiny_model("llama"), lam=1.0))
    args = ["--ppl", "--data", text_file, "--seqlen", 64, "--limit", 2]
    base = run_json(capsys, ["eval", original, *args])["perplexity"]["ppl"]
    at1 = run_json(capsys, ["eval", ckpt, *args])
    at0 = run_json(capsys, ["eval", ckpt, *args, "--lambda", 0])
    assert at1["what"] == "bitft checkpoint, λ=1" and at0["what"].startswith("bitft checkpoint, λ=0")
    assert at0["perplexity"]["ppl"] == base
    assert at1["perplexity"]["ppl"] != pytest.approx(base, rel=1e-3)

    export_packed(ckpt, tmp_path / "packed")
    char_tokenizer().save_pretrained(tmp_path / "packed")
    packed = run_json(capsys, ["eval", tmp_path / "packed", *args])
    assert packed["what"].startswith("packed BitNet, already ternary: 14 BitLinear layers at λ=1; scales exact on all")
    assert packed["perplexity"]["ppl"] == at1["perplexity"]["ppl"]  # unpacked to the same forward, bit for bit


def test_refusals(tmp_path, capsys, text_file):
    folder = tiny_folder_with_tokenizer(tmp_path / "m")
    err = cli_refuses(capsys, tmp_path, ["eval", folder, "--ppl", "--data", tmp_path / "missing.txt"])
    assert "missing.txt not found" in err and "--data" in err
    err = cli_refuses(capsys, tmp_path, ["eval", folder, "--ppl", "--data", text_file, "--seqlen", 100000])
    assert "fewer than one window of 100000" in err and "--seqlen" in err
    err = cli_refuses(capsys, tmp_path, ["eval", folder, "--ppl", "--data", text_file, "--seqlen", 512])
    assert "longer than the model's context (256 tokens)" in err
    err = cli_refuses(capsys, tmp_path, ["eval", folder, "--tasks", "arc_easy,mmlu"])
    assert "unknown task 'mmlu'" in err and "arc_easy" in err
    assert "nothing to evaluate" in cli_refuses(capsys, tmp_path, ["eval", folder])
    err = cli_refuses(capsys, tmp_path, ["eval", folder, "--ppl", "--data", text_file, "--lambda", 0.5])
    assert "not a bitft checkpoint" in err
    err = cli_refuses(capsys, tmp_path, ["eval", folder, "--ppl", "--data", text_file, "--lambda", 2])
    assert "--lambda must be in [0, 1]" in err
    err = cli_refuses(capsys, tmp_path, ["eval", folder, "--ppl", "--data", text_file, "--backend", "llama.cpp"])
    assert "takes a .gguf file" in err
    err = cli_refuses(capsys, tmp_path, ["eval", tmp_path / "nope", "--ppl", "--data", text_file])
    assert "not found" in err
    err = cli_refuses(capsys, tmp_path, ["eval", folder, "--ppl", "--data", text_file, "--limit", 0])
    assert "--limit must be a positive number" in err


# ----------------------------------------------------------------------------- GGUF and the real model

@pytest.fixture(scope="module")
def wide_gguf(tmp_path_factory, smollm2_folder):
    """A random λ=1 Llama (widths of 256, SmolLM2's tokenizer) and its GGUF export."""
    from bitft.export.gguf import export_gguf

    pytest.importorskip("llama_cpp")
    folder = tmp_path_factory.mktemp("wide") / "ckpt"
    wide_llama(folder, smollm2_folder)
    export_gguf(folder, folder.parent / "m.gguf", float_type="f32", tokenizer_pre="smollm")
    return folder, folder.parent / "m.gguf"


@pytest.mark.slow
def test_gguf_through_llama_cpp_matches_the_checkpoint(wide_gguf, tmp_path, capsys):
    folder, gguf = wide_gguf
    args = ["--ppl", "--data", WIKITEXT, "--seqlen", 128, "--limit", 2]
    ours = run_json(capsys, ["eval", folder, *args])
    theirs = run_json_process(["eval", gguf, *args])  # auto: llama.cpp
    deq = run_json(capsys, ["eval", gguf, *args, "--backend", "transformers"])
    assert theirs["backend"] == "llama.cpp" and deq["backend"] == "transformers"
    # same tokens (transformers' GGUF tokenizer) for every backend
    assert ours["perplexity"]["text_tokens"] == theirs["perplexity"]["text_tokens"] == deq["perplexity"]["text_tokens"]
    a, b, c = (r["perplexity"]["mean_nll"] for r in (ours, theirs, deq))
    print(f"mean NLL: checkpoint {a:.5f}, llama.cpp {b:.5f}, dequantized {c:.5f}")
    assert b == pytest.approx(a, abs=0.02) and c == pytest.approx(a, abs=0.02)
    err = cli_refuses(capsys, tmp_path, ["eval", gguf, *args, "--lambda", 0.5])
    assert "GGUF file" in err and "--lambda" in err
    # the harness's tasks through llama.cpp too
    tasks = ["--tasks", "piqa", "winogrande", "--limit", 6]
    ours, theirs = run_json(capsys, ["eval", folder, *tasks]), run_json_process(["eval", gguf, *tasks])
    assert theirs["backend"] == "llama.cpp"
    for name in ("piqa", "winogrande"):
        assert ours["tasks"][name]["n"] == theirs["tasks"][name]["n"] == 6
        assert 0 <= theirs["tasks"][name]["acc"] <= 1


@pytest.mark.smollm2
def test_smollm2_wikitext_ppl_near_the_reference(smollm2):
    """Reference (shared/data/README.md): 8 windows 19.26, 40 windows 20.57; the first 2 give 19.02."""
    model, tokenizer = smollm2
    ppl = perplexity(model, token_windows(tokenizer, WIKITEXT.read_text(), 2048, 2))
    print(f"SmolLM2 fp32, 2 windows of 2048: {ppl:.4f}")
    assert ppl == pytest.approx(19.02, abs=0.05)


@pytest.mark.smollm2
def test_smollm2_gguf_llama_cpp_agrees_with_transformers(smollm2_gguf, smollm2_folder, capsys):
    """smollm2_folder is the GGUF dequantized by transformers (bitft.sources.load_gguf, saved once per machine):
    the same weights as `bitft eval GGUF --backend transformers` (tested on a small GGUF above), without a
    second dequantization of SmolLM2."""
    pytest.importorskip("llama_cpp")
    args = ["--ppl", "--seqlen", 512, "--limit", 1]
    cpp = run_json_process(["eval", smollm2_gguf, *args])["perplexity"]["ppl"]
    hf = run_json(capsys, ["eval", smollm2_folder, *args])["perplexity"]["ppl"]
    print(f"SmolLM2 Q4_1 GGUF, 1 window of 512: llama.cpp {cpp:.4f}, transformers (dequantized fp32) {hf:.4f}")
    assert cpp == pytest.approx(hf, rel=0.02)
