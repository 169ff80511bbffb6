"""Sans-IO protocol pieces: frames, request validation, simple produce, record bodies."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rustmq.protocol import api, frames, records, simple
from rustmq.protocol.api import ErrorCode, RequestError

header_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=50),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)


@given(st.dictionaries(st.text(max_size=10), header_values, max_size=6), st.binary(max_size=2000))
def test_frames_round_trip(header, payload) -> None:
    frame = frames.encode_frame(header, payload)
    (length,) = struct.unpack_from(">I", frame)
    assert length == len(frame) - 4
    assert frame[4] == 0  # a RustMQ body always starts with 0x00
    decoded, rest = frames.decode_body(memoryview(frame)[4:])
    assert decoded == header and bytes(rest) == payload


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "too short"),
        (b"\0\0\0\x09\x80", "does not fit"),
        (b"\0\x10\0\0\x80", "does not fit"),
        (b"\0\0\0\x01\xc1", "not valid msgpack"),
        (b"\0\0\0\x01\x90", "not a map"),
        (b"\0\0\0\x02\x81\x01", "not valid msgpack"),  # int map key: strict_map_key refuses it
    ],
)
def test_malformed_bodies_raise_frame_errors(body, reason) -> None:
    with pytest.raises(frames.FrameError) as caught:
        frames.decode_body(memoryview(body))
    assert caught.value.code == ErrorCode.MALFORMED_FRAME and reason in caught.value.message


def test_simple_bodies_are_told_apart_by_their_first_byte() -> None:
    assert frames.is_simple_body(simple.encode_message(b"v")[4:])
    assert not frames.is_simple_body(frames.encode_frame({"api": 3})[4:])
    assert not frames.is_simple_body(b"")


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({}, "missing field 'topic'"),
        ({"topic": b"bytes"}, "field 'topic' must be str, got bytes"),
        ({"topic": "t", "partition": 1.0}, "field 'partition' must be int, got float"),
        ({"topic": "t", "partition": False}, "field 'partition' must be int, got bool"),
        ({"topic": "t", "partition": -1}, "field 'partition' must be in [0, 9999], got -1"),
        ({"topic": "t", "acks": 4}, "field 'acks' must be in [0, 3], got 4"),
        ({"topic": "t", "key": "text"}, "field 'key' must be bytes, got str"),
    ],
)
def test_produce_fields_are_validated_by_name(header, message) -> None:
    with pytest.raises(RequestError) as caught:
        api.parse_produce(header)
    assert caught.value.code == ErrorCode.INVALID_REQUEST and caught.value.message == message


def test_fetch_limits_are_capped_by_the_broker() -> None:
    request = api.parse_fetch({"max_bytes": 1 << 30, "partitions": [{"topic": "t", "partition": 0, "offset": 5, "max_bytes": 1 << 30}]}, 1 << 20)
    assert request.max_bytes == 1 << 20 and request.partitions[0].max_bytes == 1 << 20
    assert (request.max_wait_ms, request.min_bytes) == (500, 1)
    with pytest.raises(RequestError, match="must not be empty"):
        api.parse_fetch({"partitions": []}, 1 << 20)
    with pytest.raises(RequestError, match="must be a map"):
        api.parse_fetch({"partitions": [[1, 2]]}, 1 << 20)


def test_envelope_validates_corr_and_api() -> None:
    assert api.parse_envelope({"api": 1, "corr": 2**32 - 1}) == (1, 2**32 - 1)
    with pytest.raises(RequestError, match="'corr'"):
        api.parse_envelope({"api": 1, "corr": 2**32})
    with pytest.raises(RequestError, match="missing field 'api'"):
        api.parse_envelope({"corr": 1})


def test_keyed_partitioning_is_crc32c_modulo_the_partition_count() -> None:
    # crc32c(b"123456789") is the standard check value 0xE3069283.
    assert api.partition_for_key(b"123456789", 1 << 32) == 0xE3069283
    assert api.partition_for_key(b"123456789", 12) == 0xE3069283 % 12


def test_simple_messages_and_replies() -> None:
    body = msgpack.packb({"key": "k", "value": b"v", "topic": "t", "partition": 2, "headers": {"a": "b"}})
    assert simple.decode_message(body) == simple.SimpleMessage("t", 2, b"k", b"v", [("a", b"b")])
    assert simple.decode_reply(simple.encode_offset_reply(41)) == 41
    assert simple.encode_error_reply(ErrorCode.UNKNOWN_TOPIC) == bytes.fromhex("8000000000000004")
    with pytest.raises(RequestError) as caught:
        simple.decode_reply(simple.encode_error_reply(ErrorCode.CORRUPT_BATCH))
    assert caught.value.code == ErrorCode.CORRUPT_BATCH
    for bad, code in ((msgpack.packb({"key": b"k"}), ErrorCode.INVALID_REQUEST),
                      (msgpack.packb({"value": 5}), ErrorCode.INVALID_REQUEST),
                      (msgpack.packb({"value": b"v", "partition": -2}), ErrorCode.INVALID_REQUEST),
                      (b"\x81\xc1", ErrorCode.MALFORMED_FRAME)):
        with pytest.raises(RequestError) as caught:
            simple.decode_message(bad)
        assert caught.value.code == code


@given(
    st.lists(st.tuples(st.integers(0, 10**6), st.none() | st.binary(max_size=30), st.none() | st.binary(max_size=300),
                       st.none() | st.lists(st.tuples(st.text(max_size=5), st.binary(max_size=5)).map(list), max_size=3)).map(list),
             min_size=1, max_size=30),
    st.sampled_from(sorted(records.CODEC_NAMES.values())),
)
def test_record_bodies_round_trip_with_every_codec(entries, codec) -> None:
    body = records.encode_body(entries, codec)
    as_tuples = tuple(tuple(tuple(map(tuple, field)) if isinstance(field, list) else field for field in entry) for entry in entries)
    assert records.decode_body(body, codec) == as_tuples


def test_bad_bodies_raise_record_decode_errors() -> None:
    with pytest.raises(records.RecordDecodeError):
        records.decode_body(b"not zstd", records.CODEC_ZSTD)
    with pytest.raises(records.RecordDecodeError):
        records.decode_body(b"\x05", records.CODEC_NONE)
    with pytest.raises(records.RecordDecodeError):
        records.decode_body(b"", 6)
