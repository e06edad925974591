"""Teacher-logits cache: run the teacher once over a recipe's training blocks, then train any number of
runs against it with no teacher in memory and no teacher forward in their steps.

    bitft teacher-cache --config configs/demo/warmup.yaml --output runs/teacher-cache [--top-k 32]

The blocks are the recipe's own (bitft.data.pretrain: same files, seed, block size, so the same
blocks in the same order). For every position of every block it stores the teacher's top-K
next-token log-probabilities at the recipe's τ (float16) and their token ids (uint16 for a
vocabulary of at most 65,536 tokens, else int32), with the block's tokens (int32), in safetensors
shards, and `cache.json` (what it was made from). Bytes per token: 4 + K·(2 + 2 or 4).

A recipe with `teacher_cache: DIR` trains on these blocks with the sparse KD loss
(bitft.train.sparse_kd; `distill_top_k` ≤ K uses the K' most likely of them) and refuses, in one
line, a cache made from other data, block size, tokenizer or τ.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
from pathlib import Path

import torch

from bitft.errors import ConfigError

logger = logging.getLogger("bitft")

FORMAT = "bitft-teacher-cache"
MANIFEST = "cache.json"


def data_identity(data_args, seed: int) -> dict:
    """What decides a recipe's training blocks (also in every checkpoint's run record)."""
    return {"dataset": [str(Path(d).resolve()) if Path(d).exists() else d for d in data_args.dataset],
            "config": data_args.dataset_config, "split": data_args.dataset_split, "field": data_args.text_field,
            "seed": seed, "shuffle_buffer": data_args.shuffle_buffer, "max_documents": data_args.max_documents}


def vocab_digest(tokenizer) -> str:
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]


def write_cache(teacher, tokenizer, blocks, out: Path, *, top_k: int, temperature: float, block_size: int,
                data: dict, teacher_name: str, batch_size: int = 8, shard_blocks: int = 4096,
                chunk_size: int = 1024, overwrite: bool = False) -> dict:
    """Write the cache of BLOCKS (an iterable of {"input_ids": [T]} rows) to OUT (beside it, then renamed)."""
    from safetensors.torch import save_file

    from bitft.files import atomic_dir
    from bitft.train.sparse_kd import teacher_top_k

    vocab = teacher.get_output_embeddings().weight.shape[0]
    if not 1 <= top_k <= vocab:
        raise ConfigError(f"--top-k must be in [1, {vocab}] (the teacher's vocabulary), got {top_k}")
    id_dtype = torch.uint16 if vocab <= 1 << 16 else torch.int32
    device = next(teacher.parameters()).device
    start, shards, n = time.time(), [], 0
    with atomic_dir(Path(out), overwrite) as tmp:
        rows: dict[str, list[torch.Tensor]] = {"input_ids": [], "teacher_logp": [], "teacher_ids": []}

        def flush():
            if rows["input_ids"]:
                name = f"blocks-{len(shards):05d}.safetensors"
                shard = {k: torch.cat(v) for k, v in rows.items()}
                save_file(shard, str(tmp / name))
                shards.append({"file": name, "blocks": len(shard["input_ids"])})
                for v in rows.values():
                    v.clear()

        it = iter(blocks)  # read as it goes: a stream's blocks are never all in memory
        while batch := list(itertools.islice(it, batch_size)):
            ids = torch.stack([torch.as_tensor(r["input_ids"]) for r in batch]).to(device)
            with torch.inference_mode():
                hidden = teacher.base_model(input_ids=ids).last_hidden_state
                logp, top = teacher_top_k(hidden, teacher.get_output_embeddings(), top_k, temperature, chunk_size)
            rows["input_ids"].append(ids.cpu().to(torch.int32))
            rows["teacher_logp"].append(logp.cpu().to(torch.float16))
            rows["teacher_ids"].append(top.cpu().to(id_dtype))
            n += len(batch)
            if n - sum(s["blocks"] for s in shards) >= shard_blocks:
                flush()
                logger.info("teacher cache: %d blocks, %.0f s", n, time.time() - start)
        flush()
        if n == 0:
            raise ConfigError("the recipe's data gave no training block to cache")
        size = sum((tmp / s["file"]).stat().st_size for s in shards)
        manifest = {"format": FORMAT, "version": 1, "teacher": teacher_name, "top_k": top_k, "temperature": temperature,
                    "block_size": block_size, "blocks": n, "tokens": n * block_size, "vocab_size": vocab,
                    "vocab_digest": vocab_digest(tokenizer), "data": data, "shards": shards, "bytes": size,
                    "bytes_per_token": round(size / (n * block_size), 1), "seconds": round(time.time() - start, 1)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


class CachedBlocks(torch.utils.data.Dataset):
    """The cache's blocks as the recipe's training set: {"input_ids", "labels", "teacher_logp", "teacher_ids"},
    read from the shards one block at a time (memory-mapped); TOP_K ≤ the cache's K keeps the K most likely."""

    def __init__(self, folder: str | Path, top_k: int = 0):
        from safetensors import safe_open

        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise ConfigError(f"teacher_cache {self.folder}: no {MANIFEST} (not a finished `bitft teacher-cache` output)")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ConfigError(f"teacher_cache {self.folder}: {MANIFEST} is not a bitft teacher cache")
        k = self.manifest["top_k"]
        if top_k > k:
            raise ConfigError(f"distill_top_k={top_k} but teacher_cache {self.folder} holds the top {k}: "
                              f"set distill_top_k ≤ {k} (0 = all {k}) or write a cache with --top-k {top_k}")
        self.k = top_k or k
        self.paths, self.index, self._files = [], [], None
        for i, shard in enumerate(self.manifest["shards"]):
            f = self.folder / shard["file"]
            if not f.is_file():
                raise ConfigError(f"teacher_cache {self.folder}: shard {shard['file']} is missing")
            try:
                with safe_open(str(f), framework="pt") as h:
                    rows = h.get_slice("input_ids").get_shape()[0]
            except Exception as e:
                raise ConfigError(f"teacher_cache {self.folder}: {shard['file']} cannot be read ({e}): write the cache again") from None
            if rows != shard["blocks"]:
                raise ConfigError(f"teacher_cache {self.folder}: {shard['file']} holds {rows} blocks, "
                                  f"{MANIFEST} says {shard['blocks']} (a damaged cache: write it again)")
            self.paths.append(str(f))
            self.index += [(i, r) for r in range(rows)]

    def __getstate__(self):  # DataLoader workers open their own handles
        return {**self.__dict__, "_files": None}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        from safetensors import safe_open

        if self._files is None:
            self._files = [safe_open(p, framework="pt") for p in self.paths]
        f, r = self.index[i]
        shard = self._files[f]
        ids = shard.get_slice("input_ids")[r].long()
        return {"input_ids": ids, "labels": ids.clone(),
                "teacher_logp": shard.get_slice("teacher_logp")[r][:, :self.k].float(),
                "teacher_ids": shard.get_slice("teacher_ids")[r][:, :self.k].long()}

    def check(self, *, block_size: int, temperature: float, data: dict, tokenizer) -> None:
        """One line naming what differs between the cache and the recipe that wants to train on it."""
        m, where = self.manifest, f"teacher_cache {self.folder}"
        wrong = []
        if m["block_size"] != block_size:
            wrong.append(f"block_size {m['block_size']} (the recipe: {block_size})")
        if m["temperature"] != temperature:
            wrong.append(f"distill_temperature {m['temperature']} (the recipe: {temperature})")
        if m["vocab_digest"] != vocab_digest(tokenizer):
            wrong.append("another tokenizer's vocabulary")
        keys = sorted(k for k in set(m["data"]) | set(data) if m["data"].get(k) != data.get(k))
        if keys:
            wrong.append("other data (" + ", ".join(f"{k}: {m['data'].get(k)!r} vs {data.get(k)!r}" for k in keys) + ")")
        if wrong:
            raise ConfigError(f"{where} was written for {'; '.join(wrong)}: write it again with "
                              "`bitft teacher-cache --config` of this recipe")


def cache_for_recipe(argv: list[str], out: Path, *, top_k: int, batch_size: int = 8, max_blocks: int | None = None,
                     overwrite: bool = False) -> dict:
    """`bitft teacher-cache`: the cache of the warmup recipe's training blocks, ARGV its `--config FILE [--key value ...]`."""
    from transformers import TrainingArguments

    from bitft.config import (ClusterArguments, DistillArguments, LambdaArguments, ModelArguments,
                              PretrainDataArguments, parse_config)
    from bitft.data.pretrain import PackedBlocks, build_datasets
    from bitft.train.distill import build_teacher
    from bitft.train.model import load_model

    if top_k < 1:  # before any weight loads
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    model_args, data_args, _, distill_args, _, args = parse_config(
        (ModelArguments, PretrainDataArguments, LambdaArguments, DistillArguments, ClusterArguments, TrainingArguments),
        argv)
    model, tokenizer, _ = load_model(model_args, lam=1.0)
    teacher = build_teacher(model, tokenizer, distill_args.teacher_name_or_path, distill_args.torch_teacher_dtype())
    del model
    seed = args.data_seed if args.data_seed is not None else args.seed
    train_set, _ = build_datasets(
        tokenizer, data_args.dataset, block_size=data_args.block_size, eval_blocks=data_args.eval_blocks, seed=seed,
        dataset_config=data_args.dataset_config, split=data_args.dataset_split, text_field=data_args.text_field,
        shuffle_buffer=data_args.shuffle_buffer, max_documents=data_args.max_documents)
    if not isinstance(train_set, PackedBlocks) and max_blocks is None:  # a stream: what max_steps will read
        max_blocks = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        if max_blocks <= 0:
            raise ConfigError("the recipe streams its data and sets no max_steps: pass --max-blocks")
    blocks = train_set if max_blocks is None else itertools.islice(iter(train_set), max_blocks)
    return write_cache(teacher, tokenizer, blocks, out, top_k=top_k, temperature=distill_args.distill_temperature,
                       block_size=data_args.block_size, data=data_identity(data_args, seed),
                       teacher_name=distill_args.teacher_name_or_path or f"{model_args.model_name_or_path} (full precision)",
                       batch_size=batch_size, chunk_size=distill_args.distill_chunk_size, overwrite=overwrite)
