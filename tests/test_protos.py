"""Proto hygiene: `buf breaking` (as `make breaking` runs it) fails on a
breaking change and passes on a compatible one, and so does `make breaking`."""

from __future__ import annotations

import os
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


def make_breaking(baseline: Path, protos: Path | None) -> subprocess.CompletedProcess[str]:
    """`make breaking` with a git repository in `baseline` whose one commit
    holds `protos` (none: no commit) as the commit to compare against:
    GIT_DIR points the recipe's git calls there, the working tree stays ROOT."""
    subprocess.run(["git", "init", "-q", str(baseline)], check=True)
    git = ["git", "-C", str(baseline)]
    if protos is not None:
        shutil.copytree(protos, baseline / "protos")
        subprocess.run([*git, "config", "user.name", "test"], check=True)
        subprocess.run([*git, "config", "user.email", "test@example.com"], check=True)
        subprocess.run([*git, "add", "protos"], check=True)
        subprocess.run([*git, "commit", "-q", "--no-gpg-sign", "-m", "baseline"], check=True)
    return subprocess.run(
        ["make", "--no-print-directory", "breaking", "BREAKING_AGAINST=HEAD"],
        cwd=ROOT, env={**os.environ, "GIT_DIR": str(baseline / ".git")},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_make_breaking_fails_on_a_breaking_change(protos_copy: Path, tmp_path: Path) -> None:
    # The baseline numbered `prompt` 20: this tree's 1 deletes field 20.
    edit(protos_copy, "string prompt = 1;", "string prompt = 20;")
    result = make_breaking(tmp_path / "baseline", protos_copy)
    assert result.returncode != 0
    assert 'Previously present field "20" with name "prompt"' in result.stdout


def test_make_breaking_passes_on_the_same_protos(protos_copy: Path, tmp_path: Path) -> None:
    result = make_breaking(tmp_path / "baseline", protos_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "buf breaking: no breaking change since HEAD" in result.stdout


def test_make_breaking_without_a_baseline_skips_loudly(tmp_path: Path) -> None:
    result = make_breaking(tmp_path / "baseline", None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "buf breaking: SKIPPED: no protos at HEAD" in result.stderr
