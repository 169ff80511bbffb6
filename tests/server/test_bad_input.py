"""Every bad input of issue 3 against a real broker: each is answered with its documented error
code (or the connection is closed with a logged reason when the frame cannot be delimited), the
broker stays up, a bystander connection is undisturbed and the stored data stays intact."""

from __future__ import annotations

import struct
import time

import msgpack
import pytest

from rustmq.protocol import batch as record_batch
from rustmq.protocol import records
from rustmq.protocol.api import ApiKey, ErrorCode


def make_batch(values: list[bytes]) -> bytes:
    body = records.encode_body([[0, None, value, None] for value in values])
    return record_batch.build_batch(body, record_count=len(values), first_timestamp_ms=1, max_timestamp_ms=1)


@pytest.fixture
def seeded(broker, raw):
    """A broker holding 3 known records in 'kept'/0 and a bystander connection opened beforehand."""
    bystander = raw(broker.producer_port)
    response, _ = bystander.call({"api": ApiKey.PRODUCE, "topic": "kept", "partition": 0}, make_batch([b"one", b"two", b"three"]))
    assert response["error"] == 0
    _, before = bystander.call({"api": ApiKey.FETCH, "max_wait_ms": 0, "partitions": [{"topic": "kept", "partition": 0, "offset": 0}]})
    yield broker, bystander, before
    # Afterwards: alive, the bystander still served, the stored bytes unchanged, nothing appended.
    assert broker.alive()
    response, after = bystander.call({"api": ApiKey.FETCH, "max_wait_ms": 0, "partitions": [{"topic": "kept", "partition": 0, "offset": 0}]})
    assert after == before
    assert response["partitions"][0]["high_watermark"] == 3


def test_garbage_bytes_get_frame_too_large_then_close(seeded, raw) -> None:
    broker, _, _ = seeded
    client = raw(broker.producer_port)
    client.send_raw(b"GET / HTTP/1.1\r\nHost: rustmq\r\n\r\n")
    header, _ = client.recv()
    assert header["error"] == ErrorCode.FRAME_TOO_LARGE and header["corr"] is None
    assert client.closed_by_peer()
    assert "FRAME_TOO_LARGE" in broker.log()


def test_a_4_gib_length_prefix_is_refused_before_allocating(seeded, raw) -> None:
    broker, _, _ = seeded
    rss_before = broker.rss_bytes()
    client = raw(broker.consumer_port)
    client.send_raw(struct.pack(">I", 0xFFFF_FFFF) + b"\0" * 1000)
    header, _ = client.recv()
    assert header["error"] == ErrorCode.FRAME_TOO_LARGE
    assert "4294967295" in header["message"]
    assert client.closed_by_peer()
    assert broker.rss_bytes() - rss_before < 32 << 20


def test_a_truncated_frame_closes_with_a_logged_reason(seeded, raw) -> None:
    broker, _, _ = seeded
    client = raw(broker.producer_port)
    client.send_raw(struct.pack(">I", 1000) + b"\0\0\0\x05" + b"x" * 20)
    client.sock.shutdown(1)  # half-close: the broker sees EOF mid-frame
    assert client.closed_by_peer()
    deadline = time.monotonic() + 5
    while "mid-frame" not in broker.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "connection ended mid-frame (28 of 1004 bytes received)" in broker.log()


def test_malformed_msgpack_header_is_answered_and_the_connection_stays_usable(seeded, raw) -> None:
    broker, _, _ = seeded
    client = raw(broker.producer_port)
    bad_header = b"\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
    body = struct.pack(">I", len(bad_header)) + bad_header
    client.send_raw(struct.pack(">I", len(body)) + body)
    header, _ = client.recv()
    assert header["error"] == ErrorCode.MALFORMED_FRAME and header["corr"] is None
    not_a_map = msgpack.packb([1, 2, 3])
    body = struct.pack(">I", len(not_a_map)) + not_a_map
    client.send_raw(struct.pack(">I", len(body)) + body)
    assert client.recv()[0]["error"] == ErrorCode.MALFORMED_FRAME
    lying_length = struct.pack(">I", 500) + b"\x80"
    client.send_raw(struct.pack(">I", len(lying_length)) + lying_length)
    assert client.recv()[0]["error"] == ErrorCode.MALFORMED_FRAME
    neither = b"\x07rubbish"
    client.send_raw(struct.pack(">I", len(neither)) + neither)
    header, _ = client.recv()
    assert header["error"] == ErrorCode.MALFORMED_FRAME and "0x07" in header["message"]
    ok, _ = client.call({"api": ApiKey.LIST_TOPICS})
    assert ok["error"] == 0


def test_unknown_api_echoes_the_correlation_id(seeded, raw) -> None:
    broker, _, _ = seeded
    response, _ = raw(broker.consumer_port).call({"api": 4242, "corr": 77})
    assert (response["corr"], response["error"]) == (77, ErrorCode.UNKNOWN_API)
    assert "4242" in response["message"]


def test_unknown_topic_and_partition(seeded, raw) -> None:
    broker, _, _ = seeded
    client = raw(broker.consumer_port)
    response, data = client.call({"api": ApiKey.FETCH, "max_wait_ms": 0, "partitions": [
        {"topic": "no-such-topic", "partition": 0, "offset": 0}, {"topic": "kept", "partition": 9, "offset": 0}]})
    assert [p["error"] for p in response["partitions"]] == [ErrorCode.UNKNOWN_TOPIC, ErrorCode.UNKNOWN_PARTITION]
    assert data == b""
    response, _ = client.call({"api": ApiKey.LIST_OFFSETS, "topic": "no-such-topic", "partition": 0, "at": -1})
    assert response["error"] == ErrorCode.UNKNOWN_TOPIC
    response, _ = client.call({"api": ApiKey.PRODUCE, "topic": "kept", "partition": 7}, make_batch([b"x"]))
    assert response["error"] == ErrorCode.UNKNOWN_PARTITION
    response, _ = client.call({"api": ApiKey.FETCH, "max_wait_ms": 0, "partitions": [{"topic": "kept", "partition": 0, "offset": 99}]})
    assert response["partitions"][0]["error"] == ErrorCode.OFFSET_OUT_OF_RANGE


def test_produce_to_an_unknown_topic_fails_when_auto_creation_is_off(tmp_path, raw) -> None:
    from brokerproc import BrokerProcess

    broker = BrokerProcess(tmp_path / "data", "--no-auto-create-topics").start()
    try:
        client = raw(broker.producer_port)
        response, _ = client.call({"api": ApiKey.PRODUCE, "topic": "nope", "partition": 0}, make_batch([b"x"]))
        assert response["error"] == ErrorCode.UNKNOWN_TOPIC and "auto-creation is off" in response["message"]
        listed, _ = client.call({"api": ApiKey.LIST_TOPICS})
        assert listed["topics"] == ["default"]
    finally:
        assert broker.stop() == 0


@pytest.mark.parametrize(
    ("header", "field"),
    [
        ({"api": ApiKey.PRODUCE, "topic": 5, "partition": 0}, "topic"),
        ({"api": ApiKey.PRODUCE, "topic": "kept", "partition": "0"}, "partition"),
        ({"api": ApiKey.PRODUCE, "topic": "kept", "partition": True}, "partition"),
        ({"api": ApiKey.PRODUCE, "topic": "kept", "acks": 7}, "acks"),
        ({"api": ApiKey.FETCH, "partitions": "all"}, "partitions"),
        # (a negative offset is that partition's OFFSET_OUT_OF_RANGE: test_protocol_agreement.py)
        ({"api": ApiKey.FETCH, "partitions": [{"topic": "kept", "partition": 0, "offset": "5"}]}, "offset"),
        ({"api": ApiKey.FETCH, "partitions": [{"topic": "kept", "partition": 0, "offset": 0}], "max_wait_ms": 1.5}, "max_wait_ms"),
        ({"api": ApiKey.CREATE_TOPIC, "topic": "t", "partitions": 0}, "partitions"),
        ({"api": "3"}, "api"),
        ({"api": ApiKey.METADATA, "corr": -1}, "corr"),
    ],
)
def test_a_wrong_type_in_a_field_names_the_field(seeded, raw, header, field) -> None:
    broker, _, _ = seeded
    client = raw(broker.producer_port)
    response, _ = client.call(header, make_batch([b"never stored"])) if header.get("corr") is None else (None, None)
    if response is None:  # an invalid corr cannot be echoed
        client.send_raw(client.request_bytes(header))
        response, _ = client.recv()
    assert response["error"] == ErrorCode.INVALID_REQUEST
    assert repr(field) in response["message"]


def test_a_batch_with_a_bad_crc_is_rejected_and_nothing_is_appended(seeded, raw) -> None:
    broker, _, _ = seeded
    client = raw(broker.producer_port)
    good = make_batch([b"good"])
    corrupt = bytearray(make_batch([b"evil"]))
    corrupt[-1] ^= 0xFF
    # The bad batch comes second: the whole request is refused, the good batch included.
    response, _ = client.call({"api": ApiKey.PRODUCE, "topic": "kept", "partition": 0}, good + bytes(corrupt))
    assert response["error"] == ErrorCode.CORRUPT_BATCH and "CRC32C mismatch" in response["message"]
    response, _ = client.call({"api": ApiKey.PRODUCE, "topic": "kept", "partition": 0}, b"\0" * 10)
    assert response["error"] == ErrorCode.CORRUPT_BATCH
    response, _ = client.call({"api": ApiKey.PRODUCE, "topic": "kept", "partition": 0})
    assert response["error"] == ErrorCode.CORRUPT_BATCH


def test_too_many_connections_are_refused_with_an_error(tmp_path, raw) -> None:
    from brokerproc import BrokerProcess

    broker = BrokerProcess(tmp_path / "data", "--max-connections", "2").start()
    try:
        first, second = raw(broker.producer_port), raw(broker.consumer_port)
        assert first.call({"api": ApiKey.LIST_TOPICS})[0]["error"] == 0
        assert second.call({"api": ApiKey.LIST_TOPICS})[0]["error"] == 0
        third = raw(broker.producer_port)
        header, _ = third.recv()
        assert header["error"] == ErrorCode.TOO_MANY_CONNECTIONS
        assert third.closed_by_peer()
        assert first.call({"api": ApiKey.LIST_TOPICS})[0]["error"] == 0
    finally:
        assert broker.stop() == 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_flood_of_bad_frames_does_not_grow_memory(seeded, raw) -> None:
    broker, _, _ = seeded
    frames = b""
    for index in range(200):
        frames += raw(broker.producer_port).request_bytes({"api": 999, "corr": index})
        bad = b"\xc1" * 50
        frames += struct.pack(">I", 4 + len(bad)) + struct.pack(">I", len(bad)) + bad
    client = raw(broker.producer_port)
    client.send_raw(frames)
    for _ in range(400):
        client.recv()
    baseline = broker.rss_bytes()
    for _round in range(20):
        client.send_raw(frames)
        for _ in range(400):
            assert client.recv()[0]["error"] in (ErrorCode.UNKNOWN_API, ErrorCode.MALFORMED_FRAME)
        big = raw(broker.consumer_port)
        big.send_raw(struct.pack(">I", 0xF000_0000))
        assert big.recv()[0]["error"] == ErrorCode.FRAME_TOO_LARGE
        big.close()
    assert broker.rss_bytes() - baseline < 16 << 20


def test_a_frame_left_incomplete_times_out(tmp_path, raw) -> None:
    from brokerproc import BrokerProcess

    broker = BrokerProcess(tmp_path / "data", "--frame-timeout-s", "0.5").start()
    try:
        stuck = raw(broker.producer_port)
        stuck.send_raw(struct.pack(">I", 100) + b"\0\0\0")
        started = time.monotonic()
        assert stuck.closed_by_peer(timeout=10)
        assert 0.4 < time.monotonic() - started < 5
        assert "frame incomplete after" in broker.log()
        assert raw(broker.producer_port).call({"api": ApiKey.LIST_TOPICS})[0]["error"] == 0
    finally:
        assert broker.stop() == 0
