"""Draw λ schedules as a PNG and print λ at a few steps.

    python scripts/plot_schedule.py --steps 1500 --warmup_steps 1000 --k 10 --output lambda.png

Draws linear and sigmoid (slope k, and k/2, 2k for comparison) over `--steps` optimizer steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitft.schedule import LambdaSchedule, plot_schedules  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps on the x axis")
    p.add_argument("--warmup_steps", type=int, default=1000, help="steps until λ reaches 1")
    p.add_argument("--k", type=float, default=10.0, help="sigmoid slope")
    p.add_argument("--output", default="lambda_schedules.png", help="PNG to write")
    a = p.parse_args(argv)
    schedules = [LambdaSchedule("linear", a.warmup_steps)] + [
        LambdaSchedule("sigmoid", a.warmup_steps, k=k) for k in (a.k / 2, a.k, 2 * a.k)]
    plot_schedules(schedules, a.steps, a.output)
    marks = sorted({0, a.warmup_steps // 4, a.warmup_steps // 2, 3 * a.warmup_steps // 4, a.warmup_steps})
    width = max(len(s.describe()) for s in schedules)
    print(f"{'step':<{width}}  " + "  ".join(f"{m:>6}" for m in marks))
    for s in schedules:
        print(f"{s.describe():<{width}}  " + "  ".join(f"{s(m):6.3f}" for m in marks))
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
