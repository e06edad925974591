"""Plain helpers shared by the tests (importable as `helpers`: pyproject sets pytest's pythonpath).

Two conftest.py files exist (tests/ and tests/recipes/), so test modules import from here, never
from `conftest`, whose name is ambiguous.
"""

from __future__ import annotations

import os
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
