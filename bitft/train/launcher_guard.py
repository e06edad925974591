"""Keep `accelerate launch`'s simple launcher from killing a run while it writes its stop checkpoint.

accelerate 1.16 gave its simple launcher (one process without torchrun: `--cpu`, one GPU, the demo)
a SIGTERM handler (`accelerate/commands/launch.py`: `_run_subprocess` -> `_terminate_process_tree`):
it sends SIGTERM to the worker's process tree, waits 5 s, then SIGKILLs what is alive. A checkpoint
that takes longer than 5 s (SmolLM2 already does on a CPU) was lost, and the relaunch started again.

The worker cannot catch SIGKILL, so it keeps the launcher from sending it:
- `LauncherGuard.start()`, when the parent is that launcher (its command line runs accelerate's
  `launch`, the worker has no torchrun environment, and the installed accelerate has the killing
  function), starts a watcher process (this file run as a script: LAUNCHER WORKER). It
  ignores the catchable signals and waits on a pidfd for the worker's exit, then sends SIGCONT to the
  launcher and exits. It is started before any signal can come, so no signal can race its set-up.
- `hold()`, called by the preemption handler on the first signal, sends SIGSTOP to the launcher. Its
  5 s countdown is frozen while the step ends and the checkpoint is written; when the worker has
  exited (75), the watcher continues it: the launcher finds the worker gone and exits 128 + 15 with
  nothing left to kill. A worker that dies any other way is continued after the same way.
The time the checkpoint may take is then the sender's grace period (SLURM's KillWait, Kubernetes'
terminationGracePeriodSeconds), as with any other launcher. While the launcher is stopped, the worker's
stderr (piped through it) can hold 64 KiB: the stop writes a few lines.
torchrun's agent (multi-process, DeepSpeed) sends SIGTERM and waits 30 s before SIGKILL: not guarded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def _simple_launcher_pid() -> int | None:
    """The pid of the accelerate simple launcher that started this process, or None."""
    if any(k.startswith("TORCHELASTIC_") for k in os.environ) or not hasattr(os, "pidfd_open"):
        return None
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    cli = any(os.path.basename(a) == "accelerate" for a in argv) and "launch" in argv
    module = any(a == "accelerate.commands.launch" or a.endswith("accelerate/commands/launch.py") for a in argv)
    if not (cli or module):
        return None
    try:
        from accelerate.commands import launch
    except Exception:
        return None
    return parent if hasattr(launch, "_terminate_process_tree") else None


class LauncherGuard:
    """Stops accelerate's simple launcher for the duration of a preemption stop (see the module docstring)."""

    def __init__(self):
        self.launcher: int | None = None
        self.watcher: subprocess.Popen | None = None
        self.held = False

    def start(self) -> "LauncherGuard":
        self.launcher = _simple_launcher_pid()
        if self.launcher is not None:
            self.watcher = subprocess.Popen(  # this file as a script: no package import
                [sys.executable, os.path.abspath(__file__), str(self.launcher), str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        return self

    def hold(self) -> bool:
        """SIGSTOP the launcher (once); True when it was held."""
        if self.launcher is None or self.held or self.watcher is None or self.watcher.poll() is not None:
            return False
        try:
            os.kill(self.launcher, signal.SIGSTOP)
        except ProcessLookupError:
            return False
        self.held = True
        return True


def _watch(launcher: int, worker: int) -> None:
    """Wait for WORKER to exit, then continue LAUNCHER (harmless when it was never stopped)."""
    import select

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)
    try:
        fd = os.pidfd_open(worker)
    except ProcessLookupError:
        fd = None
    if fd is not None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.poll()  # readable once the worker has exited (a zombie included)
    try:
        os.kill(launcher, signal.SIGCONT)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    _watch(int(sys.argv[1]), int(sys.argv[2]))
