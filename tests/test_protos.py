"""Proto hygiene: `buf breaking` (as `make breaking` runs it) fails on a
breaking change and passes on a compatible one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BUF = str(Path(sys.executable).parent / "buf")
GENERATE_PROTO = Path("dprouter/v1/generate.proto")


def breaking(changed: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BUF, "breaking", str(changed), "--against", str(ROOT / "protos")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.fixture
def protos_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", copy)
    return copy


def edit(protos: Path, old: str, new: str) -> None:
    path = protos / GENERATE_PROTO
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_renumbering_a_field_is_breaking(protos_copy: Path) -> None:
    edit(protos_copy, "string prompt = 1;", "string prompt = 20;")
    result = breaking(protos_copy)
    assert result.returncode != 0
    assert 'Previously present field "1" with name "prompt"' in result.stdout


def test_renaming_a_field_is_breaking(protos_copy: Path) -> None:
    edit(protos_copy, "string session_key = 7;", "string session = 7;")
    assert breaking(protos_copy).returncode != 0


def test_adding_a_field_is_not_breaking(protos_copy: Path) -> None:
    edit(
        protos_copy,
        "  int32 priority = 8;\n",
        "  int32 priority = 8;\n  // A new field.\n  string tag = 9;\n",
    )
    result = breaking(protos_copy)
    assert result.returncode == 0, result.stdout + result.stderr
