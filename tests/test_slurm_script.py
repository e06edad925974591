"""scripts/slurm_warmup.sbatch's own logic, run by bash with SLURM's commands replaced by recorders
(no SLURM here): USR1 to the batch shell is forwarded to the step, the shell waits for the step's
end and requeues only a run that stopped; a run that finishes is not requeued."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO

SCRIPT = REPO / "scripts" / "slurm_warmup.sbatch"

# the training step: started with TERM and USR1 ignored (inherited), it installs its own handler as
# the recipe does, "saves" and exits 75 on USR1; `accelerate launch` then reports 1
WORKER = f"""#!{sys.executable}
import os, signal, sys, time
assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
log = os.environ["FAKE_LOG"]
stop = []
signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))
open(log + ".pid", "w").write(str(os.getpid()))
open(log, "a").write("launch " + " ".join(sys.argv[1:]) + "\\n")
for _ in range(int(os.environ.get("FAKE_STEPS", "100"))):
    time.sleep(0.05)
    if stop:
        time.sleep(0.5)  # the checkpoint
        open(log, "a").write("worker stopped\\n")
        sys.exit(1)
open(log, "a").write("worker finished\\n")
"""
FAKES = {
    "srun": '#!/bin/bash\necho "srun $*" >> "$FAKE_LOG"\nexec "${@: -3}"\n',  # bash -c "..."
    "scancel": '#!/bin/bash\necho "scancel $*" >> "$FAKE_LOG"\nkill -USR1 "$(cat "$FAKE_LOG.pid")"\n',
    "scontrol": '#!/bin/bash\nif [ "$1" = show ]; then echo node1; else echo "scontrol $*" >> "$FAKE_LOG"; fi\n',
    "accelerate": WORKER,
}


def run_script(tmp_path, steps, signal_after=None, sig=signal.SIGUSR1):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in FAKES.items():
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    log = tmp_path / "log"
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_STEPS=str(steps),
               SLURM_JOB_ID="77", SLURM_NNODES="2", SLURM_JOB_NODELIST="node[1-2]", SLURM_NODEID="0")
    proc = subprocess.Popen(["bash", str(SCRIPT)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    if signal_after is not None:
        while not (Path(str(log) + ".pid")).exists():
            time.sleep(0.01)
        time.sleep(signal_after)
        proc.send_signal(sig)  # SLURM: --signal=B:USR1@120, or SIGTERM on a preemption
    _, err = proc.communicate(timeout=60)
    return proc.returncode, log.read_text().splitlines(), err


def test_usr1_is_forwarded_and_the_job_requeued(tmp_path):
    status, log, err = run_script(tmp_path, steps=400, signal_after=0.3)
    assert status == 1, err
    assert log[0] == "srun --kill-on-bad-exit=0 bash -c " + log[0].split("bash -c ", 1)[1]
    assert "--num_machines 2 --num_processes 16" in log[1] and "--gradient_accumulation_steps 16" in log[1]
    assert log[2:] == ["scancel --signal=USR1 77", "worker stopped", "scontrol requeue 77"]
    assert "requeueing" in err


def test_a_finished_run_is_not_requeued(tmp_path):
    status, log, err = run_script(tmp_path, steps=2)
    assert status == 0, err
    assert log[-1] == "worker finished" and not any(line.startswith("scontrol") for line in log)


def test_sigterm_to_the_shell_waits_for_the_step(tmp_path):
    """On a preemption SLURM signals the batch shell too: it must outlive the step (which got its own
    SIGTERM from SLURM) and leave the requeue to SLURM."""
    status, log, err = run_script(tmp_path, steps=30, signal_after=0.2, sig=signal.SIGTERM)
    assert status == 0 and log[-1] == "worker finished", err
    assert "SIGTERM: waiting" in err and not any(line.startswith(("scontrol", "scancel")) for line in log)
