"""Import structure: no circles between the library's host-side modules and the models."""

from __future__ import annotations

import subprocess
import sys


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_generation_does_not_import_the_models() -> None:
    """tinytx.generate works on any model with the GPT interface; GPT.generate imports it,
    never the other way round."""
    modules = imported_after("import tinytx.generate")
    assert "tinytx.generate" in modules
    assert "tinytx.models.gpt" not in modules


def test_the_cli_imports_commands_lazily() -> None:
    """`tinytx --help` stays fast: no model, plugin kit or hypothesis until a command runs."""
    modules = imported_after("import tinytx.cli")
    assert not {"tinytx.models.gpt", "tinytx.testing", "hypothesis"} & modules
