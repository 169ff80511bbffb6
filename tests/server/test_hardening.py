"""What a careless or hostile client can make a real broker hold (issue 11): memory per idle
connection, memory for a frame announced but not sent, connections that never say anything."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest

from brokerproc import BrokerProcess
from rustmq.protocol import batch as record_batch
from rustmq.protocol import records
from rustmq.protocol.api import ApiKey


def anon_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/<pid>/status")


def settle_rss(pid: int) -> int:
    time.sleep(0.5)
    return anon_rss(pid)


def test_idle_connections_hold_no_read_buffer(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path / "data", "--partitions", "1").start()
    sockets: list[socket.socket] = []
    try:
        before = settle_rss(broker.pid)
        for _ in range(200):
            sockets.append(socket.create_connection(("127.0.0.1", broker.producer_port)))
        grown = settle_rss(broker.pid) - before
        assert grown < 16 << 20, f"200 idle connections cost {grown >> 20} MiB of broker memory"
    finally:
        for sock in sockets:
            sock.close()
        assert broker.stop() == 0


def test_an_announced_frame_is_not_allocated_before_its_bytes_arrive(tmp_path: Path) -> None:
    broker = BrokerProcess(tmp_path / "data", "--partitions", "1").start()
    sockets: list[socket.socket] = []
    try:
        before = settle_rss(broker.pid)
        for _ in range(8):  # each says 16 MiB are coming, then sends 100 bytes and waits
            sock = socket.create_connection(("127.0.0.1", broker.producer_port))
            sock.sendall(struct.pack(">I", (16 << 20) - 16) + b"\0" * 100)
            sockets.append(sock)
        time.sleep(0.2)
        for sock in sockets:  # more bytes trickle in: the broker reads them into its buffer
            sock.sendall(b"\0" * 100)
        grown = settle_rss(broker.pid) - before
        assert grown < 24 << 20, f"8 announced 16 MiB frames cost {grown >> 20} MiB before arriving"
    finally:
        for sock in sockets:
            sock.close()
        assert broker.stop() == 0


def test_a_large_frame_sent_slowly_still_arrives_whole(tmp_path: Path, raw) -> None:
    broker = BrokerProcess(tmp_path / "data", "--partitions", "1").start()
    try:
        client = raw(broker.producer_port)
        body = records.encode_body([[0, None, b"x" * (3 << 20), None]])
        built = record_batch.build_batch(body, record_count=1, first_timestamp_ms=1, max_timestamp_ms=1)
        frame = client.request_bytes({"api": ApiKey.PRODUCE, "topic": "default", "partition": 0}, built)
        for start in range(0, len(frame), 200_000):
            client.send_raw(frame[start : start + 200_000])
            time.sleep(0.005)
        response, _ = client.recv()
        assert response["error"] == 0 and response["base_offset"] == 0
    finally:
        assert broker.stop() == 0


@pytest.mark.timeout(60)
def test_idle_connections_are_closed_after_the_idle_timeout(tmp_path: Path, raw) -> None:
    broker = BrokerProcess(tmp_path / "data", "--partitions", "1", "--idle-timeout-s", "1").start()
    try:
        idle = raw(broker.producer_port)
        busy = raw(broker.consumer_port)
        # A long poll is not idleness: its connection waits for the broker, not the other way.
        busy.send({"api": ApiKey.FETCH, "max_wait_ms": 4000,
                   "partitions": [{"topic": "default", "partition": 0, "offset": 0}]})
        started = time.monotonic()
        assert idle.closed_by_peer(timeout=10)
        assert 0.9 <= time.monotonic() - started < 8
        response, _ = busy.recv()
        assert response["error"] == 0
        assert busy.closed_by_peer(timeout=10)  # idle once answered
    finally:
        assert broker.stop() == 0
