"""Trainer callbacks of the recipes: λ once per optimizer step, tokens and tokens/s, a progress bar.

A callback with `log_extras(state) -> dict` adds those keys to every training log (console,
trainer_state.json, wandb alike): `BitftTrainerMixin.log` asks each callback.
"""

from __future__ import annotations

import time

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from bitft.schedule import LambdaSchedule
from bitft.surgery import set_lambda


class LambdaCallback(TrainerCallback):
    """Set λ on every BitLinear at the start of each optimizer step; report it in the logs.

    `on_step_begin` runs once before the micro-batches of an optimizer step, never per micro-batch."""

    def __init__(self, schedule: LambdaSchedule):
        self.schedule = schedule
        self.current: float | None = None

    def _apply(self, state, model) -> None:
        lam = self.schedule(state.global_step)
        if lam != self.current:
            set_lambda(model, lam)
            self.current = lam

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.current = None  # always set once: the model may come with another λ
        self._apply(state, model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)

    def log_extras(self, state) -> dict:
        return {} if self.current is None else {"lambda": self.current}


def ternary_lambda() -> LambdaCallback:
    """λ held at 1 and logged with every training log (SFT, DPO)."""
    return LambdaCallback(LambdaSchedule("constant", value=1.0))


class ThroughputCallback(TrainerCallback):
    """Tokens seen (the Trainer's own count, all processes; `include_num_input_tokens_seen`),
    tokens/s since the previous log, and `step_cpu_seconds`: this process's CPU time (all its threads)
    inside optimizer steps so far, evaluations and saving excluded. CPU time barely moves when other
    jobs share the machine, so runs compared by it need not run alone (scripts/recipe_study.py)."""

    def __init__(self):
        self._t = self._tokens = self._step_t = None
        self.step_cpu = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._t, self._tokens = time.perf_counter(), state.num_input_tokens_seen

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_t = time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_t is not None:
            self.step_cpu += time.process_time() - self._step_t
            self._step_t = None

    def log_extras(self, state) -> dict:
        now, tokens = time.perf_counter(), int(state.num_input_tokens_seen)
        out = {"tokens_seen": tokens, "step_cpu_seconds": round(self.step_cpu, 2)}
        if self._t is not None and tokens > self._tokens and now > self._t:
            out["tokens_per_second"] = round((tokens - self._tokens) / (now - self._t), 1)
        self._t, self._tokens = now, tokens
        return out


class TokenProgressCallback(ProgressCallback):
    """The Trainer's progress bar (steps), with the tokens seen and λ beside it."""

    def __init__(self, lambda_callback=None):
        super().__init__()
        self.lambda_callback = lambda_callback

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if self.training_bar is not None:
            post = {"tokens": f"{int(state.num_input_tokens_seen):,}"}
            if self.lambda_callback is not None and self.lambda_callback.current is not None:
                post["λ"] = f"{self.lambda_callback.current:.3f}"
            self.training_bar.set_postfix(post, refresh=False)


def install_progress(trainer, lambda_callback=None) -> None:
    """Swap the Trainer's progress bar for one that also shows tokens and λ."""
    if trainer.args.disable_tqdm:
        return
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(TokenProgressCallback(lambda_callback))
