"""SIGTERM on a real broker process: listeners close, in-flight requests finish, the log is
flushed and closed cleanly, and everything acknowledged is there after a restart. Also the
README's first command in its non-interactive form, broker half only (scripts/run --once
--broker-only; tests/e2e/test_readme_run.py runs both halves)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from rustmq.protocol import batch as record_batch
from rustmq.protocol import records
from rustmq.protocol.api import ApiKey, ErrorCode

ROOT = Path(__file__).resolve().parents[2]


def make_batch(values: list[bytes]) -> bytes:
    body = records.encode_body([[0, None, value, None] for value in values])
    return record_batch.build_batch(body, record_count=len(values), first_timestamp_ms=1, max_timestamp_ms=1)


@pytest.mark.timeout(120)
def test_sigterm_finishes_in_flight_requests_and_keeps_acknowledged_data(tmp_path, raw) -> None:
    from brokerproc import BrokerProcess

    broker = BrokerProcess(tmp_path / "data", "--partitions", "1").start()
    client = raw(broker.producer_port)
    client.call({"api": ApiKey.CREATE_TOPIC, "topic": "durable", "partitions": 1})
    wire = b"".join(
        client.request_bytes({"api": ApiKey.PRODUCE, "corr": index + 1, "topic": "durable", "partition": 0, "acks": 2},
                             make_batch([b"%d-%d" % (index, n) for n in range(100)]))
        for index in range(200)
    )
    client.send_raw(wire)
    os.kill(broker.pid, signal.SIGTERM)
    acknowledged = 0
    refused = 0
    for index in range(200):
        try:
            header, _ = client.recv()
        except (EOFError, ConnectionResetError):
            break
        assert header["corr"] == index + 1
        if header["error"] == 0:
            assert header["base_offset"] == acknowledged
            acknowledged += 100
        else:
            assert header["error"] == ErrorCode.SHUTTING_DOWN
            refused += 1
    assert broker.stop() == 0
    log = broker.log()
    assert "shutting down" in log and "stopped cleanly" in log
    assert acknowledged > 0
    from rustmq.storage.partition import CLEAN_SHUTDOWN_FILE

    topics = tmp_path / "data" / "topics"
    markers = sorted(path.relative_to(topics) for path in topics.rglob(CLEAN_SHUTDOWN_FILE))
    assert markers == [Path("default/0", CLEAN_SHUTDOWN_FILE), Path("durable/0", CLEAN_SHUTDOWN_FILE)]

    restarted = BrokerProcess(tmp_path / "data").start()
    try:
        again = raw(restarted.consumer_port)
        response, _ = again.call({"api": ApiKey.LIST_OFFSETS, "topic": "durable", "partition": 0, "at": -1})
        assert response["offset"] >= acknowledged
    finally:
        assert restarted.stop() == 0


def test_listeners_close_on_sigterm(broker, raw) -> None:
    import socket

    idle = raw(broker.consumer_port)
    assert broker.stop() == 0
    assert idle.closed_by_peer(timeout=5)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", broker.producer_port), timeout=2).close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scripts_run_once_does_a_round_trip_and_stops_cleanly(tmp_path) -> None:
    env = {**os.environ, "RUSTMQ_DATA_DIR": str(tmp_path / "data")}
    for name in ("RUSTMQ_PRODUCER_PORT", "RUSTMQ_CONSUMER_PORT", "RUSTMQ_METRICS_PORT"):
        env.pop(name, None)
    result = subprocess.run([str(ROOT / "scripts" / "run"), "--once", "--broker-only"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "== round trip OK" in result.stdout
    assert "/metrics" in result.stdout
    assert "== broker stopped cleanly" in result.stdout
