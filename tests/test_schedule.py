"""λ schedules, and the callback that applies them once per optimizer step."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import Trainer, TrainingArguments

import bitft
from bitft.schedule import LambdaSchedule
from bitft.train.callbacks import LambdaCallback
from helpers import REPO, tiny_model


def test_linear():
    s = LambdaSchedule("linear", warmup_steps=4)
    assert [s(i) for i in range(7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert LambdaSchedule("linear", warmup_steps=1000)(500) == 0.5


@pytest.mark.parametrize("k", [0.5, 4.0, 10.0, 50.0, 200.0])
def test_sigmoid_starts_at_0_ends_at_1_and_rises(k):
    s = LambdaSchedule("sigmoid", warmup_steps=100, k=k)
    values = [s(i) for i in range(151)]
    assert values[0] == 0.0 and values[100] == 1.0 and values[150] == 1.0
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[50] == pytest.approx(0.5, abs=1e-12)  # symmetric about the middle
    assert all(0.0 <= v <= 1.0 for v in values)


def test_sigmoid_slope():
    early = 10
    gentle, steep = LambdaSchedule("sigmoid", 100, k=1.0), LambdaSchedule("sigmoid", 100, k=20.0)
    assert gentle(early) == pytest.approx(early / 100, abs=0.01)  # small k tends to linear
    assert steep(early) < 0.01  # large k: λ stays near 0, then switches late


def test_constant_and_no_warmup():
    assert LambdaSchedule("constant", value=0.3)(0) == 0.3 == LambdaSchedule("constant", value=0.3)(10**6)
    assert LambdaSchedule("linear", warmup_steps=0)(0) == 1.0
    assert LambdaSchedule("sigmoid", warmup_steps=0)(0) == 1.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="cosine"), "unknown λ schedule"),
    (dict(warmup_steps=-1), ">= 0"),
    (dict(kind="sigmoid", k=0), "slope"),
    (dict(kind="constant", value=1.5), r"\[0, 1\]"),
])
def test_bad_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LambdaSchedule(**kwargs)


class _Blocks(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, 128, (16,), generator=g)
        return {"input_ids": ids, "labels": ids}


def test_callback_sets_lambda_once_per_optimizer_step(tmp_path, monkeypatch):
    """With gradient accumulation 3, λ changes only between optimizer steps."""
    model = bitft.convert_model(tiny_model("llama"), lam=1.0)
    seen = []  # λ at every micro-batch forward
    model.register_forward_pre_hook(lambda m, a: seen.append(bitft.get_lambda(m)))
    calls = []
    import bitft.train.callbacks as sched

    real = sched.set_lambda
    monkeypatch.setattr(sched, "set_lambda", lambda m, v: calls.append(v) or real(m, v))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=2,
                             gradient_accumulation_steps=3, learning_rate=1e-3, use_cpu=True, report_to="none",
                             save_strategy="no", logging_steps=1, disable_tqdm=True)
    cb = LambdaCallback(LambdaSchedule("linear", warmup_steps=4))
    Trainer(model=model, args=args, train_dataset=_Blocks(), callbacks=[cb]).train()
    assert seen == [0.0] * 3 + [0.25] * 3 + [0.5] * 3 + [0.75] * 3 + [1.0] * 3
    assert calls == [0.0, 0.25, 0.5, 0.75, 1.0]  # once per change, never per micro-batch
    assert model.config.bitft["lambda"] == 1.0  # the config that checkpoints save follows λ


def test_plot_schedule_command_draws_every_schedule(tmp_path, capsys):
    from bitft.cli import main

    out = tmp_path / "schedules.png"
    assert main(["plot-schedule", "--steps", "200", "--warmup-steps", "100", "--k", "5", "20", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {out}" in capsys.readouterr().out
