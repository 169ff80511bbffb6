"""Seed-compatible single-message produce, accepted on the producer port next to RustMQ frames.

The deployment RustMQ replaces took, on port 9092, frames of ``length:u32`` followed by one
serialized message and answered each with the ``u64`` big-endian offset it was written at. RustMQ
keeps that exchange with msgpack as the serialization::

    request := length:u32  map          map = msgpack {"key": bin|str|nil, "value": bin|str,
                                                       "topic"?: str, "partition"?: int,
                                                       "headers"?: {str: bin|str}}
    reply   := offset:u64                a reply below 2**63 is the offset of the message
             | 0x8000_0000_0000_0000 | code   top bit set: an error; the low 16 bits are an ErrorCode

Offsets never reach 2**63, so a reply with the top bit set is unambiguous, and a client that
only reads eight bytes per message stays in step after an error. Replies come in request order,
one per frame, and the connection stays open after an error unless the frame itself could not be
delimited (FRAME_TOO_LARGE), in which case that error reply is the last thing sent.
"""

from __future__ import annotations

import struct
from typing import Any, Final, NamedTuple

import msgpack

from rustmq.protocol.api import ErrorCode, RequestError

REPLY: Final = struct.Struct(">Q")
ERROR_FLAG: Final = 1 << 63


class SimpleMessage(NamedTuple):
    topic: str | None
    partition: int | None
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] | None


def _as_bytes(value: Any, name: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise RequestError(ErrorCode.INVALID_REQUEST, f"field {name!r} must be bin or str, got {type(value).__name__}")


def decode_message(body: memoryview | bytes) -> SimpleMessage:
    """Decode one simple produce map; RequestError for malformed msgpack or wrong field types."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise RequestError(ErrorCode.MALFORMED_FRAME, f"message is not valid msgpack: {exc}") from None
    if not isinstance(message, dict):
        raise RequestError(ErrorCode.MALFORMED_FRAME, "message is not a msgpack map")
    if "value" not in message:
        raise RequestError(ErrorCode.INVALID_REQUEST, "missing field 'value'")
    key = message.get("key")
    topic = message.get("topic")
    if topic is not None and not isinstance(topic, str):
        raise RequestError(ErrorCode.INVALID_REQUEST, "field 'topic' must be str")
    partition = message.get("partition")
    if partition is not None and (not isinstance(partition, int) or isinstance(partition, bool) or partition < 0):
        raise RequestError(ErrorCode.INVALID_REQUEST, "field 'partition' must be a non-negative int")
    raw_headers = message.get("headers")
    headers = None
    if raw_headers is not None:
        if not isinstance(raw_headers, dict):
            raise RequestError(ErrorCode.INVALID_REQUEST, "field 'headers' must be a map")
        headers = [(str(name), _as_bytes(value, f"headers.{name}")) for name, value in raw_headers.items()]
    return SimpleMessage(
        topic=topic,
        partition=partition,
        key=None if key is None else _as_bytes(key, "key"),
        value=_as_bytes(message["value"], "value"),
        headers=headers,
    )


def encode_message(value: bytes, key: bytes | None = None, topic: str | None = None) -> bytes:
    """A complete simple produce frame (what a seed-style client sends)."""
    fields: dict[str, Any] = {"key": key, "value": value}
    if topic is not None:
        fields["topic"] = topic
    packed = msgpack.packb(fields, use_bin_type=True)
    return struct.pack(">I", len(packed)) + packed


def encode_offset_reply(offset: int) -> bytes:
    return REPLY.pack(offset)


def encode_error_reply(code: ErrorCode) -> bytes:
    return REPLY.pack(ERROR_FLAG | int(code))


def decode_reply(reply: bytes) -> int:
    """The offset in a reply, or RequestError carrying the code of an error reply."""
    (value,) = REPLY.unpack(reply)
    if value & ERROR_FLAG:
        code = value & 0xFFFF
        try:
            error = ErrorCode(code)
        except ValueError:
            error = ErrorCode.INTERNAL_ERROR
        raise RequestError(error, f"broker answered error {code} ({error.name})")
    return value
