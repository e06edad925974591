"""A checkpoint from the block-wise phase (bitft.train.blockwise, with and without the learned equalization)
exports like any bitft checkpoint: packed, stock transformers gives bitft's logits and greedy tokens bit
for bit; GGUF TQ2_0, llama.cpp agrees as closely as for a converted model (tests/test_export_gguf.py).

The phase changes the master weights and, with block_equalize, the norms and the v/up rows; what could break
an export is a leftover of the training (a parametrization in the state dict, a scale not folded back)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from bitft.cli import main
from bitft.config import BlockwiseArguments
from bitft.export.gguf import export_gguf
from bitft.train.blockwise import reconstruct
from helpers import wide_model
from test_blockwise import args
from test_export_gguf import compare, llama_logits
from test_export_packed import stock

pytestmark = pytest.mark.slow  # stock transformers in another process, llama.cpp

PHASE = dict(block_steps=6, block_calibration_blocks=8, block_heldout_blocks=4, block_batch_size=4, block_eval_steps=3,
             block_patience=100, block_save_steps=0, block_learning_rate=3e-3)


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "equalized"])
def block_trained(request, tmp_path_factory, smollm2_folder):
    """A wide random Llama (every linear TQ2_0-packed) after the block phase, saved as a bitft checkpoint."""
    tmp = tmp_path_factory.mktemp("block-trained")
    model = wide_model("llama", tmp / "ckpt", smollm2_folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = torch.randint(0, 49152, (12, 32), generator=torch.Generator().manual_seed(0))
    summary = reconstruct(model, calib, BlockwiseArguments(**PHASE, block_equalize=request.param), args(tmp / "out"))
    assert len(summary["blocks"]) == 2
    state = model.state_dict()
    assert state.keys() == before.keys()  # nothing of the training left in the state dict
    assert not any(parametrize.is_parametrized(m) for m in model.modules())  # equalization folded, if on
    assert any(not torch.equal(state[k], before[k]) for k in state)
    model.eval().save_pretrained(tmp / "ckpt")
    return model, tmp / "ckpt"


def test_packed_export_is_bit_exact_in_stock_transformers(block_trained, tmp_path):
    model, ckpt = block_trained
    assert main(["export", str(ckpt), "--packed", "-o", str(tmp_path / "packed")]) == 0
    tokens = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    out = stock(tmp_path / "packed", tokens, tmp_path, new_tokens=8)
    with torch.no_grad():
        ours = model(tokens).logits
        greedy = model.generate(tokens, max_new_tokens=8, do_sample=False)[:, tokens.shape[1]:]
    assert torch.equal(out["logits"], ours) and torch.equal(out["greedy"], greedy)


def test_gguf_export_runs_in_llama_cpp_and_agrees(block_trained, tmp_path):
    model, ckpt = block_trained
    rows = dict(export_gguf(ckpt, tmp_path / "m.gguf", qtype="tq2_0", float_type="f32"))
    assert "ternary TQ2_0 tensors" in rows  # every linear packed, as for a converted model
    ids = list(range(100, 140))
    _, theirs = llama_logits(tmp_path / "m.gguf", ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    rel, agree, corr = compare(ours, theirs)
    print(f"block-trained, TQ2_0: max rel diff {rel:.3g}, argmax agree {agree:.2f}, corr {corr:.5f}")
    assert corr > 0.999 and agree >= 0.9 and rel < 0.05
