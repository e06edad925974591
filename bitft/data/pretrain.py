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
import random
from pathlib import Path
from typing import Iterable, Iterator

import torch

from bitft.data.local import local_files, load_file
from bitft.errors import DataError


# ----------------------------------------------------------------------------- reading documents

def read_file(path: Path, text_field: str = "text") -> list[str]:
    """The non-empty documents of one local file."""
    rows = load_file(path)
    field = "text" if path.suffix == ".txt" else text_field
    if field not in rows.column_names:
        raise DataError(f"{path}: its rows have no {field!r} field (they have {sorted(rows.column_names)}); set text_field")
    return [t for t in rows[field] if isinstance(t, str) and t.strip()]


def stream_hub(name: str, config: str | None, split: str, text_field: str, seed: int, buffer_size: int) -> Iterator[str]:
    """Documents of a hub dataset, streamed in a seeded shuffled order."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot stream {name} ({config}) from the Hugging Face hub ({reason}); "
                        "pass local jsonl/parquet/txt files or folders as `dataset` instead") from None
    for i, row in enumerate(ds.shuffle(seed=seed, buffer_size=buffer_size)):
        if text_field not in row:
            raise DataError(f"{name}: row {i} has no {text_field!r} field (it has {sorted(row)}); set text_field")
        if isinstance(row[text_field], str) and row[text_field].strip():
            yield row[text_field]


# ----------------------------------------------------------------------------- packing

def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(f"the tokenizer ({type(tokenizer).__name__}) has no eos token to put between documents")
    return tokenizer.eos_token_id


def pack(token_docs: Iterable[list[int]], block_size: int, eos: int) -> Iterator[list[int]]:
    """Blocks of exactly block_size tokens from documents joined with EOS; the tail is dropped.

    The generator reads a document only when its buffer cannot fill the next block, so after the
    n-th block it has read exactly the documents that block needed."""
    buf: list[int] = []
    for ids in token_docs:
        buf.extend(ids)
        buf.append(eos)
        while len(buf) >= block_size:
            yield buf[:block_size]
            buf = buf[block_size:]


def tokenized_docs(tokenizer, texts: Iterable[str], batch: int = 256) -> Iterator[list[int]]:
    """Token ids of each text (no special tokens), tokenized BATCH texts at a time."""
    it = iter(texts)
    while chunk := list(itertools.islice(it, batch)):
        yield from tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]


def eval_blocks_from(docs: Iterator[list[int]], eval_blocks: int, block_size: int, eos: int) -> list[list[int]]:
    """The first EVAL_BLOCKS blocks packed from DOCS; DOCS is left at the document after the last one
    they used (the rest of that document is dropped), so no document is both held out and trained on."""
    blocks = list(itertools.islice(pack(docs, block_size, eos), eval_blocks))
    if len(blocks) < eval_blocks:
        raise DataError(f"the data holds fewer than eval_blocks={eval_blocks} blocks of {block_size} tokens: "
                        "lower eval_blocks or block_size, or add data")
    return blocks


class PackedBlocks(torch.utils.data.Dataset):
    """Map-style packed blocks: {"input_ids", "labels"} of block_size tokens each."""

    def __init__(self, blocks: list[list[int]]):
        self.blocks = torch.tensor(blocks, dtype=torch.long) if blocks else torch.zeros(0, 0, dtype=torch.long)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i):
        ids = self.blocks[i]
        return {"input_ids": ids, "labels": ids.clone()}


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


def build_datasets(tokenizer, dataset: list[str] | str, *, block_size: int, eval_blocks: int, seed: int,
                   dataset_config: str | None = None, split: str = "train", text_field: str = "text",
                   shuffle_buffer: int = 10_000, max_documents: int | None = None, eval_only: bool = False):
    """(train, eval) datasets of packed blocks. Local files → PackedBlocks; a hub id → StreamedBlocks.
    EVAL_ONLY: (None, eval), the training documents not tokenized (a teacher cache holds its blocks)."""
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
        docs = tokenized_docs(tokenizer, texts)
        eval_set = PackedBlocks(eval_blocks_from(docs, eval_blocks, block_size, eos))
        if eval_only:
            return None, eval_set
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

    # one document per tokenizer call, so that the documents the eval slice read can be counted
    read = 0

    def counted(texts):
        nonlocal read
        for read, text in enumerate(texts, 1):  # noqa: B007 (read is the count)
            yield text

    eval_set = PackedBlocks(eval_blocks_from(tokenized_docs(tokenizer, counted(make_texts()), batch=1),
                                             eval_blocks, block_size, eos))
    return None if eval_only else StreamedBlocks(make_texts, read, tokenizer, block_size), eval_set
