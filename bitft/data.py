"""Pre-training text → tokenized, packed blocks of `block_size` tokens, with a held-out eval slice.

    documents ──(seeded shuffle)──▶ tokenize (no special tokens) ──▶ doc₁ EOS doc₂ EOS doc₃ EOS …
              ──▶ cut into blocks of block_size tokens (labels = input_ids; the model shifts them)

The first documents of the shuffled order fill the eval slice (`eval_blocks` blocks; the rest of
the document that completes it is dropped), and training starts at the next document, so no
document is in both. The same seed gives the same documents, blocks and order, in every process.

Sources:
- local files or folders (jsonl, json, parquet with a text column; .txt files are one document
  each): read whole, packed into a map-style dataset. The Trainer shuffles its blocks with its
  seeded sampler and, on resume, skips exactly the blocks already seen.
- a hub dataset id (FineWeb-edu: `HuggingFaceFW/fineweb-edu`, config `sample-10BT`), streamed:
  shuffled with a seeded buffer, packed on the fly (an IterableDataset; on resume the Trainer
  reads and drops the blocks already seen).
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
FINEWEB_EDU = "HuggingFaceFW/fineweb-edu"


class DataError(ValueError):
    """A problem with the data request, said in one line that names the fix."""


@dataclass
class DataArguments:
    # data: FineWeb-edu streamed from the hub, or local jsonl/json/parquet/txt files and folders
    dataset: list[str] = field(default_factory=lambda: [FINEWEB_EDU], metadata={"help": "hub dataset id, or local files/folders"})
    dataset_config: str | None = field(default="sample-10BT", metadata={"help": "hub dataset config"})
    dataset_split: str = field(default="train", metadata={"help": "hub dataset split"})
    text_field: str = field(default="text", metadata={"help": "column/field that holds the document text"})
    block_size: int = field(default=2048, metadata={"help": "tokens per packed training sequence"})
    eval_blocks: int = field(default=64, metadata={"help": "held-out blocks for evaluation (whole documents, never trained on)"})
    shuffle_buffer: int = field(default=10_000, metadata={"help": "streaming shuffle buffer (documents)"})
    max_documents: int | None = field(default=None, metadata={"help": "use only the first N documents of the shuffled order"})


# ----------------------------------------------------------------------------- reading documents

def local_files(sources: Iterable[str], suffixes: tuple[str, ...] = LOCAL_SUFFIXES) -> list[Path] | None:
    """The data files named by SOURCES (files or folders), or None when they are not local paths."""
    sources = [str(s) for s in sources]
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


def _texts_from_rows(rows, field: str, where: str) -> Iterator[str]:
    for i, row in enumerate(rows):
        if field not in row:
            raise DataError(f"{where}: row {i} has no {field!r} field (it has {sorted(row)}); set text_field")
        text = row[field]
        if isinstance(text, str) and text.strip():
            yield text


def read_file(path: Path, text_field: str = "text") -> list[str]:
    """The documents of one local file."""
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        return [text] if text.strip() else []
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise DataError(f"{path} has no {text_field!r} column (it has {table.column_names}); set text_field")
        return [t for t in table.column(text_field).to_pylist() if isinstance(t, str) and t.strip()]
    if path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(rows, dict):
            rows = rows.get("data", rows.get("rows", [rows]))
        return list(_texts_from_rows(rows, text_field, str(path)))
    with open(path, encoding="utf-8") as f:
        rows = (json.loads(line) for line in f if line.strip())
        return list(_texts_from_rows(rows, text_field, str(path)))


def stream_hub(name: str, config: str | None, split: str, text_field: str, seed: int, buffer_size: int) -> Iterator[str]:
    """Documents of a hub dataset, streamed in a seeded shuffled order."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot stream {name} ({config}) from the Hugging Face hub ({reason}); "
                        "pass local jsonl/parquet/txt files or folders as `dataset` instead") from None
    ds = ds.shuffle(seed=seed, buffer_size=buffer_size)
    return _texts_from_rows(ds, text_field, name)


# ----------------------------------------------------------------------------- packing

def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(f"the tokenizer ({type(tokenizer).__name__}) has no eos token to put between documents")
    return tokenizer.eos_token_id


def pack(token_docs: Iterable[list[int]], block_size: int, eos: int) -> Iterator[list[int]]:
    """Blocks of exactly block_size tokens from documents joined with EOS; the tail is dropped."""
    buf: list[int] = []
    for ids in token_docs:
        buf.extend(ids)
        buf.append(eos)
        while len(buf) >= block_size:
            yield buf[:block_size]
            buf = buf[block_size:]


def _batched(it: Iterable, n: int) -> Iterator[list]:
    it = iter(it)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def tokenized_docs(tokenizer, texts: Iterable[str], batch: int = 256) -> Iterator[list[int]]:
    for chunk in _batched(texts, batch):
        yield from tokenize(tokenizer, chunk)


def split_eval(docs: Iterator[list[int]], eval_blocks: int, block_size: int, eos: int) -> list[list[int]]:
    """Consume documents from DOCS until eval_blocks blocks are filled; return those blocks."""
    blocks: list[list[int]] = []
    if eval_blocks <= 0:
        return blocks
    buf: list[int] = []
    for ids in docs:
        buf.extend(ids)
        buf.append(eos)
        while len(buf) >= block_size and len(blocks) < eval_blocks:
            blocks.append(buf[:block_size])
            buf = buf[block_size:]
        if len(blocks) == eval_blocks:
            return blocks
    raise DataError(f"the data holds fewer than eval_blocks={eval_blocks} blocks of {block_size} tokens: "
                    "lower eval_blocks or block_size, or add data")


class PackedBlocks(torch.utils.data.Dataset):
    """Map-style packed blocks: {"input_ids", "labels"} of block_size tokens each."""

    def __init__(self, blocks: list[list[int]] | torch.Tensor):
        self.blocks = blocks if isinstance(blocks, torch.Tensor) else torch.tensor(blocks, dtype=torch.long)
        if self.blocks.ndim != 2:
            self.blocks = self.blocks.reshape(0, 0)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i):
        ids = self.blocks[i]
        return {"input_ids": ids, "labels": ids.clone()}

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()


class StreamedBlocks(torch.utils.data.IterableDataset):
    """Packed blocks from a streamed hub dataset, after the documents held out for eval."""

    def __init__(self, make_texts, skip_docs: int, tokenizer, block_size: int):
        self.make_texts, self.skip_docs = make_texts, skip_docs
        self.tokenizer, self.block_size = tokenizer, block_size

    def __iter__(self):
        texts = itertools.islice(self.make_texts(), self.skip_docs, None)
        for block in pack(tokenized_docs(self.tokenizer, texts), self.block_size, eos_id(self.tokenizer)):
            ids = torch.tensor(block, dtype=torch.long)
            yield {"input_ids": ids, "labels": ids.clone()}


class _Counted:
    """Iterator wrapper that counts what it handed out."""

    def __init__(self, it):
        self.it, self.n = iter(it), 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.it)
        self.n += 1
        return item


def build_datasets(tokenizer, dataset: list[str] | str, *, block_size: int, eval_blocks: int, seed: int,
                   dataset_config: str | None = None, split: str = "train", text_field: str = "text",
                   shuffle_buffer: int = 10_000, max_documents: int | None = None):
    """(train, eval) datasets of packed blocks. Local files → PackedBlocks; a hub id → StreamedBlocks."""
    if block_size < 2:
        raise DataError(f"block_size must be at least 2 tokens, got {block_size}")
    sources = [dataset] if isinstance(dataset, str) else list(dataset)
    if not sources:
        raise DataError("no dataset given: pass local files/folders or a hub dataset id")
    eos = eos_id(tokenizer)
    files = local_files(sources)
    if files is not None:
        texts = [t for f in files for t in read_file(f, text_field)]
        if not texts:
            raise DataError(f"no non-empty {text_field!r} documents in {', '.join(map(str, files))}")
        random.Random(seed).shuffle(texts)
        if max_documents:
            texts = texts[:max_documents]
        docs = _Counted(tokenized_docs(tokenizer, texts))
        eval_set = PackedBlocks(split_eval(docs, eval_blocks, block_size, eos))
        train = PackedBlocks(list(pack(docs, block_size, eos)))
        if len(train) == 0:
            raise DataError(f"no training block of {block_size} tokens is left after the eval slice: add data")
        return train, eval_set

    if len(sources) != 1:
        raise DataError(f"a hub dataset is one id, got {sources}")
    name = sources[0]

    def make_texts():
        texts = stream_hub(name, dataset_config, split, text_field, seed, shuffle_buffer)
        return itertools.islice(texts, max_documents) if max_documents else texts

    texts = _Counted(make_texts())
    eval_set = PackedBlocks(split_eval(tokenized_docs(tokenizer, texts, batch=1), eval_blocks, block_size, eos))
    return StreamedBlocks(make_texts, texts.n, tokenizer, block_size), eval_set
