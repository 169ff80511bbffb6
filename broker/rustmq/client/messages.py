"""What every reading client hands out: the `Message` tuple and the decoding of raw record batches
into them (one msgpack call per batch), shared by the plain consumer and the group consumer.

A module of its own so that the consumers build on it without importing each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

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
    out: list[Message] = []
    make = tuple.__new__  # Message(...) without the Python-level __new__ frame per record
    for header, entries in verified_batches(memoryview(data), f"{topic}/{partition}", position):
        base, first_ts = header.base_offset, header.first_timestamp_ms
        skip = max(0, position - base)
        try:
            out += [
                make(Message, (topic, partition, base + index, first_ts + entry[0], entry[1], entry[2], entry[3]))
                for index, entry in enumerate(entries[skip:] if skip else entries, skip)
            ]
        except (TypeError, IndexError, KeyError):
            # Valid msgpack, wrong shape: a record must be [timestamp_delta, key, value, headers].
            raise records.RecordDecodeError(
                f"{topic}/{partition}: batch at offset {base} holds a record that is not "
                "[timestamp_delta, key, value, headers]") from None
        position = base + header.record_count
    return out, position


def verified_batches(view: memoryview, where: str, position: int = 0) -> Iterator[tuple[record_batch.BatchHeader, tuple[Any, ...]]]:
    """Each whole batch in ``view`` that ends at or after ``position``, its CRC checked, with its
    decoded records (exactly as many as its header says; RecordDecodeError otherwise)."""
    for pos, header in record_batch.iter_batches(view):
        if header.base_offset + header.record_count <= position:
            continue
        record_batch.verify_crc(view, pos, header, where)
        entries = records.decode_body(view[pos + record_batch.HEADER_SIZE : pos + header.size],
                                      header.attributes & records.CODEC_MASK)
        if len(entries) != header.record_count:
            raise records.RecordDecodeError(
                f"{where}: batch at offset {header.base_offset} holds {len(entries)} records, "
                f"its header says {header.record_count}")
        yield header, entries
