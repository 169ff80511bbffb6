"""The linter and the type checker as tests: a change that breaks either fails the suite.

ruff runs with the rules in pyproject.toml ([tool.ruff]) over the whole tree; mypy checks the two
importable packages ([tool.mypy]). Both run as subprocesses of the test venv's interpreter, so the
versions are the ones scripts/setup installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*argv: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


def test_ruff_finds_nothing() -> None:
    done = _run("ruff", "check", "--no-cache", ".", timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.timeout(600)
def test_mypy_finds_nothing() -> None:
    done = _run("mypy", timeout=590)
    assert done.returncode == 0, done.stdout + done.stderr
