"""Writing folders so that a failure leaves nothing half-written, and reading safetensors headers.

- `atomic_dir(out)`: work in a temporary folder beside OUT, renamed into place at the end
  (an old OUT survives a failed run); any failure removes the temporary folder.
- `fsync(path)`: flush a file or folder to disk (what resumable checkpoints rely on).
- `safetensors_header(path)`: the header, after checking that the file holds every byte it announces.
- `copy_side_files(src, dst)`: tokenizer, chat template, generation config, licence: every top-level
  file but weights and config.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

from bitft.errors import BitftError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")
INDEX = "model.safetensors.index.json"


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


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise BitftError(f"{out} exists and is a file: choose another --output")
        if any(out.iterdir()) and not overwrite:
            raise BitftError(f"{out} exists and is not empty: pass --overwrite to replace it, or choose another --output")


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False):
    """Yield a temporary folder beside OUT; on success it replaces OUT, on any failure it is removed."""
    out = Path(out).absolute()
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        for f in tmp.rglob("*"):  # some writers (tempfile + rename) leave files private
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / "x")
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
