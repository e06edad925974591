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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def with_tokenizer(folder: Path, tokenizer_folder: Path) -> Path:
    """Copy a tokenizer (and its chat template) into FOLDER."""
    import shutil

    for f in TOKENIZER_FILES:
        if (tokenizer_folder / f).is_file():
            shutil.copy(tokenizer_folder / f, folder / f)
    return folder


def wide_llama(folder: Path, tokenizer_folder: Path):
    """A random λ=1 Llama whose widths are multiples of 256 (so every linear is TQ-packed), saved in
    FOLDER with the tokenizer of TOKENIZER_FOLDER (49152 entries, e.g. SmolLM2's). Returns the model."""
    import bitft

    cfg = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = bitft.convert_model(AutoModelForCausalLM.from_config(cfg).eval(), lam=1.0)
    model.save_pretrained(folder)
    with_tokenizer(folder, tokenizer_folder)
    return model
