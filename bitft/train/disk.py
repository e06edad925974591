"""A full disk while saving a checkpoint: recognised, cleaned up, said in one line.

`is_disk_full` finds ENOSPC / EFBIG / EDQUOT in an exception's chain, also where a library wrapped
it into a message (safetensors), or dropped the errno (torch.save: "file write failed") when the
folder is in fact (nearly) full or a file size limit is set. `disk_full_error` removes the partial
checkpoint (it has no completion marker, so resume would skip it anyway; this gives the space back)
and builds the one line: the bytes a checkpoint needs, the bytes free, the newest complete one.
"""

from __future__ import annotations

import errno
import resource
import shutil
from pathlib import Path

from bitft.errors import BitftError
from bitft.train.resume import newest_checkpoint

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
DISK_FULL_WORDS = ("no space left", "file too large", "quota exceeded", "storagefull")
# torch.save's writer drops the errno: "file write failed", "unexpected pos N vs M", "iostream error"
WRITE_FAILED_WORDS = ("file write failed", "unexpected pos", "iostream error")


class DiskFullError(BitftError):
    """The disk (or the file size limit) ran out while writing a checkpoint."""


def _fsize_limit() -> int | None:
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if limit == resource.RLIM_INFINITY else limit


def folder_bytes(path: Path | None) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path is not None and path.is_dir() else 0


def is_disk_full(exc: BaseException, folder: Path | None = None, room: int = 64 << 20) -> bool:
    """ENOSPC / EFBIG / EDQUOT anywhere in EXC's chain (errno or message); an errno-less short write
    counts when FOLDER has less than ROOM bytes free or a file size limit is set."""
    seen, short_write = set(), False
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).lower()
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS or any(w in text for w in DISK_FULL_WORDS):
            return True
        short_write |= any(w in text for w in WRITE_FAILED_WORDS)
        exc = exc.__cause__ or exc.__context__
    if not short_write or folder is None:
        return False
    return shutil.disk_usage(folder).free < room or _fsize_limit() is not None


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
    limit = f" and a file size limit of {_fsize_limit():,} bytes is set (ulimit -f)" if _fsize_limit() else ""
    need_txt = (f"a checkpoint needs about {need:,} bytes (the size of {previous.name})" if need
                else f"{written:,} bytes were written before it failed")
    keep = f"{previous.name} stays the newest complete checkpoint" if previous else "no complete checkpoint yet"
    return DiskFullError(
        f"disk full while saving {partial.name} in {out} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}): "
        f"{need_txt}, {free:,} are free there{limit}; {keep}. Free space (or lower save_total_limit, or choose "
        "another output_dir) and relaunch the same command")
