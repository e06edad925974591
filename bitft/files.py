"""Writing folders so that a failure leaves nothing half-written, and reading safetensors headers.

- `atomic_dir(out)`: work in a temporary folder beside OUT, renamed into place at the end
  (an old OUT survives a failed run); any failure removes the temporary folder, and a full disk
  (`is_disk_full`: ENOSPC, EFBIG, EDQUOT) becomes one line with the bytes written and free.
- Temporaries are named `.OUT.tmp-PID@HOST-XXXX` (`temp_path`): a kill -9 leaves one that says
  whose it was. `remove_stale(out)` (run by every atomic_dir / temp_path of OUT) deletes those
  of OUT whose writer is gone (same host, no such PID); `leftovers(folder)` lists them all.
- `fsync(path)`: flush a file or folder to disk (what resumable checkpoints rely on).
- `safetensors_header(path)`: the header, after checking that the file holds every byte it announces.
- `copy_side_files(src, dst)`: tokenizer, chat template, generation config, licence: every top-level
  file but weights and config.json.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import resource
import secrets
import shutil
import socket
import struct
from pathlib import Path

from bitft.errors import BitftError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")
INDEX = "model.safetensors.index.json"
# .TARGET.tmp-PID@HOST[-XXXX] (HOST absent in older names: this host); `old` = a replaced target on its way out
TEMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:@(?P<host>[^-/]+))?(?:-[0-9a-f]+)?$")


def fsync(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
DISK_FULL_WORDS = ("no space left", "file too large", "quota exceeded", "storagefull")
# torch.save's writer drops the errno: "file write failed", "unexpected pos N vs M", "iostream error"
WRITE_FAILED_WORDS = ("file write failed", "unexpected pos", "iostream error")


def fsize_limit() -> int | None:
    """RLIMIT_FSIZE (`ulimit -f`) in bytes, None when unlimited."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if limit == resource.RLIM_INFINITY else limit


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
    return shutil.disk_usage(folder).free < room or fsize_limit() is not None


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise BitftError(f"{out} exists and is a file: choose another --output")
        if any(out.iterdir()) and not overwrite:
            raise BitftError(f"{out} exists and is not empty: pass --overwrite to replace it, or choose another --output")


def _host() -> str:
    return socket.gethostname().split(".")[0].replace("-", "_") or "localhost"


def temp_path(out: str | os.PathLike, kind: str = "tmp", unique: bool = False) -> Path:
    """The temporary name beside OUT for this process (`.OUT.tmp-PID@HOST`), after removing stale
    ones of OUT. For a file written then renamed over OUT (gguf export)."""
    out = Path(out).absolute()
    remove_stale(out)
    suffix = f"-{secrets.token_hex(4)}" if unique else ""
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}@{_host()}{suffix}")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """PATH's text written beside it (`temp_path`) and renamed over it: never half-written."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _writer_gone(pid: int, host: str | None) -> bool:
    """True when the writer is known to be dead: same host and no process with that PID."""
    if host is not None and host != _host():
        return False  # another machine's writer (shared filesystem): cannot tell, keep it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def leftovers(folder: str | os.PathLike) -> list[dict]:
    """Temporaries of interrupted exports/conversions in FOLDER: path, target, pid, host, bytes,
    stale (its writer is gone, so the next write of that target removes it)."""
    folder = Path(folder)
    found = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = TEMP_RE.match(p.name)
        if not m:
            continue
        try:
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        except OSError:  # removed meanwhile
            continue
        found.append({"path": p, "target": m["target"], "pid": int(m["pid"]), "host": m["host"], "bytes": size,
                      "stale": _writer_gone(int(m["pid"]), m["host"])})
    return found


def remove_stale(out: str | os.PathLike) -> list[Path]:
    """Delete the temporaries beside OUT left by writers of OUT that are gone; return them."""
    out = Path(out).absolute()
    removed = []
    for t in leftovers(out.parent):
        if t["target"] == out.name and t["stale"]:
            if t["path"].is_dir():
                shutil.rmtree(t["path"], ignore_errors=True)
            else:
                t["path"].unlink(missing_ok=True)
            removed.append(t["path"])
    return removed


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False):
    """Yield a temporary folder beside OUT; on success it replaces OUT, on any failure it is removed."""
    out = Path(out).absolute()
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out, unique=True)  # removes stale temporaries of OUT first
    tmp.mkdir()
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        for f in tmp.rglob("*"):  # some writers (tempfile + rename) leave files private
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        if out.exists():
            old = temp_path(out, "old", unique=True)
            old.mkdir()
            out.rename(old / "x")
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException as e:
        written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) if tmp.is_dir() else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e, out.parent):
            raise disk_full_error(out, written) from None
        raise


def disk_full_error(out: Path, written: int) -> BitftError:
    """The one line for a write of OUT that ran out of disk (or into ulimit -f) after WRITTEN bytes."""
    limit = f" and a file size limit of {fsize_limit():,} bytes is set (ulimit -f)" if fsize_limit() else ""
    return BitftError(f"disk full while writing {out} ({written:,} bytes written before it failed, "
                      f"{shutil.disk_usage(out.parent).free:,} free there{limit}): nothing was kept; "
                      "free space or choose another --output")


def safetensors_header(path: Path) -> dict:
    """The header of a .safetensors file, after checking that the file holds every byte it announces."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except Exception as e:
        raise BitftError(f"{path} is not a valid safetensors file ({e}); download it again") from None
    if size != 8 + n + end:
        raise BitftError(f"{path} is truncated or corrupt: {size} bytes, its header needs {8 + n + end}; download it again")
    return header


def copy_side_files(path: Path, tmp: Path) -> None:
    """Tokenizer, chat template, generation config, licence...: every top-level file but weights and config."""
    for f in path.iterdir():
        if f.is_file() and f.name not in ("config.json", INDEX) and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(f, tmp / f.name)
