"""Frame format shared by every RustMQ connection (requests and responses alike).

All integers are big-endian::

    frame   := length:u32  body                 length = len(body), at most max_frame_bytes
    body    := header_length:u32  header  payload
    header  := one msgpack map with string keys  (header_length bytes, at most MAX_HEADER_BYTES)
    payload := raw bytes, length - 4 - header_length of them (record batches, or nothing)

The payload stays outside msgpack so record batches travel without being decoded or copied:
the broker slices them out of its receive buffer and hands the slice to the log, and a fetch
response is written as the encoded prefix followed by memoryviews of the log.

Because MAX_HEADER_BYTES < 2**24, the first body byte of a RustMQ frame is always 0x00. A body
whose first byte is a msgpack map marker (0x80-0x8f, 0xde, 0xdf) is a seed-style simple produce
message instead (``rustmq.protocol.simple``); the producer port accepts both.

The length is checked against the limit as soon as its four bytes arrive, before any buffer for
the body is allocated.
"""

from __future__ import annotations

import struct
from typing import Any, Final

import msgpack

from rustmq.protocol.api import ErrorCode

LENGTH: Final = struct.Struct(">I")
PREFIX: Final = struct.Struct(">II")  # frame length, header length
PREFIX_SIZE: Final = PREFIX.size
LENGTH_SIZE: Final = LENGTH.size

MAX_HEADER_BYTES: Final = 1 << 20
DEFAULT_MAX_FRAME_BYTES: Final = 16 << 20
MIN_BODY_BYTES: Final = LENGTH_SIZE + 1  # header_length plus the smallest msgpack map (0x80)

MSGPACK_MAP_MARKERS: Final = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])


class FrameError(Exception):
    """A frame that cannot be parsed; ``code`` is a ``rustmq.protocol.api.ErrorCode`` value."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def is_simple_body(body: memoryview | bytes) -> bool:
    """True when the body is a bare msgpack map, i.e. a seed-style simple produce message."""
    return len(body) > 0 and body[0] in MSGPACK_MAP_MARKERS


def decode_body(body: memoryview) -> tuple[dict[str, Any], memoryview]:
    """Split a RustMQ frame body into its decoded header map and its raw payload (a slice, no copy).

    Raises FrameError(MALFORMED_FRAME) for a header length that does not fit, msgpack that does
    not decode, or a header that is not a map with string keys.
    """
    if len(body) < MIN_BODY_BYTES:
        raise FrameError(ErrorCode.MALFORMED_FRAME, f"frame body of {len(body)} bytes is too short")
    (header_length,) = LENGTH.unpack_from(body, 0)
    if header_length > MAX_HEADER_BYTES or LENGTH_SIZE + header_length > len(body):
        raise FrameError(
            ErrorCode.MALFORMED_FRAME,
            f"header length {header_length} does not fit in a body of {len(body)} bytes",
        )
    end = LENGTH_SIZE + header_length
    try:
        header = msgpack.unpackb(body[LENGTH_SIZE:end], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise FrameError(ErrorCode.MALFORMED_FRAME, f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise FrameError(ErrorCode.MALFORMED_FRAME, f"header is a {type(header).__name__}, not a map")
    return header, body[end:]


def encode_prefix(header: dict[str, Any], payload_size: int = 0) -> bytes:
    """The bytes of a frame up to its payload: length, header length and the packed header.

    The caller writes ``payload_size`` bytes of payload right after (possibly as several views).
    """
    packed = msgpack.packb(header, use_bin_type=True)
    return PREFIX.pack(LENGTH_SIZE + len(packed) + payload_size, len(packed)) + packed


def encode_frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """A complete frame in one bytes object (convenient for small frames and for tests)."""
    return encode_prefix(header, len(payload)) + payload
