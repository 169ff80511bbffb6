"""Fixtures: real broker processes (port 0, tmp data dirs) for the issue-4 network tests."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_path = Path(__file__).parents[1] / "server" / "brokerproc.py"
if "rustmq_test_brokerproc" in sys.modules:
    brokerproc = sys.modules["rustmq_test_brokerproc"]
else:
    _spec = importlib.util.spec_from_file_location("rustmq_test_brokerproc", _path)
    assert _spec is not None and _spec.loader is not None
    brokerproc = importlib.util.module_from_spec(_spec)
    sys.modules["rustmq_test_brokerproc"] = brokerproc
    _spec.loader.exec_module(brokerproc)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator["brokerproc.BrokerProcess"]:
    process = brokerproc.BrokerProcess(tmp_path / "data", "--partitions", "3").start()
    try:
        yield process
    finally:
        code = process.stop()
        assert code == 0, process.log()


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[object]:
    """make_broker(data_dir=None) -> a started BrokerProcess; all are stopped at teardown."""
    started: list[brokerproc.BrokerProcess] = []

    def make(data_dir: Path | None = None) -> "brokerproc.BrokerProcess":
        process = brokerproc.BrokerProcess(data_dir or tmp_path / "data", "--partitions", "3").start()
        started.append(process)
        return process

    yield make
    for process in started:
        process.stop()  # SIGTERM if still running; closes the log file of a killed one too
