"""Local data files: which files a list of paths names, and their rows, read by `datasets`' own loaders.

jsonl / json -> `json`, parquet -> `parquet`, txt -> `text` with one document per file. A source
list is either all local paths (every one must exist) or one hub dataset id (None here).
`shipped:NAME` names data installed with bitft (bitft/resources).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from bitft.errors import DataError
from bitft.resources import resolve_path

LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def local_files(sources: Iterable[str], suffixes: tuple[str, ...] = tuple(LOADERS)) -> list[Path] | None:
    """The data files named by SOURCES (files or folders), or None when they are not local paths."""
    sources = [resolve_path(s) for s in sources]
    paths = [Path(s).expanduser() for s in sources]
    if not any(p.exists() for p in paths):
        looks_local = any(s.startswith((".", "/", "~")) or Path(s).suffix in suffixes for s in sources)
        if looks_local:
            raise DataError(f"data files not found: {', '.join(sources)}")
        return None
    files = []
    for s, p in zip(sources, paths):
        if not p.exists():
            raise DataError(f"{s} not found (other data sources given are local files: every one must exist)")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
            if not found:
                raise DataError(f"{s} holds no {'/'.join(suffixes)} files")
            files += found
        elif p.suffix not in suffixes:
            raise DataError(f"{s}: unsupported data file type (use {', '.join(suffixes)})")
        else:
            files.append(p)
    return files


def load_file(path: Path):
    """The rows of one local file as a datasets.Dataset (a .txt file is one row: {"text": whole file})."""
    import datasets

    kwargs = {"sample_by": "document"} if path.suffix == ".txt" else {}
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(LOADERS[path.suffix], data_files=str(path), split="train", **kwargs)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path} cannot be read as {LOADERS[path.suffix]} ({reason})") from None
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
