"""A GGUF file's header, fast: its metadata (arrays skipped) and its tensors' names, types and sizes.

gguf's GGUFReader builds numpy views for every element of every array, which takes ~30 s for a
128k-token vocabulary and its merges; this reads the scalars and strings and steps over the arrays
(a fraction of a second), and never touches the tensor data. It knows bitnet.cpp's I2_S (type 36: ne/4 + 32 bytes,
bitft/export/gguf_i2s.py), which gguf-py does not. A damaged header (a count, a length, a type id or a
shape that cannot be right) is a ValueError naming what and where, never a long loop or a wrong answer.
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

    def skip(self, n: int, what: str) -> None:
        if n > len(self.buf) - self.off:
            raise ValueError(f"damaged header: {what} of {n:,} bytes at byte {self.off:,} runs past the end "
                             f"({len(self.buf):,} bytes)")
        self.off += n

    def string(self, what: str = "a string") -> str:
        n = self.take("Q")
        self.skip(n, what)
        return self.buf[self.off - n: self.off].decode("utf-8", "replace")

    def value(self, kind: int, key: str):
        if kind == STRING:
            return self.string(f"the value of {key}")
        if kind == ARRAY:  # skipped: None
            item, n = self.take("I"), self.take("Q")
            if item in SCALARS:
                self.skip(n * struct.calcsize("<" + SCALARS[item]), f"the array {key}")
            elif item not in (STRING, ARRAY):
                raise ValueError(f"damaged header: {key} is an array of unknown value type {item}")
            elif n > len(self.buf) - self.off:
                raise ValueError(f"damaged header: {key} claims {n:,} elements, more than the file holds")
            for _ in range(n if item == STRING else 0):
                self.skip(self.take("Q"), f"an element of {key}")
            for _ in range(n if item == ARRAY else 0):
                self.value(ARRAY, key)
            return None
        if kind not in SCALARS:
            raise ValueError(f"damaged header: {key} has unknown value type {kind}")
        return self.take(SCALARS[kind])


def _type_size(kind_id: int, name: str) -> tuple[str, int, int]:
    """(type name, block values, block bytes) of GGML type KIND_ID (I2_S: bytes counted per tensor)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from bitft.export.gguf_i2s import I2_S

    if kind_id == I2_S:
        return I2_S.name, 1, 0
    try:
        kind = GGMLQuantizationType(kind_id)
        return kind.name, *GGML_QUANT_SIZES[kind]
    except (ValueError, KeyError):
        raise ValueError(f"damaged header or unknown tensor type: {name} has type id {kind_id}") from None


def _start(c: _Cursor, path) -> tuple[int, int]:
    """(tensors, keys) after the magic and the version."""
    from gguf import GGUF_MAGIC

    if c.take("I") != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file")
    version = c.take("I")
    if version not in (2, 3):
        raise ValueError(f"damaged header or unsupported GGUF version {version} (bitft reads 2 and 3)")
    n_tensors, n_kv = c.take("Q"), c.take("Q")
    if n_tensors + n_kv > len(c.buf) // 8:
        raise ValueError(f"damaged header: {n_tensors:,} tensors and {n_kv:,} keys cannot fit in {len(c.buf):,} bytes")
    return n_tensors, n_kv


def kv_bytes(path, prefix: str = "") -> dict[str, bytes]:
    """{key: its value type id and value, the bytes the file holds} for the keys of PATH that start with PREFIX.
    Two files hold the same keys, types and values exactly when these are equal; no array is decoded (a
    262k-token vocabulary and its merges compare in a fraction of a second, where GGUFReader takes a minute)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        c = _Cursor(buf)
        out = {}
        for i in range(_start(c, path)[1]):
            key = c.string(f"the name of key {i}")
            begin = c.off
            c.value(c.take("I"), key)
            if key.startswith(prefix):
                out[key] = bytes(buf[begin:c.off])
    return out


def read_header(path, with_shapes: bool = False) -> tuple[dict, list[tuple]]:
    """({key: value, arrays as None}, [(tensor name, GGML type name, elements, bytes)]) of the GGUF file PATH,
    each with its shape (ne0 first: the row length) and the file offset of its data appended when WITH_SHAPES.
    ValueError (or struct.error) when it is not GGUF, its header is damaged, or it is shorter than its
    tensors' data (truncated)."""
    from bitft.export.gguf_i2s import I2_S, i2s_nbytes

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        c = _Cursor(buf)
        n_tensors, n_kv = _start(c, path)
        meta = {}
        for i in range(n_kv):
            key = c.string(f"the name of key {i}")
            meta[key] = c.value(c.take("I"), key)
        tensors, end = [], 0
        for _ in range(n_tensors):
            name = c.string("a tensor name")
            n_dims = c.take("I")
            if not 1 <= n_dims <= 4:
                raise ValueError(f"damaged header: tensor {name} has {n_dims} dimensions")
            shape = tuple(c.take("Q") for _ in range(n_dims))
            n = prod(shape)
            kind, block, size = _type_size(c.take("I"), name)
            offset = c.take("Q")  # from the start of the data section
            if kind == I2_S.name:
                nbytes = i2s_nbytes(n)
            elif shape[0] % block:
                raise ValueError(f"damaged header: tensor {name} of type {kind} has rows of {shape[0]} values, "
                                 f"not whole blocks of {block}")
            else:
                nbytes = n // block * size
            tensors.append((name, kind, n, nbytes, shape, offset))
            end = max(end, offset + nbytes)
        align = meta.get("general.alignment") or 32
        start = -(-c.off // align) * align
        if len(buf) < start + end:
            raise ValueError(f"truncated: {len(buf):,} bytes where its tensors end at {start + end:,}")
    return meta, [t[:4] + ((t[4], start + t[5]) if with_shapes else ()) for t in tensors]
