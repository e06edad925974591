"""Checking the docs' commands and links without running anything (tests/test_docs.py runs the checks).

A command is a line of a code block, or an inline code span, that starts (after `VAR=value` settings)
with `bitft`, `accelerate launch` or `python scripts/...`. It is checked by the parser that would read
it: `bitft.cli.build_parser()` (as `bitft.cli.main` parses); `accelerate launch`'s own parser, then
`bitft.config.parse_config` with the recipe's dataclasses (its `--config` file read, every YAML key and
flag a field, the flags typed); a script's own argparse parser, taken from its `main()` and stopped
before it does anything. Missing required arguments are allowed (prose names `bitft eval` without a
model); an unknown subcommand or flag, a bad value or a missing config, script or input file is not.

The conventions (docs/testing.md#docs-that-cannot-drift-teststest_docspy): UPPERCASE words (`RUN`,
`OUT.gguf`) are placeholders, never looked up on disk (a typed flag gets a valid stand-in); `[...]`
is optional and checked included; `a | b` and `a|b` are alternatives, each checked; `...` is skipped
and `# ...` is a comment. Paths into the repository (configs/, scripts/, recipes/, docs/, tests/,
bitft/) and `shipped:NAME` must exist, in commands and in inline code; outputs (runs/...) need not.
Links resolve with GitHub's heading slugs as anchors.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import re
import shlex
import sys
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
REPO_DIRS = ("configs/", "scripts/", "recipes/", "docs/", "tests/", "bitft/")
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*(\.[a-z0-9_]+)*")
ALTERNATIVES = re.compile(r"[\w.+-]+(\|[\w.+-]+)+")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# ------------------------------------------------------------------ finding commands and links

def fenced_and_prose(text: str) -> tuple[list[tuple[int, str]], str]:
    """(code-block lines with their line numbers, the text with code blocks blanked out)."""
    code, prose, fence = [], [], None
    for n, line in enumerate(text.split("\n"), 1):
        m = re.match(r"\s*(```+|~~~+)", line)
        if m and (fence is None or m.group(1).startswith(fence)):
            fence = None if fence else m.group(1)
            prose.append("")
        elif fence:
            code.append((n, line.strip()))
            prose.append("")
        else:
            prose.append(line)
    return code, "\n".join(prose)


def is_command(words: list[str]) -> bool:
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    if not words:
        return False
    head = Path(words[0]).name  # a head alone (`bitft`, `accelerate launch`) names the tool, not a command
    return ((head == "bitft" and len(words) > 1)
            or (words[:2] == ["accelerate", "launch"] or words[0].endswith("bin/accelerate")) and len(words) > 2
            or (head in ("python", "python3") and len(words) > 1 and words[1].startswith("scripts/")
                and words[1] != "scripts/..."))


def commands(path: Path) -> list[tuple[str, str]]:
    """[(where, command)] of a page: code-block lines (`\\` continues one) and inline code spans."""
    code, prose = fenced_and_prose(path.read_text(encoding="utf-8"))
    found, buf, start = [], "", 0
    for n, line in code:
        line = re.sub(r"(^|\s)#(\s.*)?$", "", line)  # a comment, to the end of the line (or of a `[... # x]`)
        if not buf:
            start = n
        buf += " " + line.rstrip("\\")
        if not line.endswith("\\"):
            if is_command(buf.split()):
                found.append((f"{rel(path)}:{start}", buf.strip()))
            buf = ""
    for m in re.finditer(r"(?<!`)`([^`]+?)`(?!`)", prose):
        span = " ".join(m.group(1).split())
        if "\n\n" not in m.group(1) and is_command(span.split()):
            found.append((f"{rel(path)}:{prose.count(chr(10), 0, m.start()) + 1}", span))
    return found


def variants(command: str) -> list[list[str]]:
    """The command's words once per alternative, optional parts included, env settings and `...` dropped."""
    command = re.sub(r"(^|\s)\[+", r"\1", re.sub(r"\]+(?=\s|$)", "", command))
    words = [w for w in shlex.split(command) if w not in ("...", "…")]
    while re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    slots: list[list[str]] = []
    for w in words:
        if w == "|":
            slots.append(["|"])
        elif slots and slots[-1] == ["|"]:
            slots.pop()
            slots[-1].append(w)
        else:
            slots.append(w.split("|") if ALTERNATIVES.fullmatch(w) else [w])
    n = max(len(s) for s in slots)
    return [[s[min(k, len(s) - 1)] for s in slots] for k in range(n)]


# ------------------------------------------------------------------ checking one command

class ParseError(Exception):
    pass


class Parsed(Exception):
    """Raised by a patched parser once it has parsed: what it parsed, nothing run."""


def raise_instead(parser: argparse.ArgumentParser) -> None:
    """Make PARSER (and its subparsers) raise ParseError instead of exiting, and require nothing."""
    def error(message):
        raise ParseError(message)
    parser.error = error
    parser.allow_abbrev = False  # a renamed --windows must not pass as an abbreviation `--window`
    for group in parser._mutually_exclusive_groups:
        group.required = False
    for action in parser._actions:
        action.required = False
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                raise_instead(sub)


def with_stand_ins(parse, words: list[str]):
    """PARSE(words), a placeholder that a typed flag refuses replaced by a valid value (a choice, or 1)."""
    words = list(words)
    for _ in range(len(words) + 1):
        try:
            return parse(words)
        except ParseError as e:
            m = re.search(r"invalid (?:\w+ value|choice): '([^']*)'", str(e))
            if not (m and PLACEHOLDER.fullmatch(m.group(1)) and m.group(1) in words):
                raise
            choices = re.search(r"choose from '([^']*)'", str(e))
            words[words.index(m.group(1))] = choices.group(1) if choices else "1"
    raise AssertionError("unreachable")


def check_paths(words: list[str]) -> None:
    for w in words:
        value = w.split("=", 1)[1] if w.startswith("--") and "=" in w else w
        if value.startswith("shipped:"):
            assert (REPO / "bitft/resources" / value[len("shipped:"):]).exists(), f"no shipped data {value}"
        elif value.startswith(REPO_DIRS) and not PLACEHOLDER.fullmatch(Path(value).name):
            assert (REPO / value).exists(), f"{value} does not exist"


@cache
def bitft_parser() -> argparse.ArgumentParser:
    from bitft.cli import build_parser

    parser = build_parser()
    raise_instead(parser)
    return parser


def check_bitft(args: list[str]) -> None:
    """As bitft.cli.main parses: teacher-cache hands the flags it does not know to the warmup recipe."""
    ns, extra = with_stand_ins(bitft_parser().parse_known_args, args)
    if ns.command == "teacher-cache":
        check_recipe("recipes/warmup_10B.py", ["--config", ns.config, *extra] if ns.config else extra)
    elif extra:
        raise ParseError(f"unrecognized arguments: {' '.join(extra)}")


@cache
def recipe_types(recipe: str) -> tuple:
    """The dataclasses RECIPE passes to parse_config, read from its source (the recipe is not imported)."""
    tree = ast.parse((REPO / recipe).read_text(encoding="utf-8"))
    where = {a.asname or a.name: node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             for a in node.names}
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "parse_config")
    return tuple(getattr(importlib.import_module(where[e.id]), e.id) for e in call.args[0].elts)


def recipe_fields(recipe: str) -> set[str]:
    import dataclasses

    return {f.name for t in recipe_types(recipe) for f in dataclasses.fields(t) if f.init}


def check_recipe(recipe: str, args: list[str]) -> None:
    """bitft.config.parse_config's checks (the --config file, its keys and the flags are fields), then its
    argparse parser on the flags (types, choices); the dataclasses are not built: their __post_init__
    checks the machine (a bf16 reference config refuses a CPU-only one)."""
    from trl import TrlParser

    from bitft.config import parse_config
    from bitft.errors import ConfigError

    def parse_flags(self, argv, *a, **k):
        argv = list(argv)
        if "--config" in argv:
            del argv[argv.index("--config"):argv.index("--config") + 2]
        raise_instead(self)
        raise Parsed(with_stand_ins(lambda w: argparse.ArgumentParser.parse_args(self, w), argv))

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(TrlParser, "parse_args_and_config", parse_flags)
            parse_config(recipe_types(recipe), with_stand_ins(lambda w: w, args))
    except ConfigError as e:
        raise ParseError(str(e)) from None
    except Parsed:
        return
    raise AssertionError(f"{recipe}: parse_config returned without parsing")


@cache
def accelerate_parser() -> argparse.ArgumentParser:
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    raise_instead(parser)
    return parser


def check_accelerate(args: list[str]) -> None:
    ns = with_stand_ins(accelerate_parser().parse_args, args)
    script = ns.training_script
    if script is None:  # `accelerate launch --cpu` in prose: the launcher's flags only
        return
    assert script.startswith(("recipes/", "scripts/")) and (REPO / script).is_file(), f"no such recipe {script}"
    check_paths(ns.training_script_args)
    check_recipe(script, ns.training_script_args)


def check_script(script: str, args: list[str]) -> None:
    """Run SCRIPT's main() until it parses ARGS; flags it passes on (parse_known_args) go to the recipe it runs."""
    path = REPO / script
    assert path.is_file(), f"no such script {script}"
    source = path.read_text(encoding="utf-8")
    if not args:
        return
    assert "parse_args" in source or "parse_known_args" in source, f"{script} takes no arguments"
    real_known = argparse.ArgumentParser.parse_known_args

    def parse_known(self, _args=None, namespace=None):
        raise_instead(self)
        ns, extra = with_stand_ins(lambda w: real_known(self, w), args)
        raise Parsed(extra)

    def parse(self, _args=None, namespace=None):
        try:
            parse_known(self)
        except Parsed as p:
            if p.args[0]:
                raise ParseError(f"unrecognized arguments: {' '.join(p.args[0])}") from None
            raise

    spec = importlib.util.spec_from_file_location(f"docs_check_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path[:0] = [str(path.parent), str(REPO)]
    try:
        spec.loader.exec_module(module)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(argparse.ArgumentParser, "parse_known_args", parse_known)
            mp.setattr(argparse.ArgumentParser, "parse_args", parse)
            module.main()
        raise AssertionError(f"{script}: main() returned without parsing its arguments")
    except Parsed as p:
        extra = p.args[0]
    finally:
        del sys.path[:2]
    if extra:  # study scripts hand the flags they do not know to every recipe run
        recipe = re.search(r"recipes/\w+\.py", source)
        assert recipe, f"{script}: unrecognized arguments {extra}"
        known = recipe_fields(recipe.group(0))
        unknown = [w for w in extra if w.startswith("--") and w[2:].split("=")[0] not in known]
        assert not unknown, f"{script} passes {unknown} to {recipe.group(0)}, which has no such field"


def check_command(command: str) -> None:
    for words in variants(command):
        check_paths(words)
        head = Path(words[0]).name
        if head == "bitft":
            check_bitft(words[1:])
        elif head in ("python", "python3"):
            check_script(words[1], words[2:])
        else:
            check_accelerate(words[2:] if words[1] == "launch" else words[1:])


# ------------------------------------------------------------------ links and anchors

def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def anchors(page: Path) -> set[str]:
    code, prose = fenced_and_prose(page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} (.+)$", prose, re.M):
        s = slug(m.group(1))
        out.add(f"{s}-{seen[s]}" if s in seen else s)
        seen[s] = seen.get(s, 0) + 1
    return out


def check_target(base: Path, target: str) -> str | None:
    """Why TARGET (path[#anchor], relative to BASE's folder) does not resolve, or None."""
    path, _, anchor = target.partition("#")
    dest = (base.parent / path).resolve() if path else base
    if not dest.exists():
        return f"{path} does not exist"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"{rel(dest)} has no heading #{anchor}"
    return None


def cited_files() -> list[Path]:
    files = [REPO / "Makefile", REPO / "pyproject.toml", REPO / "bitft/resources/README.md"]
    for folder, pattern in (("bitft", "*.py"), ("recipes", "*.py"), ("scripts", "*"), ("configs", "*.yaml"),
                            ("tests", "*.py")):
        files += [p for p in (REPO / folder).rglob(pattern) if p.is_file()]
    return files
