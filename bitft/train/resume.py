"""Resumable Trainer checkpoints: a checkpoint counts only once every file of it is on disk.

`CheckpointMarker` writes `bitft-complete.json` into a Trainer checkpoint after every file of it
is written and synced (all processes done): the file list with sizes. `newest_checkpoint` picks
the highest-step checkpoint that has the marker and whose listed files are all there at their
recorded sizes, so a checkpoint half-written when the run was killed (kill -9, power, OOM) is
never picked; `resume_checkpoint` also deletes such leftovers. The Trainer's own
`resume_from_checkpoint` then restores weights, optimizer, scheduler, RNG, step and data position.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from bitft.errors import ConfigError
from bitft.files import fsync

logger = logging.getLogger("bitft")

COMPLETE_MARKER = "bitft-complete.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def mark_complete(checkpoint: str | os.PathLike, step: int) -> Path:
    """Sync every file of CHECKPOINT, then write the marker that says it is whole (atomically)."""
    ckpt = Path(checkpoint)
    files = {}
    for f in sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER):
        fsync(f)
        files[str(f.relative_to(ckpt))] = f.stat().st_size
    tmp = ckpt / f".{COMPLETE_MARKER}.tmp"
    tmp.write_text(json.dumps({"step": step, "time": time.time(), "files": files}, indent=1))
    fsync(tmp)
    os.replace(tmp, ckpt / COMPLETE_MARKER)
    fsync(ckpt)
    return ckpt / COMPLETE_MARKER


def is_complete(checkpoint: str | os.PathLike) -> bool:
    """True when CHECKPOINT has the marker and every file it lists, at its recorded size."""
    ckpt = Path(checkpoint)
    try:
        record = json.loads((ckpt / COMPLETE_MARKER).read_text())
        return all((ckpt / name).stat().st_size == size for name, size in record["files"].items()) \
            and (ckpt / "trainer_state.json").is_file()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-N folder in OUTPUT_DIR, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def newest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in OUTPUT_DIR, or None."""
    for _, path in reversed(list_checkpoints(output_dir)):
        if is_complete(path):
            return path
    return None


def resume_checkpoint(output_dir: str | os.PathLike, resume: bool | str = True, is_main: bool = True) -> Path | None:
    """What to resume from: an explicit checkpoint path, the newest complete one (resume=True), or None.

    The main process deletes incomplete checkpoints (killed mid-write) so that the Trainer's
    rotation and a later save of the same step never meet them.
    """
    if resume in (False, None, "", "false", "False", "no"):
        return None
    if isinstance(resume, str) and resume not in ("true", "True", "auto", "yes"):
        path = Path(resume)
        if not is_complete(path):
            raise ConfigError(f"{resume} is not a complete bitft checkpoint (no valid {COMPLETE_MARKER})")
        return path
    newest = newest_checkpoint(output_dir)
    if is_main:
        for _, path in list_checkpoints(output_dir):
            if not is_complete(path):
                logger.warning("removing incomplete checkpoint %s (the run stopped while writing it)", path)
                shutil.rmtree(path, ignore_errors=True)
    return newest


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class CheckpointMarker(TrainerCallback):
    """After every Trainer save: wait for all processes, then mark the checkpoint complete."""

    def on_save(self, args, state, control, **kwargs):
        _barrier()
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                mark_complete(ckpt, state.global_step)
        _barrier()


def save_checkpoint(trainer) -> Path:
    """Save a full Trainer checkpoint now (all processes must call it) and mark it complete."""
    trainer._save_checkpoint(trainer.model, trial=None)
    trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)
    return Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
