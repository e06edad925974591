"""bitft's bitnet.cpp exports (`--type i2_s`, the `bitnet-b1.58` graph), checked by bitnet.cpp itself.

bitnet.cpp (microsoft/BitNet) is built from ../shared/vendor/bitnet.cpp by its build.sh (once per machine,
cached; `make test`'s set-up does it first); these tests skip, saying so, only where that folder is absent.
Its binaries run as subprocesses: llama-tokenize (token ids), llama-perplexity (the perplexity, and with
--save-all-logits every scored position's log-probabilities, from which the next tokens are read).

Three tiny random λ=1 models whose linear rows are multiples of 128 but not all of 256 (I2_S's rule, not
TQ2_0's): a Llama, a BitNet b1.58 2B4T-shaped BitNet (relu², sub-norms, tied), and a 1bitLLM-shaped one
(SiLU, sub-norms under 1bitLLM's names). Each has random norms, sharp attention and a sharpened tied
head, so that a wrong layout, graph or rotary shows in the next tokens and the perplexity.
"""

import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SHARED, bitnet_reference, onebitllm_folder, with_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import bitft
import bitft.convert
from bitft.export.gguf import export_gguf
from bitft.export.gguf_i2s import dequantize_i2s
from bitft.gguf_header import read_header
from bitft.sources import load_model

pytestmark = pytest.mark.slow  # bitnet.cpp

DIMS = dict(vocab_size=49152, hidden_size=384, intermediate_size=640, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
CTX = 98  # llama-perplexity scores the second half of each window: positions 49..96, 48 a window
TEXTS = ("Hello world, this is BitNet.", "def f(x):\n    return x ** 2  # 1.58 bits",
         "3.14159 -- ünïcödé 我想 🦙\tand  double  spaces")
GRAPH = {"llama": "llama", "2b4t": "bitnet-b1.58", "1bitllm": "bitnet"}


@pytest.fixture(scope="session")
def bitnet_bin():
    script = SHARED / "vendor" / "bitnet.cpp" / "build.sh"
    if not script.is_file():
        pytest.skip(f"no bitnet.cpp source at {script.parent}: the tests that run bitnet.cpp need it")
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return Path(done.stdout.strip().splitlines()[-1])


def sharpen(ckpt: Path, head: float = 4.0, blocks: float = 8.0) -> None:
    """Scale a saved checkpoint's tied embedding (logits with a spread of a few units, not ~0.4) and each block's
    output projections (o_proj, down_proj: the blocks, not the embedding, then decide the next token)."""
    from safetensors.torch import load_file, save_file

    f = ckpt / "model.safetensors"
    state = load_file(f)
    for k in state:
        if k == "model.embed_tokens.weight" or k.endswith(("o_proj.weight", "down_proj.weight")):
            state[k] = state[k] * (head if "embed" in k else blocks)
    save_file(state, f, metadata={"format": "pt"})


def make(kind: str, root: Path, tokenizer_folder: Path) -> Path:
    """A bitft checkpoint (λ=1) of KIND, with a tokenizer; returns its folder."""
    src = root / f"{kind}-src"
    if kind == "llama":
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**DIMS, tie_word_embeddings=True)).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
                elif name.endswith(("q_proj.weight", "k_proj.weight")):
                    p.mul_(4.0)
        bitft.convert_model(model, lam=1.0).save_pretrained(src)
    elif kind == "2b4t":
        bitnet_reference(src, act="relu2", tie=True, **DIMS)
    else:
        bitnet_reference(root / "1bitllm-ref", act="silu", tie=True, **DIMS)
        onebitllm_folder(src, root / "1bitllm-ref")
    with_tokenizer(src, tokenizer_folder)
    ckpt = root / f"{kind}-ckpt"
    if kind == "llama":
        src.rename(ckpt)
    else:
        bitft.convert.convert_checkpoint(str(src), ckpt)
    sharpen(ckpt)
    return ckpt


def run(binary: Path, *args) -> str:
    done = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{binary.name} failed: {done.stderr[-3000:]}"
    return done.stdout + done.stderr


def tokenize(bin_dir: Path, gguf: Path, text: str) -> list[int]:
    out = run(bin_dir / "llama-tokenize", "-m", gguf, "-p", text, "--ids", "--no-bos", "--log-disable")
    return [int(x) for x in out.strip().splitlines()[-1].strip("[]").split(",") if x.strip()]


def perplexity(bin_dir: Path, gguf: Path, text: Path, logits: Path | None = None) -> float:
    extra = ["--save-all-logits", logits] if logits else []
    out = run(bin_dir / "llama-perplexity", "-m", gguf, "-f", text, "-c", CTX, "-b", CTX, "--chunks", 2, "-t", 2, *extra)
    return float(out.split("Final estimate: PPL = ")[1].split()[0])


def read_logits(path: Path):
    """(tokens [chunks, ctx], argmax of each scored position [chunks, ctx - 1 - ctx/2]) of a --save-all-logits file."""
    raw = path.read_bytes()
    assert raw[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = struct.unpack_from("<iii", raw, 8)
    tokens = np.frombuffer(raw, np.int32, n_chunk * n_ctx, 20).reshape(n_chunk, n_ctx)
    nv, scored = 2 * ((n_vocab + 1) // 2) + 4, n_ctx - 1 - n_ctx // 2
    codes = np.frombuffer(raw, np.uint16, n_chunk * scored * nv, 20 + 4 * tokens.size).reshape(n_chunk, scored, nv)
    return tokens, codes[:, :, 4: 4 + n_vocab].argmax(-1)  # (logit - min) / scale per position: the same argmax


@pytest.mark.parametrize("kind", ["llama", "2b4t", "1bitllm"])
def test_bitnet_cpp_runs_the_i2s_export_and_agrees(kind, bitnet_bin, smollm2_folder, tmp_path, capsys):
    ckpt = make(kind, tmp_path, smollm2_folder)
    rows = dict(export_gguf(ckpt, tmp_path / "m.gguf", qtype="i2_s"))
    assert rows["architecture"].startswith(GRAPH[kind] + ",") and "ternary I2_S tensors" in rows
    assert "I2_S fallback" not in rows and "bitnet.cpp" in rows["runs in"]
    export_gguf(ckpt, tmp_path / "f16.gguf", qtype="f16")
    tok = AutoTokenizer.from_pretrained(ckpt)
    for text in TEXTS:
        assert tokenize(bitnet_bin, tmp_path / "m.gguf", text) == tok(text, add_special_tokens=False).input_ids

    text = (Path(bitft.__file__).parent / "resources" / "eval" / "wikitext2_test.raw").read_text()[:4000]
    (tmp_path / "text.txt").write_text(text)
    ppl = perplexity(bitnet_bin, tmp_path / "m.gguf", tmp_path / "text.txt", tmp_path / "logits.bin")
    ppl_f16 = perplexity(bitnet_bin, tmp_path / "f16.gguf", tmp_path / "text.txt")
    tokens, theirs = read_logits(tmp_path / "logits.bin")
    assert tokens.ravel().tolist() == tok(text, add_special_tokens=False).input_ids[: tokens.size]  # as transformers

    meta = read_header(tmp_path / "m.gguf")[0]
    ids = torch.tensor(tokens, dtype=torch.long)
    if meta.get("tokenizer.ggml.add_bos_token"):  # llama-perplexity puts BOS in each window's first place
        ids[:, 0] = meta["tokenizer.ggml.bos_token_id"]
    model = load_model(str(ckpt)).model
    with torch.no_grad():
        logits = model(ids).logits[:, CTX // 2: CTX - 1].double()
    ours = logits.argmax(-1).numpy()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, CTX // 2 + 1:].flatten())
    ppl_ours = float(nll.exp())
    agree = (ours == theirs).mean()
    with capsys.disabled():
        print(f"\n{kind} in bitnet.cpp: I2_S next-token agreement with bitft {agree:.3f} over {ours.size} positions; "
              f"perplexity I2_S {ppl:.3f}, F16 {ppl_f16:.3f} ({ppl / ppl_f16 - 1:+.2%}), bitft {ppl_ours:.3f}")
    assert ours.size >= 48 and agree >= 0.9
    assert abs(ppl / ppl_f16 - 1) < 0.01
    assert abs(ppl / ppl_ours - 1) < 0.05  # the GGUF's F16 head and embeddings move sharp logits a little


def test_i2s_bytes_equal_bitnet_cpps_own_quantizer(bitnet_bin, smollm2_folder, tmp_path):
    """bitnet.cpp's llama-quantize (one thread: one scale a tensor) of bitft's F16 export gives the same codes
    as bitft's own I2_S writer, and the same scale up to the F16 file's rounding."""
    ckpt = make("llama", tmp_path, smollm2_folder)
    export_gguf(ckpt, tmp_path / "ours.gguf", qtype="i2_s")
    export_gguf(ckpt, tmp_path / "f16.gguf", qtype="f16")
    run(bitnet_bin / "llama-quantize", tmp_path / "f16.gguf", tmp_path / "theirs.gguf", "I2_S", 1)
    ours, theirs = ({t[0]: t for t in read_header(tmp_path / f, with_shapes=True)[1]} for f in ("ours.gguf", "theirs.gguf"))
    i2s = [name for name, t in ours.items() if t[1] == "I2_S"]
    assert len(i2s) == 14 and all(theirs[name][1] == "I2_S" for name in i2s)
    a, b = (np.memmap(tmp_path / f, dtype=np.uint8, mode="r") for f in ("ours.gguf", "theirs.gguf"))
    for name in i2s:
        _, _, n, nbytes, shape, off = ours[name]
        off2 = theirs[name][5]
        assert np.array_equal(a[off: off + n // 4], b[off2: off2 + n // 4]), name  # the codes, byte for byte
        s1, s2 = (float(np.frombuffer(x[o + n // 4: o + n // 4 + 4].tobytes(), np.float32)[0]) for x, o in ((a, off), (b, off2)))
        assert s1 == pytest.approx(s2, rel=1e-3)
        w = dequantize_i2s(a[off: off + nbytes], shape[::-1])
        assert set(np.unique(w / s1)) <= {-1.0, 0.0, 1.0}
