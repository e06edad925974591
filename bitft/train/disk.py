"""A full disk while saving a checkpoint: recognised, cleaned up, said in one line.

`is_disk_full` (bitft/files.py) finds ENOSPC / EFBIG / EDQUOT in an exception's chain, also where a
library wrapped it into a message (safetensors), or dropped the errno (torch.save: "file write
failed") when the folder is in fact (nearly) full or a file size limit is set. `disk_full_error`
removes the partial checkpoint (it has no completion marker, so resume would skip it anyway; this
gives the space back) and builds the one line: the bytes a checkpoint needs, the bytes free, the
newest complete one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bitft.errors import BitftError
from bitft.files import fsize_limit, is_disk_full  # noqa: F401 (is_disk_full: also imported from here)
from bitft.train.resume import newest_checkpoint


class DiskFullError(BitftError):
    """The disk (or the file size limit) ran out while writing a checkpoint."""


def folder_bytes(path: Path | None) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path is not None and path.is_dir() else 0


def disk_full_error(exc: Exception, out: Path, step: int, is_main: bool) -> DiskFullError | None:
    """None when EXC is not a full disk; otherwise the partial checkpoint-STEP is removed (main
    process) and the one-line error returned."""
    previous = newest_checkpoint(out)
    need = folder_bytes(previous)
    if not is_disk_full(exc, out, max(need, 64 << 20)):
        return None
    partial = out / f"checkpoint-{step}"
    written = folder_bytes(partial)
    if is_main:
        shutil.rmtree(partial, ignore_errors=True)
    free = shutil.disk_usage(out).free
    limit = f" and a file size limit of {fsize_limit():,} bytes is set (ulimit -f)" if fsize_limit() else ""
    need_txt = (f"a checkpoint needs about {need:,} bytes (the size of {previous.name})" if need
                else f"{written:,} bytes were written before it failed")
    keep = f"{previous.name} stays the newest complete checkpoint" if previous else "no complete checkpoint yet"
    return DiskFullError(
        f"disk full while saving {partial.name} in {out} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}): "
        f"{need_txt}, {free:,} are free there{limit}; {keep}. Free space (or lower save_total_limit, or choose "
        "another output_dir) and relaunch the same command")
