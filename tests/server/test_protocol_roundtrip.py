"""Protocol round trips against a real broker process: metadata, produce/fetch, pipelining,
list offsets, long-poll fetch, durable acks, simple (seed-style) produce."""

from __future__ import annotations

import socket
import struct
import threading
import time

import msgpack
import pytest

from rustmq.protocol import batch as record_batch
from rustmq.protocol import records, simple
from rustmq.protocol.api import EARLIEST, LATEST, ApiKey, ErrorCode, partition_for_key


def make_batch(values: list[bytes], timestamp_ms: int = 1_700_000_000_000, codec: int = 0) -> bytes:
    body = records.encode_body([[0, None, value, None] for value in values], codec)
    return record_batch.build_batch(body, record_count=len(values), first_timestamp_ms=timestamp_ms,
                                     max_timestamp_ms=timestamp_ms, codec=record_batch.Codec(codec))


def values_of(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        header = record_batch.read_header(data, pos)
        entries = records.decode_body(data[pos + record_batch.HEADER_SIZE : pos + header.size], header.codec)
        out += [(header.base_offset + index, entry[2]) for index, entry in enumerate(entries)]
        pos += header.size
    return out


def test_metadata_reports_bound_ports_and_the_default_topic(broker, raw) -> None:
    client = raw(broker.producer_port)
    response, payload = client.call({"api": ApiKey.METADATA})
    assert response["error"] == 0 and payload == b""
    (entry,) = response["brokers"]
    assert entry["producer_port"] == broker.producer_port
    assert entry["consumer_port"] == broker.consumer_port
    assert entry["metrics_port"] == broker.metrics_port
    (topic,) = [t for t in response["topics"] if t["name"] == "default"]
    assert [p["partition"] for p in topic["partitions"]] == [0, 1, 2]


def test_produce_then_fetch_returns_the_same_batches_with_offsets_stamped(broker, raw) -> None:
    producer = raw(broker.producer_port)
    first = make_batch([b"a", b"b", b"c"])
    second = make_batch([b"d"], codec=records.CODEC_ZSTD)
    response, _ = producer.call({"api": ApiKey.PRODUCE, "topic": "rt", "partition": 1, "acks": 1}, first + second)
    assert (response["error"], response["partition"], response["base_offset"], response["last_offset"]) == (0, 1, 0, 3)

    consumer = raw(broker.consumer_port)
    response, data = consumer.call({"api": ApiKey.FETCH, "max_wait_ms": 0,
                                    "partitions": [{"topic": "rt", "partition": 1, "offset": 0}]})
    (part,) = response["partitions"]
    assert part["error"] == 0 and part["high_watermark"] == 4 and part["size"] == len(data)
    # The bytes are the producer's, except the base offsets the broker stamped in place.
    assert data[8:len(first)] == first[8:]
    assert data[len(first) + 8 :] == second[8:]
    assert values_of(data) == [(0, b"a"), (1, b"b"), (2, b"c"), (3, b"d")]


def test_pipelined_requests_are_answered_in_order(broker, raw) -> None:
    client = raw(broker.producer_port)
    wire = b""
    for index in range(100):
        header = {"api": ApiKey.PRODUCE, "corr": 1000 + index, "topic": "pipe", "partition": 0, "acks": 1}
        if index % 10 == 9:
            header = {"api": ApiKey.LIST_TOPICS, "corr": 1000 + index}
        wire += client.request_bytes(header, make_batch([b"%d" % index]) if "topic" in header else b"")
    client.send_raw(wire)
    produced = 0
    for index in range(100):
        response, _ = client.recv()
        assert response["corr"] == 1000 + index and response["error"] == 0
        if "base_offset" in response:
            assert response["base_offset"] == produced
            produced += 1


def test_list_offsets_earliest_latest_and_by_timestamp(broker, raw) -> None:
    client = raw(broker.producer_port)
    for stamp in (1000, 2000, 3000):
        client.call({"api": ApiKey.PRODUCE, "topic": "times", "partition": 0}, make_batch([b"x", b"y"], timestamp_ms=stamp))
    at = {name: client.call({"api": ApiKey.LIST_OFFSETS, "topic": "times", "partition": 0, "at": value})[0]["offset"]
          for name, value in (("earliest", EARLIEST), ("latest", LATEST), ("t1500", 1500), ("t3000", 3000), ("t9999", 9999))}
    assert at == {"earliest": 0, "latest": 6, "t1500": 2, "t3000": 4, "t9999": 6}


def test_long_poll_fetch_answers_as_soon_as_data_arrives(broker, raw) -> None:
    consumer = raw(broker.consumer_port)
    producer = raw(broker.producer_port)
    producer.call({"api": ApiKey.CREATE_TOPIC, "topic": "poll", "partitions": 1})
    started = time.monotonic()
    consumer.send({"api": ApiKey.FETCH, "max_wait_ms": 10_000, "min_bytes": 1,
                   "partitions": [{"topic": "poll", "partition": 0, "offset": 0}]})
    timer = threading.Timer(0.3, lambda: producer.call({"api": ApiKey.PRODUCE, "topic": "poll", "partition": 0},
                                                       make_batch([b"wake"])))
    timer.start()
    response, data = consumer.recv()
    waited = time.monotonic() - started
    timer.join(10)  # the producer's own response, before the fixture closes its socket
    assert 0.25 < waited < 5, waited
    assert values_of(data) == [(0, b"wake")]


def test_long_poll_fetch_times_out_empty(broker, raw) -> None:
    consumer = raw(broker.consumer_port)
    started = time.monotonic()
    response, data = consumer.call({"api": ApiKey.FETCH, "max_wait_ms": 300,
                                    "partitions": [{"topic": "default", "partition": 0, "offset": 0}]})
    assert 0.25 < time.monotonic() - started < 5
    assert response["partitions"][0]["size"] == 0 and data == b""


def test_durable_produce_is_acknowledged_after_the_flush(broker, raw) -> None:
    client = raw(broker.producer_port)
    response, _ = client.call({"api": ApiKey.PRODUCE, "topic": "safe", "partition": 0, "acks": 2}, make_batch([b"kept"] * 10))
    assert response["error"] == 0 and response["last_offset"] == 9
    described, _ = client.call({"api": ApiKey.DESCRIBE_TOPIC, "topic": "safe"})
    assert described["partitions"][0]["durable_offset"] >= 10


def test_acks_none_gets_no_response_but_is_stored(broker, raw) -> None:
    client = raw(broker.producer_port)
    client.send({"api": ApiKey.PRODUCE, "topic": "quiet", "partition": 0, "acks": 0}, make_batch([b"q"]))
    response, _ = client.call({"api": ApiKey.LIST_OFFSETS, "topic": "quiet", "partition": 0, "at": LATEST})
    assert response["offset"] == 1


def test_simple_produce_answers_u64_offsets_like_the_seed(broker, raw) -> None:
    sock = raw(broker.producer_port).sock
    for index in range(5):
        sock.sendall(simple.encode_message(b"value-%d" % index, b"same-key"))
    replies = [struct.unpack(">Q", _recv_exact(sock, 8))[0] for _ in range(5)]
    assert replies == [0, 1, 2, 3, 4]
    partition = partition_for_key(b"same-key", 3)
    client = raw(broker.consumer_port)
    _, data = client.call({"api": ApiKey.FETCH, "max_wait_ms": 0, "partitions": [{"topic": "default", "partition": partition, "offset": 0}]})
    assert values_of(data) == [(i, b"value-%d" % i) for i in range(5)]
    # A topic and headers may be named; an error sets the top bit and carries the code.
    fields = {"key": None, "value": "text", "topic": "simple-topic", "headers": {"h": "v"}}
    packed = msgpack.packb(fields)
    sock.sendall(struct.pack(">I", len(packed)) + packed)
    assert struct.unpack(">Q", _recv_exact(sock, 8))[0] == 0
    bad = msgpack.packb({"value": 12})
    sock.sendall(struct.pack(">I", len(bad)) + bad)
    reply = struct.unpack(">Q", _recv_exact(sock, 8))[0]
    assert reply == (1 << 63) | ErrorCode.INVALID_REQUEST
    sock.sendall(simple.encode_message(b"after the error"))
    assert struct.unpack(">Q", _recv_exact(sock, 8))[0] < 1 << 63


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


def test_topic_administration_over_the_protocol(broker, raw) -> None:
    client = raw(broker.producer_port)
    created, _ = client.call({"api": ApiKey.CREATE_TOPIC, "topic": "admin-t", "partitions": 2, "config": {"retention_ms": 60000}})
    assert created == {"corr": created["corr"], "error": 0, "topic": "admin-t", "partitions": 2}
    again, _ = client.call({"api": ApiKey.CREATE_TOPIC, "topic": "admin-t", "partitions": 2})
    assert again["error"] == ErrorCode.TOPIC_EXISTS
    described, _ = client.call({"api": ApiKey.DESCRIBE_TOPIC, "topic": "admin-t"})
    assert described["config"]["retention_ms"] == 60000 and len(described["partitions"]) == 2
    grown, _ = client.call({"api": ApiKey.ADD_PARTITIONS, "topic": "admin-t", "partitions": 4})
    assert grown["partitions"] == 4
    listed, _ = client.call({"api": ApiKey.LIST_TOPICS})
    assert "admin-t" in listed["topics"]
    deleted, _ = client.call({"api": ApiKey.DELETE_TOPIC, "topic": "admin-t"})
    assert deleted["error"] == 0
    gone, _ = client.call({"api": ApiKey.DESCRIBE_TOPIC, "topic": "admin-t"})
    assert gone["error"] == ErrorCode.UNKNOWN_TOPIC
    bad_config, _ = client.call({"api": ApiKey.CREATE_TOPIC, "topic": "bad-config", "config": {"no_such_key": 1}})
    assert bad_config["error"] == ErrorCode.INVALID_CONFIG
    bad_name, _ = client.call({"api": ApiKey.CREATE_TOPIC, "topic": "../escape"})
    assert bad_name["error"] == ErrorCode.INVALID_CONFIG


def test_broker_stats_reports_memory(broker, raw) -> None:
    stats, _ = raw(broker.producer_port).call({"api": ApiKey.BROKER_STATS})
    assert stats["rss_bytes"] > 10 << 20 and stats["pid"] == broker.pid


def _anon_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_consumer_that_stops_reading_pins_bounded_memory(broker, raw) -> None:
    producer = raw(broker.producer_port)
    chunk = make_batch([b"x" * 1000] * 1000)
    for _ in range(64):  # a 64 MiB backlog
        producer.call({"api": ApiKey.PRODUCE, "topic": "stall", "partition": 0}, chunk)
    baseline = _anon_rss(broker.pid)
    stalled = raw(broker.consumer_port)
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.send_raw(b"".join(
        stalled.request_bytes({"api": ApiKey.FETCH, "corr": corr, "max_wait_ms": 0, "max_bytes": 8 << 20,
                               "partitions": [{"topic": "stall", "partition": 0, "offset": 0}]})
        for corr in range(1, 101)
    ))  # 100 x 8 MiB requested, never read
    for _ in range(32):
        producer.call({"api": ApiKey.PRODUCE, "topic": "stall", "partition": 0}, chunk)
    time.sleep(0.5)
    growth = _anon_rss(broker.pid) - baseline
    assert growth < 24 << 20, f"anonymous memory grew {growth >> 20} MiB"
    other = raw(broker.consumer_port)
    response, data = other.call({"api": ApiKey.FETCH, "max_wait_ms": 0, "max_bytes": 1 << 20,
                                 "partitions": [{"topic": "stall", "partition": 0, "offset": 0}]})
    assert response["error"] == 0 and len(data) == len(chunk)


def test_a_half_closed_client_still_gets_its_durable_acks(broker, raw) -> None:
    client = raw(broker.producer_port)
    for index in range(20):
        client.send({"api": ApiKey.PRODUCE, "topic": "half", "partition": 0, "acks": 2}, make_batch([b"%d" % index]))
    client.sock.shutdown(socket.SHUT_WR)
    offsets = [client.recv()[0]["base_offset"] for _ in range(20)]
    assert offsets == list(range(20))
    assert client.closed_by_peer()


def test_simple_messages_behind_a_durable_request_keep_their_order(broker, raw) -> None:
    client = raw(broker.producer_port)
    client.send({"api": ApiKey.PRODUCE, "topic": "mixed", "partition": 0, "acks": 2}, make_batch([b"durable"] * 5))
    client.send_raw(simple.encode_message(b"simple", topic="mixed") * 3)
    header, _ = client.recv()
    assert (header["error"], header["base_offset"]) == (0, 0)
    replies = [struct.unpack(">Q", client.recv_exact(8))[0] for _ in range(3)]
    assert all(reply < 1 << 63 for reply in replies)
