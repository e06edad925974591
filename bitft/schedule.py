"""λ schedules: how fast a model moves from full precision (λ=0) to ternary (λ=1) during training.

With s = optimizer steps completed before the current one and W = warmup_steps:

    linear     λ(s) = min(s / W, 1)
    sigmoid    λ(s) = (σ(k·(s/W − ½)) − σ(−k/2)) / (σ(k/2) − σ(−k/2))  for s < W, else 1
               (the logistic curve of slope k, shifted and scaled so that λ(0) = 0 exactly and
               λ(W) = 1 exactly; large k is a late, sudden switch, small k tends to linear)
    constant   λ(s) = value

W = 0 means no warmup: λ is 1 from the first step (linear, sigmoid).

`LambdaCallback` applies the schedule with `bitft.set_lambda` once per optimizer step, in
`on_step_begin`, which the Trainer calls once before the micro-batches of an optimizer step (never
per micro-batch), and reports the λ it applied through `log_extras` (see bitft.training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainerCallback

from bitft.bitlinear import check_lambda
from bitft.surgery import set_lambda

SCHEDULES = ("linear", "sigmoid", "constant")


@dataclass(frozen=True)
class LambdaSchedule:
    kind: str = "linear"
    warmup_steps: int = 1000
    k: float = 10.0  # sigmoid slope
    value: float = 1.0  # constant λ

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown λ schedule {self.kind!r}: choose one of {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0:
            raise ValueError(f"lambda warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.kind == "sigmoid" and not self.k > 0:
            raise ValueError(f"the sigmoid λ schedule needs a slope k > 0, got {self.k}")
        check_lambda(self.value)

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.kind == "constant":
            return float(self.value)
        if self.warmup_steps == 0 or step >= self.warmup_steps:
            return 1.0
        x = step / self.warmup_steps
        if self.kind == "linear":
            return x
        sig = lambda t: 1.0 / (1.0 + math.exp(-t))  # noqa: E731
        lo, hi = sig(-self.k / 2), sig(self.k / 2)
        return min(max((sig(self.k * (x - 0.5)) - lo) / (hi - lo), 0.0), 1.0)

    def describe(self) -> str:
        if self.kind == "constant":
            return f"constant λ={self.value:g}"
        extra = f", k={self.k:g}" if self.kind == "sigmoid" else ""
        return f"{self.kind} λ warmup over {self.warmup_steps} steps{extra}"


@dataclass
class LambdaArguments:
    # λ: 0 = full precision, 1 = ternary; set on every BitLinear once per optimizer step
    lambda_schedule: str = field(default="linear", metadata={"help": "linear, sigmoid or constant"})
    lambda_warmup_steps: int = field(default=1000, metadata={"help": "optimizer steps until λ reaches 1"})
    lambda_k: float = field(default=10.0, metadata={"help": "slope of the sigmoid schedule"})
    lambda_value: float = field(default=1.0, metadata={"help": "λ of the constant schedule"})

    def schedule(self) -> LambdaSchedule:
        return LambdaSchedule(self.lambda_schedule, self.lambda_warmup_steps, self.lambda_k, self.lambda_value)


def lambda_at(step: int, kind: str = "linear", warmup_steps: int = 1000, k: float = 10.0, value: float = 1.0) -> float:
    """λ after `step` completed optimizer steps."""
    return LambdaSchedule(kind, warmup_steps, k, value)(step)


class LambdaCallback(TrainerCallback):
    """Set λ on every BitLinear at the start of each optimizer step; report it in the logs."""

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


def plot_schedules(schedules, steps: int, path) -> None:
    """Draw λ(step) for each LambdaSchedule over `steps` optimizer steps into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    xs = list(range(steps + 1))
    for s in schedules:
        ax.plot(xs, [s(x) for x in xs], label=s.describe())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("λ  (0 = full precision, 1 = ternary)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
