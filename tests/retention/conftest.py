"""Retention tests: a real broker process that checks retention and compaction every 0.2 s."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import brokerproc


@pytest.fixture
def fast_retention_broker(tmp_path: Path) -> Iterator[brokerproc.BrokerProcess]:
    process = brokerproc.BrokerProcess(tmp_path / "data", "--partitions", "1",
                                       "--retention-check-s", "0.2").start()
    try:
        yield process
    finally:
        code = process.stop()
        assert code == 0, process.log()
