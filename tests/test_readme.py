"""README.md stays short, and its module map names every source file and only files that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_LINES = 350
# A path in backticks: no spaces, at least one slash (`router/app.py`, `clients/go/`).
PATH = re.compile(r"`([\w.-]+(?:/[\w.-]*)+)`")


def module_map() -> str:
    """The README's "Module map" section, up to the next heading."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^### Module map\n(.*?)^#", text, re.DOTALL | re.MULTILINE)
    assert section, "README.md has no '### Module map' section"
    return section.group(1)


def source_files() -> set[str]:
    files = {
        path
        for folder in ("router", "server", "tools", "bench")
        for path in (ROOT / folder).rglob("*.py")
        if path.name != "__init__.py" and "__pycache__" not in path.parts
    }
    files |= {path for path in (ROOT / "clients").glob("*.py") if path.name != "__init__.py"}
    return {path.relative_to(ROOT).as_posix() for path in files}


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_module_map_names_every_source_file() -> None:
    named = set(PATH.findall(module_map()))
    missing = sorted(source_files() - named)
    assert not missing, f"not in README.md's module map: {missing}"


def test_module_map_names_only_files_that_exist() -> None:
    gone = [path for path in PATH.findall(module_map()) if not (ROOT / path).exists()]
    assert not gone, f"README.md's module map names paths that do not exist: {gone}"
