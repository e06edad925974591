"""The small real data bitft's defaults and demos use, installed with the package (README.md here).

    shipped("eval/wikitext2_test.raw")  -> the file's path inside the installed package
    "shipped:demo/pretrain"             -> the same, written where a data path is expected (YAML configs,
                                           --data, --tasks-dir): resolve_path() turns it into a Path

Found through the package (importlib.resources), never through a path relative to a repository,
so a wheel installed anywhere finds them. Wheels install unzipped: the files are real paths.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from bitft.errors import DataError

PREFIX = "shipped:"


def shipped(name: str = "") -> Path:
    """The path of NAME (a file or folder under bitft/resources), which must exist."""
    path = Path(str(files(__name__).joinpath(*[p for p in name.split("/") if p])))
    if not path.exists():
        have = ", ".join(sorted(f"{d.name}/{f.name}" for d in shipped().iterdir() if d.is_dir() and d.name != "__pycache__"
                                for f in d.iterdir()))
        raise DataError(f"{PREFIX}{name} is not shipped with bitft (shipped: {have})")
    return path


def resolve_path(source: str) -> str:
    """SOURCE with a leading `shipped:` replaced by the installed path; anything else unchanged."""
    source = str(source)
    return str(shipped(source[len(PREFIX):])) if source.startswith(PREFIX) else source
