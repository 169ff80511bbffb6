"""What every reading client hands out: the `Message` tuple and the decoding of raw record batches
into them (one msgpack call per batch), shared by the plain consumer and the group consumer.

A module of its own so that the consumers build on it without importing each other.
"""

from __future__ import annotations

from typing import NamedTuple

from rustmq.protocol import batch as record_batch
from rustmq.protocol import records


class Message(NamedTuple):
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] | None


def decode_batches(topic: str, partition: int, data: bytes | memoryview, position: int) -> tuple[list[Message], int]:
    """Messages at or after ``position`` in concatenated raw batches, and the next position."""
    view = memoryview(data)
    out: list[Message] = []
    for pos, header in record_batch.iter_batches(view):
        last = header.base_offset + header.record_count - 1
        if last >= position:
            record_batch.verify_crc(view, pos, header, f"{topic}/{partition}")
            entries = records.decode_body(view[pos + record_batch.HEADER_SIZE : pos + header.size], header.attributes & records.CODEC_MASK)
            if len(entries) != header.record_count:
                raise records.RecordDecodeError(
                    f"{topic}/{partition}: batch at offset {header.base_offset} holds {len(entries)} records, "
                    f"its header says {header.record_count}")
            base, first_ts = header.base_offset, header.first_timestamp_ms
            skip = max(0, position - base)
            make = tuple.__new__  # Message(...) without the Python-level __new__ frame per record
            try:
                out += [
                    make(Message, (topic, partition, base + index, first_ts + entry[0], entry[1], entry[2], entry[3]))
                    for index, entry in enumerate(entries[skip:] if skip else entries, skip)
                ]
            except (TypeError, IndexError, KeyError):
                # Valid msgpack, wrong shape: a record must be [timestamp_delta, key, value, headers].
                raise records.RecordDecodeError(
                    f"{topic}/{partition}: batch at offset {header.base_offset} holds a record that is not "
                    "[timestamp_delta, key, value, headers]") from None
            position = last + 1
    return out, position
