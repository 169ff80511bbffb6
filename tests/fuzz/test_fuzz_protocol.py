"""Fuzzing the frame decoder, the request parsers and record-batch validation (hypothesis).

Each target takes arbitrary input and must either succeed or raise its documented error:
FrameError for frames, RequestError for request fields and simple messages, CorruptBatchError
for batches, RecordDecodeError for batch bodies. Any other exception is a crash the broker would
answer with INTERNAL_ERROR (or worse). Inputs that once crashed are kept as @example cases.
Bounded for CI: at most a few hundred examples per target, no per-example deadline.
"""

from __future__ import annotations

import inspect
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from strategies import HEADERS, VALUES, examples, packable, requests

from rustmq.protocol import api, batch, frames, records, simple
from rustmq.protocol.api import RequestError
from rustmq.storage import errors

FUZZ = settings(max_examples=examples(200), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

PARSERS = [(name, function) for name, function in inspect.getmembers(api, inspect.isfunction)
           if name.startswith("parse_")]


def test_every_parser_is_fuzzed() -> None:
    assert len(PARSERS) >= 10, [name for name, _ in PARSERS]


@pytest.mark.parametrize("name,parser", PARSERS, ids=[name for name, _ in PARSERS])
@FUZZ
@given(header=HEADERS)
def test_request_parsers_accept_or_refuse_clearly(name: str, parser: Any,
                                                  header: dict[str, Any]) -> None:
    arguments = [header] + [1 << 20] * (len(inspect.signature(parser).parameters) - 1)
    try:
        parser(*arguments)
    except RequestError as error:
        assert error.code and error.message


@FUZZ
@given(body=st.binary(max_size=256))
@example(body=b"\x00\x00\x00\x01\x80")  # the smallest valid body: an empty header map
@example(body=b"\x00\x00\x00\x02\x81\x01")  # a map with an int key (strict_map_key)
@example(body=b"\x00\x00\x00\x01\xc1")  # a reserved msgpack byte
@example(body=b"\xff\xff\xff\xff\x80")  # a header length past the body
def test_frame_bodies_decode_or_raise_frame_error(body: bytes) -> None:
    try:
        header, payload = frames.decode_body(memoryview(body))
    except frames.FrameError as error:
        assert error.code == api.ErrorCode.MALFORMED_FRAME
        return
    assert isinstance(header, dict) and all(isinstance(key, str) for key in header)
    assert len(payload) <= len(body)


@FUZZ
@given(header=requests(), payload=st.binary(max_size=64))
def test_frames_round_trip(header: dict[str, Any], payload: bytes) -> None:
    if not packable(header):
        return
    frame = frames.encode_frame(header, payload)
    (length,) = struct.unpack_from(">I", frame)
    assert length == len(frame) - 4
    decoded, rest = frames.decode_body(memoryview(frame)[4:])
    assert bytes(rest) == payload
    # compared as bytes: NaN != NaN
    assert msgpack.packb(decoded, use_bin_type=True) == msgpack.packb(header, use_bin_type=True)


@FUZZ
@given(header=requests())
def test_envelopes_parse_or_refuse(header: dict[str, Any]) -> None:
    try:
        api_key, corr = api.parse_envelope(header)
    except RequestError:
        return
    assert api_key == header["api"] and corr == header["corr"]


@FUZZ
@given(message=VALUES | HEADERS, raw=st.binary(max_size=64))
@example(message={"value": b"v", "headers": {"h": 1}}, raw=b"")
@example(message={"value": b"v", "partition": True}, raw=b"")
def test_simple_messages_decode_or_raise_request_error(message: Any, raw: bytes) -> None:
    for body in ([msgpack.packb(message, use_bin_type=True)] if packable(message) else []) + [raw]:
        try:
            decoded = simple.decode_message(body)
        except RequestError as error:
            assert error.code in (api.ErrorCode.MALFORMED_FRAME, api.ErrorCode.INVALID_REQUEST)
            continue
        assert isinstance(decoded.value, bytes)


def valid_batches(count: int) -> bytes:
    out = []
    for index in range(count):
        body = records.encode_body([[0, b"k%d" % index, b"v" * index, None]])
        out.append(batch.build_batch(body, record_count=1, first_timestamp_ms=index,
                                     max_timestamp_ms=index))
    return b"".join(out)


@FUZZ
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes_are_refused_as_corrupt_batches(data: bytes) -> None:
    try:
        scan = batch.scan_batches(data)
    except errors.CorruptBatchError as error:
        assert 0 <= error.position <= len(data)
        return
    assert scan.batch_count >= 1  # accepted: then every batch must also pass the full check
    for position, header in batch.iter_batches(memoryview(data)):
        batch.check_batch(memoryview(data), position, len(data))
        batch.verify_crc(data, position, header)


@FUZZ
@given(count=st.integers(1, 4), position=st.integers(0, 10_000), bit=st.integers(0, 7),
       cut=st.integers(0, 10_000), mode=st.sampled_from(["flip", "truncate", "extend"]))
@example(count=4, position=0, bit=0, cut=0, mode="truncate")  # whole batches left: accepted
def test_damaged_valid_batches_are_refused_or_still_exact(count: int, position: int, bit: int,
                                                         cut: int, mode: str) -> None:
    data = bytearray(valid_batches(count))
    boundaries = {position for position, _ in batch.iter_batches(memoryview(bytes(data)))}
    if mode == "flip":
        position %= len(data)
        data[position] ^= 1 << bit
    elif mode == "truncate":
        del data[cut % len(data) :]
    else:
        data += bytes([bit]) * (cut % 64 + 1)
    try:
        batch.scan_batches(data)
    except errors.CorruptBatchError:
        return
    # Accepted: a cut at a batch boundary leaves whole batches; otherwise only a flip in a field
    # the CRC does not cover (base_offset, leader_epoch), which the broker overwrites on append.
    if mode == "truncate":
        assert len(data) in boundaries, len(data)
        return
    assert mode == "flip"
    offset_in_batch = position
    for _, header in batch.iter_batches(memoryview(valid_batches(count))):
        if offset_in_batch < header.size:
            break
        offset_in_batch -= header.size
    assert offset_in_batch < 8 or 12 <= offset_in_batch < 16, (position, offset_in_batch)


@FUZZ
@given(body=st.binary(max_size=256), codec=st.integers(0, 7), value=VALUES)
def test_batch_bodies_decode_or_raise_record_decode_error(body: bytes, codec: int,
                                                          value: Any) -> None:
    inputs = [body] + ([msgpack.packb(value, use_bin_type=True)] if packable(value) else [])
    for data in inputs:
        try:
            decoded = records.decode_body(data, codec)
        except records.RecordDecodeError:
            continue
        assert isinstance(decoded, tuple)
