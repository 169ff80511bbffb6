"""Fuzzing a live broker over its socket: malformed frames and random requests get a clear error,
never INTERNAL_ERROR, and the broker keeps serving a well-behaved client throughout.

Requests have a valid envelope (api from the protocol's keys or any u16, corr) and random
fields drawn by hypothesis (strategies.py). A few fields are clamped so that one example cannot
stall the run: long-poll waits to 50 ms, partition counts of new topics to 4, and acks 0 (which
gets no answer by design) to 1. Raw byte strings are sent as frame bodies too.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from strategies import examples, packable, plausible_requests, requests

from brokerproc import BrokerProcess, RawClient
from rustmq.protocol import batch, frames, records, simple
from rustmq.protocol.api import ApiKey, ErrorCode

pytestmark = [pytest.mark.slow]

BATCHES = st.builds(
    lambda count, codec: batch.build_batch(
        records.compress(records.encode_body([[0, b"k", b"v%d" % i, None] for i in range(count)]),
                         codec),
        record_count=count, first_timestamp_ms=1, max_timestamp_ms=2, codec=batch.Codec(codec)),
    st.integers(1, 5), st.sampled_from([0, 1, 2, 3]))

LIVE = settings(max_examples=examples(250), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class Session:
    """One connection to the broker, reopened whenever the broker closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.client = RawClient(port, timeout=20.0)

    def exchange(self, frame: bytes) -> dict[str, Any] | None:
        """Send one frame; the response header, or None if the broker closed the connection.

        A body that starts with a msgpack map is a seed-style simple produce message, answered
        with an 8-byte reply (offset, or ERROR_FLAG | code); it is returned as {"error": code}
        and the connection is reopened (it is in simple mode from then on)."""
        try:
            self.client.send_raw(frame)
            if frames.is_simple_body(frame[4:]):
                (reply,) = simple.REPLY.unpack(self.client.recv_exact(simple.REPLY.size))
                self.reconnect()
                return {"error": reply & 0xFFFF if reply & simple.ERROR_FLAG else 0}
            header, _ = self.client.recv()
            return header
        except (EOFError, ConnectionResetError, BrokenPipeError):
            self.reconnect()
            return None

    def reconnect(self) -> None:
        self.client.close()
        self.client = RawClient(self.port, timeout=20.0)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerProcess, Session]]:
    data_dir: Path = tmp_path_factory.mktemp("fuzz") / "data"
    broker = BrokerProcess(data_dir, "--partitions", "2").start()
    session = Session(broker.producer_port)
    try:
        yield broker, session
    finally:
        session.client.close()
        broker.stop()


def well_behaved_round_trip(port: int, number: int) -> None:
    client = RawClient(port)
    try:
        body = records.encode_body([[0, None, b"good-%d" % number, None]])
        raw = batch.build_batch(body, record_count=1, first_timestamp_ms=1, max_timestamp_ms=1)
        produced, _ = client.call({"api": ApiKey.PRODUCE, "topic": "steady", "partition": 0,
                                   "acks": 1}, raw)
        assert produced["error"] == 0, produced
        fetched, data = client.call({"api": ApiKey.FETCH, "max_wait_ms": 0, "partitions": [
            {"topic": "steady", "partition": 0, "offset": produced["base_offset"]}]})
        assert fetched["partitions"][0]["error"] == 0 and b"good-%d" % number in data
    finally:
        client.close()


def clamp(header: dict[str, Any]) -> dict[str, Any]:
    if isinstance(header.get("max_wait_ms"), int):
        header["max_wait_ms"] = min(max(header["max_wait_ms"], 0), 50)
    if header.get("acks") == 0:
        header["acks"] = 1
    if header["api"] in (ApiKey.CREATE_TOPIC, ApiKey.ADD_PARTITIONS) and isinstance(
            header.get("partitions"), int):
        header["partitions"] = min(header["partitions"], 4)
    return header


@LIVE
@given(header=requests() | plausible_requests(), payload=st.binary(max_size=128) | BATCHES)
@example(header={"api": int(ApiKey.PRODUCE), "corr": 1, "topic": "steady"}, payload=b"x" * 70)
@example(header={"api": int(ApiKey.FETCH), "corr": 2, "partitions": [{"topic": "steady"}]},
         payload=b"")
def test_random_requests_get_clear_errors(live: tuple[BrokerProcess, Session],
                                          header: dict[str, Any], payload: bytes) -> None:
    broker, session = live
    header = clamp(header)
    if not packable(header):
        return
    packed = msgpack.packb(header, use_bin_type=True)
    body = struct.pack(">I", len(packed)) + packed + payload
    frame = struct.pack(">I", len(body)) + body
    response = session.exchange(frame)
    assert broker.alive(), broker.log()[-3000:]
    if response is not None:
        assert response.get("error") != ErrorCode.INTERNAL_ERROR, (header, response)


@LIVE
@given(body=st.binary(min_size=1, max_size=200))
@example(body=b"\x00")
@example(body=b"\x00\x00\x00\x05\x80")
@example(body=b"\x80")  # an empty simple-produce map
def test_malformed_frame_bodies_get_clear_errors(live: tuple[BrokerProcess, Session],
                                                 body: bytes) -> None:
    broker, session = live
    response = session.exchange(struct.pack(">I", len(body)) + body)
    assert broker.alive(), broker.log()[-3000:]
    if response is not None and not frames.is_simple_body(body):
        assert response.get("error") not in (None, 0, ErrorCode.INTERNAL_ERROR), response
    elif response is not None:  # a simple produce message may be valid and be appended
        assert response["error"] != ErrorCode.INTERNAL_ERROR, response


def test_the_broker_still_serves_after_the_fuzzing(live: tuple[BrokerProcess, Session]) -> None:
    broker, _ = live
    for number in range(3):
        well_behaved_round_trip(broker.producer_port, number)
    too_large = socket.create_connection(("127.0.0.1", broker.producer_port), timeout=10)
    too_large.sendall(struct.pack(">I", 0xFFFF_FFF0))
    header, _ = RawClient.recv(type("C", (), {"recv_exact": lambda self, n: _recv(too_large, n)})())
    assert header["error"] == ErrorCode.FRAME_TOO_LARGE
    too_large.close()
    assert broker.alive()
    assert "Traceback" not in broker.log(), broker.log()[-5000:]


def _recv(sock: socket.socket, count: int) -> bytes:
    out = bytearray()
    while len(out) < count:
        chunk = sock.recv(count - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return bytes(out)
