"""Fixtures for the chart tests: the chart's paths and the helm binary.

helm comes from the locally built toolchain (`scripts/local-cluster build`, issue 5) or PATH.
Tests that need it fail, never skip, when it is missing, with a message saying how to get it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "rustmq-operator"


def _built_bin_dir() -> Path | None:
    build = ROOT / "tools" / "controlplane" / "build"
    if not build.exists():
        return None
    result = subprocess.run([str(build), "--print-dir"], capture_output=True, text=True, timeout=60)
    lines = result.stdout.strip().splitlines()
    return Path(lines[-1]) if result.returncode == 0 and lines else None


@pytest.fixture(scope="session")
def helm() -> str:
    found = shutil.which("helm")
    if found is None:
        bin_dir = _built_bin_dir()
        if bin_dir is not None and (bin_dir / "helm").exists():
            found = str(bin_dir / "helm")
    if found is None:
        pytest.fail(
            "helm is not installed: build the local toolchain with `scripts/local-cluster build` "
            "(it builds helm v3 from the Go module proxy) or put helm v3 on PATH",
            pytrace=False,
        )
    return found


@pytest.fixture(scope="session")
def chart() -> Path:
    return CHART
