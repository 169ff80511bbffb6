"""Fixtures shared by every test directory: a real broker process per test (port 0, tmp data dir,
3 partitions), stopped with SIGTERM and required to exit cleanly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import brokerproc


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[brokerproc.BrokerProcess]:
    process = brokerproc.BrokerProcess(tmp_path / "data", "--partitions", "3").start()
    try:
        yield process
    finally:
        code = process.stop()
        assert code == 0, process.log()
