"""A GGUF file's header, fast: its metadata (arrays skipped) and its tensors' names, types and sizes.

gguf's GGUFReader builds numpy views for every element of every array, which takes ~30 s for a
128k-token vocabulary and its merges; this reads the scalars and strings and steps over the arrays
(a fraction of a second), and never touches the tensor data.
"""

from __future__ import annotations

import mmap
import struct
from math import prod

SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


class _Cursor:
    def __init__(self, buf):
        self.buf, self.off = buf, 0

    def take(self, fmt: str):
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.off)
        self.off += struct.calcsize("<" + fmt)
        return v

    def string(self) -> str:
        n = self.take("Q")
        self.off += n
        return self.buf[self.off - n: self.off].decode("utf-8", "replace")

    def value(self, kind: int):
        if kind == STRING:
            return self.string()
        if kind == ARRAY:  # skipped: None
            item, n = self.take("I"), self.take("Q")
            if item in SCALARS:
                self.off += n * struct.calcsize("<" + SCALARS[item])
            for _ in range(n if item == STRING else 0):
                length = self.take("Q")  # (`self.off += self.take(...)` would add to the old offset)
                self.off += length
            for _ in range(n if item == ARRAY else 0):
                self.value(ARRAY)
            return None
        return self.take(SCALARS[kind])


def read_header(path) -> tuple[dict, list[tuple[str, str, int, int]]]:
    """({key: value, arrays as None}, [(tensor name, GGML type name, elements, bytes)]) of the GGUF file PATH.
    ValueError (or struct.error) when it is not GGUF or shorter than its tensors' data (truncated)."""
    from gguf import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        c = _Cursor(buf)
        if c.take("I") != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        c.take("I")  # version
        n_tensors, n_kv = c.take("Q"), c.take("Q")
        meta = {}
        for _ in range(n_kv):
            key = c.string()
            meta[key] = c.value(c.take("I"))
        tensors, end = [], 0
        for _ in range(n_tensors):
            name = c.string()
            n = prod(c.take("Q") for _ in range(c.take("I")))
            kind = GGMLQuantizationType(c.take("I"))
            offset = c.take("Q")  # from the start of the data section
            block, size = GGML_QUANT_SIZES[kind]
            tensors.append((name, kind.name, n, n // block * size))
            end = max(end, offset + n // block * size)
        align = meta.get("general.alignment") or 32
        need = -(-c.off // align) * align + end
        if len(buf) < need:
            raise ValueError(f"truncated: {len(buf):,} bytes where its tensors end at {need:,}")
    return meta, tensors
