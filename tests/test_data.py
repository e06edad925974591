"""Packed pre-training blocks: EOS between documents, exact block sizes, held-out eval, determinism."""

from __future__ import annotations

import json

import pytest
import torch

from bitft.config import PretrainDataArguments
from bitft.data.local import local_files
from bitft.data.pretrain import PackedBlocks, build_datasets, pack, read_file
from bitft.errors import DataError
from helpers import DATA

PRETRAIN = DATA / "pretrain"


class CharTokenizer:
    """One token per character (ord), eos = 0: makes packing checkable by eye."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def decode(ids):
    return "".join("|" if i == 0 else chr(i) for i in ids)


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def test_pack_puts_eos_between_documents_and_drops_the_tail():
    blocks = list(pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], block_size=4, eos=0))
    assert blocks == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert list(pack([[1, 2]], block_size=4, eos=0)) == []


def test_local_jsonl_blocks(tmp_path):
    docs = [f"doc{i}-" + "x" * (i % 7) for i in range(40)]
    f = write_jsonl(tmp_path / "a.jsonl", docs)
    train, ev = build_datasets(CharTokenizer(), [str(f)], block_size=8, eval_blocks=3, seed=0)
    assert isinstance(train, PackedBlocks) and len(ev) == 3
    assert all(len(x["input_ids"]) == 8 for x in list(train) + list(ev))
    item = train[0]
    assert torch.equal(item["input_ids"], item["labels"])
    text = "".join(decode(b["input_ids"].tolist()) for b in train)
    assert "|" in text  # EOS between documents


def test_eval_documents_are_never_trained_on(tmp_path):
    docs = [f"<{i:03d}>" + "abcdefgh"[: i % 8] for i in range(200)]
    f = write_jsonl(tmp_path / "d.jsonl", docs)
    train, ev = build_datasets(CharTokenizer(), [str(f)], block_size=16, eval_blocks=5, seed=3)
    tags = lambda ds: {s[s.index("<"):s.index(">") + 1]  # noqa: E731
                       for b in ds for s in decode(b["input_ids"].tolist()).split("|") if "<" in s and ">" in s}
    train_tags, eval_tags = tags(train), tags(ev)
    assert eval_tags and train_tags and not train_tags & eval_tags


def test_same_seed_same_blocks_other_seed_other_blocks(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [f"document number {i} " * (1 + i % 3) for i in range(100)])
    a = build_datasets(CharTokenizer(), [str(f)], block_size=32, eval_blocks=2, seed=1)
    b = build_datasets(CharTokenizer(), [str(f)], block_size=32, eval_blocks=2, seed=1)
    c = build_datasets(CharTokenizer(), [str(f)], block_size=32, eval_blocks=2, seed=2)
    assert torch.equal(a[0].blocks, b[0].blocks) and torch.equal(a[1].blocks, b[1].blocks)
    assert not torch.equal(a[1].blocks, c[1].blocks)


def test_file_kinds_and_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "a.jsonl", ["alpha one", "alpha two"])
    pq.write_table(pa.table({"text": ["parquet doc", ""], "n": [1, 2]}), d / "b.parquet")
    (d / "sub" / "c.txt").write_text("a whole text file\n\nwith two paragraphs")
    (d / "e.json").write_text(json.dumps([{"text": "json doc"}]))
    (d / "notes.md").write_text("ignored")
    files = local_files([str(d)])
    assert [f.name for f in files] == ["a.jsonl", "b.parquet", "e.json", "c.txt"]
    texts = [t for f in files for t in read_file(f)]
    assert texts == ["alpha one", "alpha two", "parquet doc", "json doc", "a whole text file\n\nwith two paragraphs"]


def test_other_text_field(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", ["x" * 50] * 4, field="content")
    with pytest.raises(DataError, match="no 'text' field.*set text_field"):
        build_datasets(CharTokenizer(), [str(f)], block_size=8, eval_blocks=1, seed=0)
    train, _ = build_datasets(CharTokenizer(), [str(f)], block_size=8, eval_blocks=1, seed=0, text_field="content")
    assert len(train) > 0


def test_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        build_datasets(CharTokenizer(), [str(tmp_path / "missing.jsonl")], block_size=8, eval_blocks=1, seed=0)
    small = write_jsonl(tmp_path / "s.jsonl", ["tiny"])
    with pytest.raises(DataError, match="fewer than eval_blocks"):
        build_datasets(CharTokenizer(), [str(small)], block_size=8, eval_blocks=5, seed=0)
    with pytest.raises(DataError, match="no training block"):
        build_datasets(CharTokenizer(), [str(small)], block_size=4, eval_blocks=1, seed=0)


def test_hub_unreachable_names_the_local_fallback(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="local jsonl/parquet/txt"):
        build_datasets(CharTokenizer(), ["HuggingFaceFW/fineweb-edu"], dataset_config="sample-10BT",
                       block_size=8, eval_blocks=1, seed=0)


def test_hub_streaming_path(monkeypatch):
    """The streaming branch, with a fake hub: eval documents skipped by the training stream."""
    import bitft.data.pretrain as data

    docs = [f"<{i:02d}>streamed" for i in range(60)]
    monkeypatch.setattr(data, "stream_hub", lambda *a, **k: iter(docs))
    train, ev = build_datasets(CharTokenizer(), ["org/corpus"], block_size=16, eval_blocks=4, seed=0)
    assert isinstance(train, torch.utils.data.IterableDataset) and len(ev) == 4
    blocks = [b["input_ids"].tolist() for b in train]
    assert blocks == [b["input_ids"].tolist() for b in train]  # re-iterable, same order
    first = decode(blocks[0])
    eval_text = "".join(decode(b["input_ids"].tolist()) for b in ev)
    n_eval_docs = eval_text.count("<")
    assert f"<{n_eval_docs:02d}>" in first or first.startswith(f"<{n_eval_docs:02d}")


def test_defaults_are_fineweb_edu():
    d = PretrainDataArguments()
    assert d.dataset == ["HuggingFaceFW/fineweb-edu"] and d.dataset_config == "sample-10BT"


@pytest.mark.smollm2
def test_shared_pretrain_text_with_smollm2_tokenizer(smollm2_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_folder)
    assert tok.eos_token == "<|im_end|>"
    train, ev = build_datasets(tok, [str(PRETRAIN / "c4_demo.jsonl")], block_size=128, eval_blocks=8, seed=0)
    assert len(ev) == 8 and len(train) > 100
    eos_count = int((train.blocks == tok.eos_token_id).sum())
    assert eos_count > 200  # ~one per C4 document
