"""Recipe fixtures: a tiny random Llama with a tiny tokenizer trained on the shared text, saved as a folder."""

from __future__ import annotations

import json

import pytest


from helpers import DATA, tiny_model  # noqa: F401 (tiny_model is used by the recipe tests)

PRETRAIN = DATA / "pretrain"


def tiny_tokenizer(vocab_size: int = 128):
    """A 128-token BPE tokenizer (eos `</s>`) trained on the C4 sample: deterministic, offline, instant."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in (PRETRAIN / "c4_sample.jsonl").read_text().splitlines() if line.strip()]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "</s>"], limit_alphabet=60,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


def make_tiny_folder(path):
    model = tiny_model("llama", seed=0)
    tokenizer = tiny_tokenizer(model.config.vocab_size)
    assert len(tokenizer) <= model.config.vocab_size
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory):
    """A tiny random Llama (2 layers, hidden 64, vocab 128) with a matching tokenizer."""
    return make_tiny_folder(tmp_path_factory.mktemp("tiny") / "tiny-llama")
