"""λ schedules: how fast a model moves from full precision (λ=0) to ternary (λ=1) during training.

With s = optimizer steps completed before the current one and W = warmup_steps:

    linear     λ(s) = min(s / W, 1)
    sigmoid    λ(s) = (σ(k·(s/W − ½)) − σ(−k/2)) / (σ(k/2) − σ(−k/2))  for s < W, else 1
               (the logistic curve of slope k, shifted and scaled so that λ(0) = 0 exactly and
               λ(W) = 1 exactly; large k is a late, sudden switch, small k tends to linear)
    constant   λ(s) = value

W = 0 means no warmup: λ is 1 from the first step (linear, sigmoid).

`bitft.train.callbacks.LambdaCallback` applies a schedule once per optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bitft.bitlinear import check_lambda

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
