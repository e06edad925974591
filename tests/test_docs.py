"""The docs cannot drift: every command in README.md and docs/**/*.md parses, and every link resolves.

Each command (`bitft ...`, `accelerate launch ... recipes/...`, `python scripts/...`) is parsed, not run,
by the parser that would read it, and the configs, scripts and inputs it names must exist
(tests/docs_check.py; the conventions for placeholders and optional parts: docs/testing.md). Every
relative link and #anchor between the pages resolves; every `docs/PAGE.md[#anchor]` cited in code,
configs, scripts and tests does too, and no file cites a README section that README.md does not have.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from docs_check import (PAGES, PLACEHOLDER, REPO, ParseError, check_command, check_target, cited_files, commands,
                        fenced_and_prose, rel, variants)

ALL_COMMANDS = [c for page in PAGES for c in commands(page)]


def test_the_pages_have_commands():
    """The extraction finds the README's tour and every kind of command (a broken finder checks nothing)."""
    assert len(ALL_COMMANDS) > 60
    texts = " ".join(c for _, c in ALL_COMMANDS)
    for needle in ("bitft convert smollm2", "recipes/warmup_10B.py", "recipes/sft.py", "recipes/dpo.py",
                   "bitft export", "bitft eval", "python scripts/check_conversion.py", "python scripts/recipe_study.py"):
        assert needle in texts, needle


@pytest.mark.parametrize("where,command", ALL_COMMANDS, ids=[w for w, _ in ALL_COMMANDS])
def test_command_parses(where, command):
    try:
        check_command(command)
    except (ParseError, AssertionError) as e:
        pytest.fail(f"{where}: `{command}`: {e}", pytrace=False)


def test_the_conventions_expand():
    assert variants("OMP_NUM_THREADS=1 bitft eval MODEL --ppl [--backend llama.cpp|transformers] ...  ") == [
        ["bitft", "eval", "MODEL", "--ppl", "--backend", "llama.cpp"],
        ["bitft", "eval", "MODEL", "--ppl", "--backend", "transformers"]]
    assert variants("x --ternary_init mse | 1.5 | gptq")[2] == ["x", "--ternary_init", "gptq"]


@pytest.mark.parametrize("command", [
    "bitft eval MODEL --ppl --window 4",                                    # --windows renamed
    "bitft evaluate MODEL --ppl",                                           # a subcommand that is not there
    "bitft export CKPT --gguf -o OUT.gguf --float-type bf16",               # a value that is not a choice
    "accelerate launch recipes/sft.py --config configs/demo/sft.yaml --model_path RUN",  # a recipe flag
    "accelerate launch recipes/sft.py --config configs/demo/sft_fast.yaml",  # a config that is not there
    "accelerate launch recipes/finetune.py --config configs/demo/sft.yaml",  # a recipe that is not there
    "python scripts/check_conversion.py CKPT --source smollm2 --window 2",  # a script's flag
    "python scripts/recipe_study.py --seeds 42 --learning_rte 1e-3",        # a flag a study hands to its recipe
    "bitft eval smollm2 --data shipped:eval/wikitext3.raw",                 # shipped data that is not there
])
def test_a_drifted_command_fails(command):
    """The checker fails on what a rename leaves behind (a checker that passes everything proves nothing)."""
    with pytest.raises((ParseError, AssertionError)):
        check_command(command)


def test_links_between_pages_resolve():
    bad = []
    for page in PAGES:
        _, prose = fenced_and_prose(page.read_text(encoding="utf-8"))
        for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose):
            target = m.group(1)
            if not re.match(r"[a-z]+:", target) and (why := check_target(page, target)):
                bad.append(f"{rel(page)}: ({target}): {why}")
    assert not bad, "\n".join(bad)


def test_inline_paths_exist():
    """A file or folder of the repository named in inline code exists (a renamed script or config shows)."""
    bad = []
    for page in PAGES:
        _, prose = fenced_and_prose(page.read_text(encoding="utf-8"))
        for m in re.finditer(r"`((?:configs|scripts|recipes|docs|tests|bitft)/[\w./-]*)`", prose):
            path = m.group(1).removesuffix("...")  # `scripts/...`: the folder
            if not PLACEHOLDER.fullmatch(Path(path).name) and not (REPO / path).exists():
                bad.append(f"{rel(page)}: {m.group(1)}")
    assert not bad, "\n".join(bad)


def test_docs_cited_in_code_resolve():
    """`docs/PAGE.md#anchor` in a comment, docstring or config resolves; no README section is cited that is gone."""
    readme_headings = {h.lower() for h in re.findall(r"^#{1,6} (.+)$", (REPO / "README.md").read_text(), re.M)}
    bad, cited = [], 0
    for f in cited_files():
        text = f.read_text(encoding="utf-8", errors="replace")
        for m in re.finditer(r"\bdocs/([\w/.-]+)\.md(?:#[\w-]+)?", text):
            if PLACEHOLDER.fullmatch(Path(m.group(1)).name):  # `docs/PAGE.md` in a description
                continue
            cited += 1
            if why := check_target(REPO / "x", m.group(0)):
                bad.append(f"{rel(f)}: {m.group(0)}: {why}")
        for m in re.finditer(r"README(?:'s)?:? \"([^\"]+)\"", text):
            if m.group(1).lower() not in readme_headings:
                bad.append(f"{rel(f)}: cites README section \"{m.group(1)}\", which README.md does not have")
    assert cited >= 10 and not bad, "\n".join(bad) or f"only {cited} docs citations found"
