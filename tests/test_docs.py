"""The docs check: what README.md and doc/*.md tell a reader to run, and where they send them.

- Every fenced command (```bash, ```sh, ```shell, ```console or unlabelled) that runs a script of
  the repository (``python train.py``, ``.venv/bin/python -m data.prepare_manifest``,
  ``torchrun ... train.py``, ``./monitor_training.sh``, also inside a quoted ``tmux new '...'``)
  uses only options that script accepts, and every ``--set section.key=value`` names a config
  key. A script's options are read from its argparse calls (``add_argument``) without importing
  it, or from its ``--help`` where it has none (shell scripts, a parser built elsewhere).
- ``make`` lines name targets and variables of the Makefile (``DEMO_SETS`` overrides too).
- Every relative markdown link ``[x](path)`` / ``[x](path#anchor)`` points at a file or folder
  that exists, and an anchor into a markdown file at one of its headings.

A failure names the doc file, the line and what is wrong there.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import typing
from collections.abc import Iterator
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "doc").glob("*.md"))]
COMMAND_LANGS = frozenset({"", "bash", "sh", "shell", "console", "zsh"})
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([^`\s]*)")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PYTHON = re.compile(r"^(?:.*/)?python(?:\d+(?:\.\d+)*)?$")
OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
NEGATIVE_NUMBER = re.compile(r"^-\d")
OPERATORS = frozenset("|&;()")
REDIRECTIONS = frozenset("<>")
HELP_TIMEOUT_S = 120


# ---------------------------------------------------------------------------------------------
# Reading the docs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One fenced block: its info string and its lines as (line number, text)."""

    lang: str
    lines: tuple[tuple[int, str], ...]


def fenced_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text (an unclosed fence runs to the end)."""
    blocks: list[Block] = []
    fence: str | None = None
    lang = ""
    lines: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence, lang, lines = match.group(1), match.group(2).lower(), []
            continue
        if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                and not match.group(2):
            blocks.append(Block(lang, tuple(lines)))
            fence = None
            continue
        lines.append((number, line))
    if fence is not None:
        blocks.append(Block(lang, tuple(lines)))
    return blocks


def prose_lines(text: str, *, code_spans: bool = False) -> Iterator[tuple[int, str]]:
    """The lines outside fenced blocks, with inline code spans blanked out (kept with
    ``code_spans``)."""
    in_fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if in_fence is None and match:
            in_fence = match.group(1)
            continue
        if in_fence is not None:
            if match and match.group(1)[0] == in_fence[0] and not match.group(2):
                in_fence = None
            continue
        yield number, line if code_spans else re.sub(r"(`+)(.+?)\1", "", line)


def command_lines(block: Block) -> Iterator[tuple[int, str]]:
    """Shell command lines of a block, continuation lines joined, console prompts removed (in a
    console block, lines without a prompt are output)."""
    pending: list[str] = []
    start = 0
    for number, line in block.lines:
        text = line.strip()
        if block.lang == "console" and not pending:
            if not text.startswith("$ "):
                continue
            text = text[2:]
        if not pending:
            start = number
        if text.endswith("\\"):
            pending.append(text[:-1])
            continue
        pending.append(text)
        yield start, " ".join(pending)
        pending = []
    if pending:
        yield start, " ".join(pending)


# ---------------------------------------------------------------------------------------------
# Shell words
# ---------------------------------------------------------------------------------------------


def shell_words(line: str) -> list[str]:
    """The words and operators of a shell line, comments removed (``ValueError`` on unbalanced
    quotes)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def simple_commands(line: str) -> Iterator[list[str]]:
    """The simple commands of a line (split at pipes, lists and subshells, redirections and
    their targets dropped, leading variable assignments removed); a quoted word that is itself
    a command line (``tmux new 'python train.py ...'``) is searched as well."""
    words = shell_words(line)
    command: list[str] = []
    skip_next = False
    for word in [*words, ";"]:
        if skip_next:
            skip_next = False
            continue
        if word and set(word) <= REDIRECTIONS | {"&"} and set(word) & REDIRECTIONS:
            skip_next = True
            continue
        if word and set(word) <= OPERATORS:
            while command and ENV_ASSIGNMENT.match(command[0]):
                command.pop(0)
            if command:
                yield command
            command = []
            continue
        command.append(word)
    for word in words:
        if " " in word.strip():
            try:
                yield from simple_commands(word)
            except ValueError:
                continue


@dataclass(frozen=True)
class Invocation:
    """A repository script run by a command: its path (relative to the repository root) and
    the words after it."""

    shown: str
    script: str
    args: tuple[str, ...]


def _repo_script(word: str) -> str | None:
    """``word`` as a repository path of a script, or None when it is not one of ours."""
    path = word.removeprefix("./")
    if path.startswith(("/", "~", "$")) or not path.endswith((".py", ".sh")):
        return None
    return path


def _module_script(module: str) -> str | None:
    """The file of ``python -m module`` when the module belongs to the repository."""
    parts = module.split(".")
    if not (REPO_ROOT / f"{parts[0]}.py").is_file() and not (REPO_ROOT / parts[0]).is_dir():
        return None
    path = "/".join(parts)
    if (REPO_ROOT / path / "__main__.py").is_file():
        return f"{path}/__main__.py"
    return f"{path}.py"


def invocation(command: list[str]) -> Invocation | None:
    """The repository script that ``command`` runs, if any."""
    program, rest = command[0], command[1:]
    if PYTHON.match(program):
        for i, word in enumerate(rest):
            if word == "-m" and i + 1 < len(rest):
                script = _module_script(rest[i + 1])
                if script is None:
                    return None
                return Invocation(f"python -m {rest[i + 1]}", script, tuple(rest[i + 2:]))
            if word == "-c":
                return None
            if not word.startswith("-"):
                script = _repo_script(word)
                return None if script is None else Invocation(script, script, tuple(rest[i + 1:]))
        return None
    if program == "torchrun" or program in ("bash", "sh"):
        for i, word in enumerate(rest):
            script = _repo_script(word)
            if script is not None:
                return Invocation(script, script, tuple(rest[i + 1:]))
        return None
    script = _repo_script(program)
    return None if script is None else Invocation(script, script, tuple(rest))


# ---------------------------------------------------------------------------------------------
# What the scripts, the config and the Makefile accept
# ---------------------------------------------------------------------------------------------


def _flags_from_source(path: Path) -> frozenset[str]:
    """Option strings of every ``add_argument`` call in a Python file (empty when none)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    flags = {
        arg.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "add_argument"
        for arg in node.args
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
        and arg.value.startswith("-")
    }
    return frozenset(flags | {"-h", "--help"}) if flags else frozenset()


def _flags_from_help(path: Path) -> frozenset[str]:
    """Option strings that ``SCRIPT --help`` prints."""
    runner = [sys.executable] if path.suffix == ".py" else [shutil.which("bash") or "bash"]
    proc = subprocess.run(
        [*runner, str(path), "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=HELP_TIMEOUT_S, check=False, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    return frozenset(OPTION.findall(proc.stdout)) | {"-h", "--help"}


@functools.cache
def accepted_flags(script: str) -> frozenset[str]:
    path = REPO_ROOT / script
    flags = _flags_from_source(path) if path.suffix == ".py" else frozenset()
    return flags or _flags_from_help(path)


@functools.cache
def config_keys() -> dict[str, frozenset[str]]:
    """Section -> keys that ``--set section.key=value`` accepts (model: any family's)."""
    import config
    from models import registry

    keys: dict[str, frozenset[str]] = {}
    for section, tp in typing.get_type_hints(config.Config).items():
        if section == "model":
            names = {"arch"}
            for family in getattr(registry, "FAMILIES", {}).values():
                names.update(f.name for f in fields(family.args))
            keys[section] = frozenset(names)
        elif is_dataclass(tp):
            keys[section] = frozenset(f.name for f in fields(tp))
    for (section, key), _ in getattr(config, "MOVED_KEYS", {}).items():
        keys[section] = keys.get(section, frozenset()) | {key}
    return keys


def override_problem(item: str) -> str | None:
    """Why ``section.key=value`` is not a config override, or None."""
    name, sep, _ = item.partition("=")
    if not sep or name.count(".") != 1:
        return f"'{item}' is not of the form section.key=value"
    section, key = name.split(".")
    keys = config_keys()
    if section not in keys:
        return f"'{item}': no config section '{section}' (known: {', '.join(sorted(keys))})"
    if key not in keys[section]:
        return f"'{item}': no config key '{section}.{key}'"
    return None


@dataclass(frozen=True)
class Makefile:
    targets: frozenset[str]
    variables: frozenset[str]


@functools.cache
def makefile() -> Makefile:
    """Targets (variables in their names expanded) and variable names of the Makefile."""
    text = (REPO_ROOT / "Makefile").read_text()
    values: dict[str, str] = {}
    for match in re.finditer(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(?::=|\?=|\+=|=)\s*(.*)$", text, re.M):
        values.setdefault(match.group(1), match.group(2).split("#")[0].strip())

    def expand(s: str, depth: int = 0) -> str:
        if depth > 10:
            return s
        return re.sub(r"\$\((\w+)\)", lambda m: expand(values.get(m.group(1), ""), depth + 1), s)

    targets = set()
    for match in re.finditer(r"^([^\s#:=][^:=]*?)\s*:(?!=)", text, re.M):
        targets.update(expand(match.group(1)).split())
    used = set(re.findall(r"\$\((\w+)\)", text))
    return Makefile(frozenset(targets - {".PHONY"}), frozenset(values) | used)


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------


def _make_problems(where: str, args: list[str]) -> list[str]:
    make, problems = makefile(), []
    skip_next = False
    for word in args:
        if skip_next:
            skip_next = False
            continue
        if word in ("-C", "-f", "-I", "-o", "-W"):
            skip_next = True
            continue
        if word.startswith("-"):
            continue
        name, sep, value = word.partition("=")
        if sep:
            if name not in make.variables:
                problems.append(f"{where}: `make` variable {name} is not in the Makefile")
            elif name == "DEMO_SETS":
                problems += [f"{where}: DEMO_SETS {msg}" for item in value.split()
                             if (msg := override_problem(item))]
        elif word not in make.targets:
            problems.append(f"{where}: `make {word}`: no such target in the Makefile "
                            f"(targets: {', '.join(sorted(make.targets))})")
    return problems


def _script_problems(where: str, run: Invocation) -> list[str]:
    if not (REPO_ROOT / run.script).is_file():
        return [f"{where}: `{run.shown}`: {run.script} does not exist"]
    accepted = accepted_flags(run.script)
    takes_set = "--set" in accepted
    problems = []
    args = list(run.args)
    for i, word in enumerate(args):
        if word == "--":
            break
        if not word.startswith("-") or word == "-" or NEGATIVE_NUMBER.match(word):
            continue
        flag, _, inline = word.partition("=")
        if flag not in accepted:
            problems.append(f"{where}: `{run.shown}` has no option {flag} "
                            f"(it accepts {', '.join(sorted(accepted))})")
        elif flag == "--set" and takes_set:
            item = inline or (args[i + 1] if i + 1 < len(args) else "")
            msg = override_problem(item)
            if msg:
                problems.append(f"{where}: `{run.shown} --set` {msg}")
    return problems


def _name(doc: Path) -> str:
    """How a failure names a doc: its path in the repository (its file name elsewhere)."""
    return doc.relative_to(REPO_ROOT).as_posix() if doc.is_relative_to(REPO_ROOT) else doc.name


def command_problems(doc: Path) -> list[str]:
    rel = _name(doc)
    problems: list[str] = []
    for block in fenced_blocks(doc.read_text()):
        if block.lang not in COMMAND_LANGS:
            continue
        for number, line in command_lines(block):
            where = f"{rel}:{number}"
            try:
                commands = list(simple_commands(line))
            except ValueError as err:
                if block.lang:  # an unlabelled block may hold a diagram, not a command
                    problems.append(f"{where}: cannot parse the command ({err}): {line}")
                continue
            for command in commands:
                if command[0] == "make":
                    problems += _make_problems(where, command[1:])
                    continue
                run = invocation(command)
                if run is not None:
                    problems += _script_problems(where, run)
    return problems


def _heading_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces
    to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@functools.cache
def anchors(doc: Path) -> frozenset[str]:
    """The anchors a markdown file offers: its headings' (duplicates numbered) and HTML ids."""
    text = doc.read_text()
    seen: dict[str, int] = {}
    found = set(re.findall(r"""<a\s+(?:name|id)=["']([^"']+)["']""", text))
    for _, line in prose_lines(text, code_spans=True):
        match = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = _heading_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return frozenset(found)


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
LINK_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")


def link_problems(doc: Path) -> list[str]:
    rel = _name(doc)
    problems: list[str] = []
    for number, line in prose_lines(doc.read_text()):
        targets = LINK.findall(line) + LINK_DEFINITION.findall(line)
        for target in targets:
            if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", target) or target.startswith("//"):
                continue  # a URL, mailto: ...
            path_part, _, anchor = target.partition("#")
            path = (doc.parent / unquote(path_part)).resolve() if path_part else doc
            where = f"{rel}:{number}"
            if not path.exists():
                problems.append(f"{where}: link [{target}] points at {path_part}, which does "
                                f"not exist")
            elif anchor and path.suffix == ".md" and path.is_file() \
                    and unquote(anchor) not in anchors(path):
                problems.append(f"{where}: link [{target}]: {path_part or rel} has no heading "
                                f"with the anchor #{anchor}")
    return problems


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

DOC_IDS = [doc.relative_to(REPO_ROOT).as_posix() for doc in DOCS]


@pytest.mark.parametrize("doc", DOCS, ids=DOC_IDS)
def test_fenced_commands_use_options_their_scripts_accept(doc: Path) -> None:
    problems = command_problems(doc)
    assert not problems, "\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=DOC_IDS)
def test_relative_links_point_at_existing_files(doc: Path) -> None:
    problems = link_problems(doc)
    assert not problems, "\n" + "\n".join(problems)


def test_readme_commands_are_found() -> None:
    """The check sees the README's commands (a parser that found none would pass anything)."""
    found = []
    for block in fenced_blocks((REPO_ROOT / "README.md").read_text()):
        if block.lang in COMMAND_LANGS:
            for _, line in command_lines(block):
                found += list(simple_commands(line))
    scripts = {run.script for command in found if (run := invocation(command)) is not None}
    assert {"train.py", "evaluate.py", "inference.py"} <= scripts, scripts
    assert ["make", "test"] in found, "README.md has no fenced `make test` (CI's command)"


def test_the_checker_reports_what_is_wrong(tmp_path: Path) -> None:
    """A made-up doc with good and bad commands and links: each bad one is named, with its line."""
    doc = tmp_path / "bad.md"
    doc.write_text(
        "```bash\n"
        "PYTHONUNBUFFERED=1 .venv/bin/python train.py --config a.yaml \\\n"
        "    --set train.run_dir=x --nonsense 1   # a comment --ignored\n"
        "tmux new -s t 'X=1 python -m data.prepare_manifest --config a.yaml --scan-onyl'\n"
        "torchrun --nproc_per_node 2 train.py --config a.yaml --set train.no_such_key=1\n"
        "make demo ARCH=spex_plus NOT_A_VARIABLE=1\n"
        "make no-such-target\n"
        "evaluate.py --ckpt c.pt --out-dir o --lufs -20 2>&1 | tee log\n"
        "python -m pytest -q --anything && pip install --whatever x\n"
        "```\n"
        "See [missing](nowhere.md), [the title](other.md#title), [a gap](other.md#no-such).\n"
    )
    (tmp_path / "other.md").write_text("# Title\n")
    problems = command_problems(doc) + link_problems(doc)
    text = "\n".join(problems)
    assert len(problems) == 7, text
    assert "bad.md:2: `train.py` has no option --nonsense" in text
    assert "bad.md:4: `python -m data.prepare_manifest` has no option --scan-onyl" in text
    assert "bad.md:5: `train.py --set` 'train.no_such_key=1': no config key" in text
    assert "bad.md:6: `make` variable NOT_A_VARIABLE" in text
    assert "bad.md:7: `make no-such-target`" in text
    assert "bad.md:11: link [nowhere.md] points at nowhere.md" in text
    assert "bad.md:11: link [other.md#no-such]" in text
