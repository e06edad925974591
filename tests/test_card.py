"""Model cards (bitft.card): what `bitft convert` and both exports write beside the model.

- a source fetched as a hub id (from a local hub cache, offline) → convert → packed export: the card's
  front matter names the hub id as base_model (not the base_model of the source's own README), carries
  the source's licence, and states λ and the bits per weight that the export's size table printed;
- a GGUF export gets NAME.md beside the file (never README.md), with the bits per weight of its table,
  and an existing NAME.md that is not a bitft card is left alone with a one-line error;
- cards are written atomically: no temporary file is left beside them.
"""

from __future__ import annotations

import re

import pytest
import yaml
from helpers import TINY, family_tokenizer, tiny_model, with_tokenizer
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, LlamaConfig

import bitft
from bitft.card import card_path, read_card
from bitft.cli import main
from bitft.errors import BitftError

HUB_ID = "bitft-test/tiny-llama"


def front_matter(path) -> dict:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


@pytest.fixture
def hub_source(tmp_path, monkeypatch):
    """HUB_ID in a local hub cache (as a download leaves it), its README saying apache-2.0 and its own parent."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    tiny_model("llama").save_pretrained(snapshot)
    (snapshot / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: someone/the-parent\n---\n# tiny\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return HUB_ID


def bits_printed(out: str) -> str:
    return re.search(r"bits per linear weight\s+(\d+\.\d+)", out).group(1)


def test_packed_export_card(tmp_path, hub_source, capsys):
    assert main(["convert", hub_source, "-o", str(tmp_path / "ckpt")]) == 0
    converted = front_matter(tmp_path / "ckpt" / "README.md")  # the source's README replaced by bitft's card
    assert converted["base_model"] == HUB_ID and converted["license"] == "apache-2.0"
    capsys.readouterr()
    assert main(["export", str(tmp_path / "ckpt"), "--packed", "-o", str(tmp_path / "packed")]) == 0
    bits = bits_printed(capsys.readouterr().out)

    readme = tmp_path / "packed" / "README.md"
    meta = front_matter(readme)
    assert meta["base_model"] == HUB_ID  # the model it came from, not the source README's own base_model
    assert meta["license"] == "apache-2.0"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"bitnet", "1.58-bit", "bitft"} <= set(meta["tags"])
    text = ModelCard.load(readme).text
    assert "**λ**: 1 (ternary)" in text
    assert f"**bits per linear weight**: {bits} " in text and bits == "2.006"
    assert f"converted from `{HUB_ID}` by `bitft convert`" in text
    assert f"exported by `bitft export --packed` from `{tmp_path / 'ckpt'}`" in text
    assert "14 linear layers" in text and "LlamaForCausalLM (llama), 2 layers × 64 hidden" in text
    assert 'AutoModelForCausalLM.from_pretrained("packed")' in text and "import bitft" not in text
    assert read_card(tmp_path / "packed")[1][0].startswith(f"- converted from `{HUB_ID}`")
    assert not [p for p in tmp_path.rglob(".*tmp*")]


def test_a_local_source_without_readme_has_no_base_model_or_license(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), "-o", str(tmp_path / "ckpt")]) == 0
    assert main(["export", str(tmp_path / "ckpt"), "--packed", "-o", str(tmp_path / "packed")]) == 0
    meta = front_matter(tmp_path / "packed" / "README.md")
    assert "base_model" not in meta and "license" not in meta  # left out, not guessed
    assert f"converted from `{tmp_path / 'src'}`" in (tmp_path / "packed" / "README.md").read_text()


@pytest.fixture(scope="module")
def gguf_export(tmp_path_factory):
    """A λ=1 Llama (in_features 256: TQ2_0-packed) with the real Llama-3.2 tokenizer, exported by
    `bitft export --gguf` into a folder that has a README.md of its own: (folder, printed output)."""
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("gguf")
    config = LlamaConfig(**{**TINY, "hidden_size": 256, "intermediate_size": 512, "vocab_size": 128256})
    bitft.convert_model(AutoModelForCausalLM.from_config(config)).save_pretrained(tmp / "ckpt")
    with_tokenizer(tmp / "ckpt", family_tokenizer("llama3.2"))
    (tmp / "README.md").write_text("a folder's own README\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["export", str(tmp / "ckpt"), "--gguf", "-o", str(tmp / "m.gguf")]) == 0
    return tmp, out.getvalue()


def test_gguf_export_card_is_beside_the_file(gguf_export):
    tmp, out = gguf_export
    bits = bits_printed(out)
    assert card_path(tmp / "m.gguf") == tmp / "m.md" and f"model card              {tmp / 'm.md'}" in out
    assert (tmp / "README.md").read_text() == "a folder's own README\n"
    meta = front_matter(tmp / "m.md")
    assert meta["library_name"] == "gguf" and {"bitnet", "1.58-bit", "bitft", "gguf"} <= set(meta["tags"])
    text = (tmp / "m.md").read_text()
    assert f"**bits per linear weight**: {bits}" in text and bits == "2.062"
    assert "`llama` graph; ternary linear layers as TQ2_0" in text and "llama-cli -m m.gguf" in text
    assert "**λ**: 1 (ternary)" in text and f"exported by `bitft export --gguf` (TQ2_0) from `{tmp / 'ckpt'}`" in text


def test_gguf_card_never_replaces_a_file_that_is_not_a_bitft_card(gguf_export, tmp_path):
    from bitft.card import write_card

    tmp, _ = gguf_export
    (tmp_path / "other.gguf").symlink_to(tmp / "m.gguf")
    (tmp_path / "other.md").write_text("my notes\n")
    with pytest.raises(BitftError, match=r"other\.md exists and is not a bitft model card: .*other\.gguf is written"):
        write_card(tmp_path / "other.gguf", tmp / "ckpt")
    assert (tmp_path / "other.md").read_text() == "my notes\n" and not list(tmp_path.glob(".*"))
    (tmp_path / "other.md").unlink()
    for _ in range(2):  # its own card is replaced
        assert write_card(tmp_path / "other.gguf", tmp / "ckpt") == tmp_path / "other.md"
    assert read_card(tmp_path / "other.gguf")[0]["library_name"] == "gguf"
    (tmp_path / "mine.md").write_text("my notes\n")  # the export itself refuses before writing anything
    from bitft.export.gguf import export_gguf

    with pytest.raises(BitftError, match=r"mine\.md exists and is not a bitft model card: move that file away"):
        export_gguf(tmp / "ckpt", tmp_path / "mine.gguf")
    assert not (tmp_path / "mine.gguf").exists() and not list(tmp_path.glob(".mine*"))
    (tmp_path / "named.bin").symlink_to(tmp / "m.gguf")  # `-o FILE` need not end in .gguf
    assert write_card(tmp_path / "named.bin", tmp / "ckpt") == tmp_path / "named.md"
