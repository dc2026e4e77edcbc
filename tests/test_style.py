"""The tree is linted and formatted (ruff, pinned in the test extras so CI and developers agree)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff(args: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, (
        f"ruff {' '.join(args)} (run `ruff format .` / `ruff check --fix .`):\n{out.stdout}{out.stderr}"
    )
