"""Preemption: a signal becomes a complete checkpoint at the end of the current optimizer step and an
exit that says "requeue me".

- `PreemptionCallback(signals)` installs its handlers when created (before the model loads). A
  handler only records the signal and writes one line to fd 2, never through `logging` (a signal
  that lands while the process writes to stderr would make that a reentrant call). Before training
  begins there is nothing to save: it raises `Preempted` at once (one line). A second signal while
  stopping is counted and ignored. Under accelerate's simple launcher, which SIGKILLs its worker 5 s
  after forwarding SIGTERM (accelerate >= 1.16), the first signal also holds the launcher until this
  process has exited (launcher_guard.py), so a checkpoint may take the sender's whole grace period.
- `on_step_end` (after the optimizer step): every process all-reduces (MAX) the signal it
  received, one integer per optimizer step, so all ranks stop after the same step even when the
  signal reached them at different moments. Then `should_save` + `should_training_stop`: the
  Trainer writes its ordinary checkpoint (`CheckpointMarker` marks it complete) and leaves the loop.
- `train()` (trainer.py) then raises `Preempted`: exit status 75 (EX_TEMPFAIL, "try again").
  Relaunching the same command resumes from that checkpoint like from any other. The handlers are
  given back when training ends (after the last step a signal has its usual effect), except after a
  stop: then they keep ignoring further signals until `run_main` has printed the stop's line (a
  signal arriving between the save and the exit would otherwise kill the process with the line
  unprinted and exit -15 instead of 75).
"""

from __future__ import annotations

import logging
import os
import signal
import time

import torch
from transformers import TrainerCallback

from bitft.errors import ConfigError, Preempted
from bitft.train.launcher_guard import LauncherGuard

logger = logging.getLogger("bitft")

REQUEUE_EXIT = Preempted.exit_code  # 75, sysexits EX_TEMPFAIL: a temporary failure, run the same command again


def _say(message: str) -> None:
    """One WARNING line on stderr from a signal handler: a single unbuffered write, no lock taken."""
    line = f"{time.strftime('%H:%M:%S')} WARNING bitft: {message}\n".encode()
    try:
        os.write(2, line)
    except OSError:  # stderr closed: the line is also in the stop's message
        pass


def parse_signals(names) -> list[signal.Signals]:
    """['SIGTERM', 'USR1', '10'] -> signals; one clear line for a name that is not a catchable signal."""
    out = []
    for name in [names] if isinstance(names, str) else names or []:
        text = str(name).strip().upper()
        try:
            sig = signal.Signals(int(text)) if text.isdigit() else signal.Signals[text if text.startswith("SIG") else "SIG" + text]
        except (KeyError, ValueError):
            raise ConfigError(f"preempt_signals: {name!r} is not a signal name (use e.g. SIGTERM, SIGUSR1)") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(f"preempt_signals: {sig.name} cannot be caught; use SIGTERM or SIGUSR1")
        out.append(sig)
    return out


class PreemptionCallback(TrainerCallback):
    """Stop after the current optimizer step on any of SIGNALS, with a checkpoint of that step."""

    def __init__(self, signals=("SIGTERM", "SIGUSR1")):
        self.signals = parse_signals(signals)
        self.received: signal.Signals | None = None  # the first signal this process got
        self.received_at: float | None = None
        self.phase = "before"  # "training" from on_train_begin; on_train_end gives the handlers back
        self.stopped_at: int | None = None  # the step saved, once all ranks agreed to stop
        self.step_ended_at: float | None = None
        self.ignored = 0  # further signals while stopping
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        self.guard = LauncherGuard().start() if self.signals else None  # accelerate >= 1.16's simple launcher
        if self.signals:
            logger.info("on %s: checkpoint after the current optimizer step, then exit %d (requeue)",
                        " or ".join(s.name for s in self.signals), REQUEUE_EXIT)

    def _handle(self, signum, frame):
        """Record the signal. No logging here: a handler that writes through sys.stderr while the
        interrupted code is inside a write to it raises "reentrant call"; one os.write is safe."""
        sig = signal.Signals(signum)
        if self.received is not None:
            self.ignored += 1
            _say(f"{sig.name} received while stopping on {self.received.name}: ignored, the checkpoint is being written")
            return
        self.received, self.received_at = sig, time.time()
        if self.guard is not None and self.guard.hold():
            _say(f"{sig.name}: accelerate's launcher is held (stopped) until this process exits, so that it cannot "
                 "kill the checkpoint 5 s after forwarding the signal")
        if self.phase == "before":
            stop = Preempted(f"{sig.name} before the first optimizer step of this launch: nothing new to save; "
                             "relaunch the same command to start (or resume) the run")
            stop.restore = self.restore
            raise stop
        _say(f"{sig.name} received: finishing this optimizer step, then saving a checkpoint and exiting")

    def on_train_begin(self, args, state, control, **kwargs):
        self.phase = "training"

    def on_step_end(self, args, state, control, **kwargs):
        code = torch.tensor([int(self.received or 0)], device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and args.world_size > 1:
            torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MAX)
        if code.item():
            if self.received is None:  # another rank got it; this one stops with it
                self.received, self.received_at = signal.Signals(int(code.item())), time.time()
            self.stopped_at, self.step_ended_at = state.global_step, time.time()
            control.should_save = True
            control.should_evaluate = False  # the grace period is for the checkpoint
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.stopped_at is None:
            self.restore()  # after the last step: the usual action; after a stop: see raise_if_preempted

    def restore(self) -> None:
        """Give the signals back the handlers they had (also when the recipe runs inside another program)."""
        for sig, handler in self.previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def restore_signals(trainer) -> None:
    """Give the handlers back, unless the run stopped on a signal (then `Preempted.restore` does, once reported)."""
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, PreemptionCallback) and cb.stopped_at is None:
            cb.restore()


def raise_if_preempted(trainer) -> None:
    """After trainer.train(): the one line and exit status of a run stopped by a signal."""
    cb = next((c for c in trainer.callback_handler.callbacks if isinstance(c, PreemptionCallback)), None)
    if cb is None or cb.stopped_at is None:
        return
    ckpt = f"{trainer.args.output_dir}/checkpoint-{cb.stopped_at}"
    now = time.time()
    took = (f" {now - cb.received_at:.1f} s after the signal (the step ended after {cb.step_ended_at - cb.received_at:.1f} s, "
            f"the checkpoint took {now - cb.step_ended_at:.1f} s)")
    again = f"; {cb.ignored} later signal(s) ignored" if cb.ignored else ""
    stop = Preempted(f"{cb.received.name}: stopped after optimizer step {cb.stopped_at}, checkpoint {ckpt} complete{took}{again}; "
                     f"exit status {REQUEUE_EXIT} (requeue): relaunch the same command to resume")
    stop.restore = cb.restore  # called by run_main after the line is printed (or by a caller that catches it)
    raise stop
