"""Fixtures: a real broker process per test (port 0, tmp data dir), stopped with SIGTERM."""

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
