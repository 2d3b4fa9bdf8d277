"""The README is executable documentation: its examples run, in order, as a reader runs them.

- Every ```python block runs, in the order of the README, in one namespace (one Python
  process, as a reader pasting them into one session), in a fresh folder.
- Every ```bash / ```sh / ```console block runs too, as a shell script in that folder, with
  the installed ``tinytx`` command first on PATH (in a ```console block only the ``$ ``
  lines are commands; the rest is their output).
- The line right before a fence may say what to do with the block instead:
  ``<!-- readme: skip REASON -->`` (installs packages, needs network, takes minutes, needs
  a GPU or torch; the reason is required) or ``<!-- readme: save FILE -->`` (the text tells
  the reader to save the block as FILE: it is written there, not run).

The folder holds a link to the repository's ``tests/`` so the examples' fixture paths
(``tests/fixtures/tiny_gpt2``) mean what they mean in a clone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SHELL_LANGUAGES = ("bash", "sh", "console", "shell")
RUN_LANGUAGES = ("python", *SHELL_LANGUAGES)
FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*readme:\s*(skip|save)\b\s*(.*?)\s*-->\s*$")
SHELL_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    """One fenced code block of the README."""

    line: int  # 1-based line of the opening fence
    language: str
    code: str
    action: str  # "run", "skip" or "save"
    argument: str = ""  # the skip reason or the file name

    def __str__(self) -> str:
        return f"README.md line {self.line} ({self.language})"


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block of ``text``, with the marker on the line before its fence."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        marker = MARKER.match(lines[i - 1]) if i > 0 else None
        action, argument = (marker.group(1), marker.group(2)) if marker else ("run", "")
        code = "\n".join(lines[i + 1 : end]) + "\n"
        blocks.append(Block(i + 1, opening.group(1).lower(), code, action, argument))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
SHELL_BLOCKS = [b for b in BLOCKS if b.language in SHELL_LANGUAGES and b.action == "run"]


def shell_commands(block: Block) -> str:
    """The script of a shell block: a ```console block's ``$ `` lines, any other whole."""
    if block.language != "console":
        return block.code
    commands = [line[2:] for line in block.code.splitlines() if line.startswith("$ ")]
    return "\n".join(commands) + "\n"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A fresh folder as a reader's, with the repository's tests/ (fixtures) linked in
    and every ``save`` block written to its file."""
    (tmp_path / "tests").symlink_to(ROOT / "tests", target_is_directory=True)
    for block in BLOCKS:
        if block.action == "save":
            (tmp_path / block.argument).write_text(block.code, encoding="utf-8")
    return tmp_path


def reader_env() -> dict[str, str]:
    """The environment a reader has: this Python's scripts (``tinytx``) first on PATH,
    a non-interactive matplotlib, the plugin autoload as installed."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["MPLBACKEND"] = "Agg"
    env["COLUMNS"] = "100"
    return env


def test_markers_are_well_formed() -> None:
    """A marker sits right before a runnable block; skip needs a reason, save a file name."""
    lines = README.read_text(encoding="utf-8").splitlines()
    fences = {b.line: b for b in BLOCKS}
    for number, line in enumerate(lines, start=1):
        marker = MARKER.match(line)
        if marker is None:
            malformed = line.lstrip().startswith("<!--") and "readme:" in line
            assert not malformed, f"README.md line {number}: malformed marker {line!r}"
            continue
        block = fences.get(number + 1)
        assert block is not None, f"README.md line {number}: a marker not right before a fence"
        assert block.language in RUN_LANGUAGES, f"{block}: a marker on a block that never runs"
        assert marker.group(2), f"README.md line {number}: {marker.group(1)} needs an argument"
        if marker.group(1) == "save":
            assert re.fullmatch(r"[\w.-]+", marker.group(2)), f"{block}: save needs a file name"


def test_there_are_examples_to_run() -> None:
    assert any(b.language == "python" and b.action == "run" for b in BLOCKS)
    assert SHELL_BLOCKS


RUNNER = """
import json, sys, traceback
blocks = json.load(sys.stdin)
namespace = {"__name__": "__main__"}
for line, code in blocks:
    try:
        exec(compile(code, f"README.md (block at line {line})", "exec"), namespace)
    except BaseException:
        print(f"README.md: the python block at line {line} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
"""


def test_python_blocks_run_in_order(workdir: Path) -> None:
    blocks = [(b.line, b.code) for b in BLOCKS if b.language == "python" and b.action == "run"]
    for block in BLOCKS:
        if block.language == "python" and block.action == "save":
            compile(block.code, f"{block}", "exec")  # saved files are valid Python too
    result = subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(blocks),
        capture_output=True,
        text=True,
        cwd=workdir,
        env=reader_env(),
        timeout=SHELL_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=lambda b: f"line{b.line}")
def test_shell_block_runs(block: Block, workdir: Path) -> None:
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", shell_commands(block)],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=reader_env(),
        timeout=SHELL_TIMEOUT_S,
    )
    assert result.returncode == 0, (
        f"{block} failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
    )


def test_parser_reads_markers_and_languages() -> None:
    text = "\n".join(
        [
            "intro",
            "<!-- readme: skip installs packages -->",
            "```bash",
            "pip install x",
            "```",
            "<!-- readme: save a.py -->",
            "```python",
            "x = 1",
            "```",
            "```console",
            "$ echo hi",
            "hi",
            "```",
        ]
    )
    skip, save, console = readme_blocks(text)
    assert (skip.action, skip.argument, skip.language, skip.line) == (
        "skip",
        "installs packages",
        "bash",
        3,
    )
    assert (save.action, save.argument, save.code) == ("save", "a.py", "x = 1\n")
    assert console.action == "run" and shell_commands(console) == "echo hi\n"
