"""Fixtures of the issue-4 network tests: several real broker processes (the single `broker` is in
tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import brokerproc


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[object]:
    """make_broker(data_dir=None) -> a started BrokerProcess; all are stopped at teardown."""
    started: list[brokerproc.BrokerProcess] = []

    def make(data_dir: Path | None = None) -> brokerproc.BrokerProcess:
        process = brokerproc.BrokerProcess(data_dir or tmp_path / "data", "--partitions", "3").start()
        started.append(process)
        return process

    yield make
    for process in started:
        process.stop()  # SIGTERM if still running; closes the log file of a killed one too
