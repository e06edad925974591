"""Resuming a DeepSpeed ZeRO checkpoint on another number of processes, through DeepSpeed's own
universal checkpoint.

ZeRO partitions the optimizer state (and under ZeRO-3 the weights) by process; DeepSpeed refuses
to load such a checkpoint on another data-parallel world size. `prepare_zero_resume` (called by
`train()` before the Trainer loads the checkpoint) sees the mismatch from the file names, has the
main process convert `global_stepN` once with `deepspeed.checkpoint.ds_to_universal` into
`global_stepN_universal` (written under a temporary name, renamed when whole, with DeepSpeed's
`latest_universal` tag file), and turns on `checkpoint.load_universal` in this run's DeepSpeed
config: DeepSpeed then re-partitions the state for the new world size. Same world size: nothing.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from bitft.errors import BitftError

logger = logging.getLogger("bitft")

OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def saved_world_size(step_dir: Path) -> int:
    """Data-parallel processes a ZeRO checkpoint folder (`global_stepN`) was written by (0: not ZeRO)."""
    return len({m.group(1) for f in step_dir.iterdir() if (m := OPTIM_RE.match(f.name))})


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def convert_to_universal(step_dir: Path) -> Path:
    """global_stepN -> global_stepN_universal (once; kept), plus the `latest_universal` tag file."""
    out = step_dir.with_name(step_dir.name + "_universal")
    if not (out / "zero").is_dir():
        tmp = step_dir.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        workers = str(max(1, min(4, os.cpu_count() or 1)))
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(step_dir),
               "--output_folder", str(tmp), "--inject_missing_state",
               "--num_extract_workers", workers, "--num_merge_workers", workers]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise BitftError(f"DeepSpeed could not convert {step_dir} to a universal checkpoint ({last}): "
                             "relaunch on the world size it was saved with")
        (step_dir.parent / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's names the temporary
        tmp.rename(out)
    tag = step_dir.parent / "latest_universal"
    tag.write_text(out.name)
    return out


def prepare_zero_resume(trainer, checkpoint: Path) -> None:
    """Before the Trainer resumes CHECKPOINT under DeepSpeed on another world size: the universal form."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return
    steps = [d for d in Path(checkpoint).glob("global_step*") if d.is_dir() and not d.name.endswith("_universal")]
    if not steps:
        return
    saved, now = saved_world_size(steps[0]), trainer.args.world_size
    if saved in (0, now):
        return
    logger.warning("%s holds ZeRO state of %d processes, this launch has %d: loading it through DeepSpeed's "
                   "universal checkpoint", checkpoint, saved, now)
    if trainer.is_world_process_zero():
        convert_to_universal(steps[0])
    _barrier()
    plugin = trainer.accelerator.state.deepspeed_plugin
    plugin.deepspeed_config.setdefault("checkpoint", {})["load_universal"] = True
