"""The record batch: the unit of storage, byte for byte the same on disk and on the wire.

A producer builds a batch, the broker validates it (`scan_batches`), stamps its offset into the
header and copies the bytes into a segment; a consumer receives the very same bytes. The body of
records is opaque here (the protocol layer defines the record encoding inside it, and compression
applies to the body as a whole), so the broker never touches individual records.

Byte layout (version 1). All integers are big-endian; the header is HEADER_SIZE = 57 bytes::

    offset size field               type  meaning
     0     8    base_offset         i64   offset of the first record; stamped by the broker on append
                                          (producers send 0); NOT covered by the CRC
     8     4    batch_length        i32   number of bytes AFTER this field: the batch occupies
                                          12 + batch_length bytes in total (>= HEADER_SIZE - 12)
    12     4    leader_epoch        i32   stamped by the broker on append: -1 in standalone mode,
                                          the partition's leader epoch in cluster mode (followers
                                          keep the leader's); recovery rejects values below -1;
                                          NOT covered by the CRC
    16     1    magic               i8    format version, always 1
    17     4    crc                 u32   CRC32C (Castagnoli, package `crc32c`) of bytes
                                          [21, 12 + batch_length): attributes to the end of the body
    21     2    attributes          i16   bits 0-2: codec of the body (0 none, 1 gzip, 2 zstd, 3 lz4);
                                          bits 3-15 reserved and must be 0
    23     4    record_count        i32   >= 1; the batch holds offsets
                                          base_offset .. base_offset + record_count - 1
    27     8    first_timestamp_ms  i64   timestamp of the first record (ms since the epoch)
    35     8    max_timestamp_ms    i64   largest record timestamp in the batch, >= first_timestamp_ms
    43     8    producer_id         i64   -1 when the producer is not idempotent
    51     2    producer_epoch      i16   -1 when none
    53     4    base_sequence       i32   sequence number of the first record, -1 when none
    57     ...  body                      record_count records, encoded (and maybe compressed) by the
                                          protocol layer; opaque to storage

Why this shape (after Kafka's record batch v2): the fields the broker writes sit before the CRC, so
an append stamps them (as it writes the batch) without recomputing a checksum, and the CRC covers
everything the producer wrote. A batch_length of zero never occurs in a valid batch, so the
zero-filled tail of a segment reads as "no more batches". The uncovered fields
are still checked on recovery: magic by value, batch_length by framing and by the CRC over the
range it delimits, base_offset by the offset sequence, leader_epoch by range.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from enum import IntEnum
from typing import Final, NamedTuple

import crc32c


class CorruptBatchError(ValueError):
    """A record batch failed validation (framing, header sanity or CRC32C).

    `position` is the byte position of the bad batch within the buffer or segment that was scanned.
    The storage engine raises it too (rustmq.storage.errors re-exports it), for batches that break
    its own rules (compacted batches, appends).
    """

    def __init__(self, reason: str, position: int = 0) -> None:
        super().__init__(f"corrupt record batch at byte {position}: {reason}")
        self.reason = reason
        self.position = position


HEADER_STRUCT: Final = struct.Struct(">qiibIhiqqqhi")
HEADER_SIZE: Final = HEADER_STRUCT.size
assert HEADER_SIZE == 57

LENGTH_FIELDS_SIZE: Final = 12  # base_offset + batch_length: what precedes the counted bytes
CRC_START: Final = 21  # the CRC covers [CRC_START, end of batch)
MAGIC: Final = 1
CODEC_MASK: Final = 0x07
MAX_BATCH_SIZE: Final = LENGTH_FIELDS_SIZE + 0x7FFF_FFFF
NO_LEADER_EPOCH: Final = -1

_BASE_OFFSET_STRUCT: Final = struct.Struct(">q")
_LEADER_EPOCH_STRUCT: Final = struct.Struct(">i")
_CRC_PREFIX_STRUCT: Final = struct.Struct(">qiib")  # base_offset, batch_length, leader_epoch, magic
_CRC_STRUCT: Final = struct.Struct(">I")
_CRC_COVERED_STRUCT: Final = struct.Struct(">hiqqqhi")  # attributes .. base_sequence
assert _CRC_PREFIX_STRUCT.size + _CRC_STRUCT.size == CRC_START
assert CRC_START + _CRC_COVERED_STRUCT.size == HEADER_SIZE


class Codec(IntEnum):
    """Compression codec of a batch body (attributes bits 0-2). Storage never (de)compresses."""

    NONE = 0
    GZIP = 1
    ZSTD = 2
    LZ4 = 3


class BatchHeader(NamedTuple):
    """The decoded fixed header of one batch, in wire order."""

    base_offset: int
    batch_length: int
    leader_epoch: int
    magic: int
    crc: int
    attributes: int
    record_count: int
    first_timestamp_ms: int
    max_timestamp_ms: int
    producer_id: int
    producer_epoch: int
    base_sequence: int

    @property
    def size(self) -> int:
        """Total bytes the batch occupies, header included."""
        return LENGTH_FIELDS_SIZE + self.batch_length

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.record_count - 1

    @property
    def codec(self) -> Codec:
        return Codec(self.attributes & CODEC_MASK)


class BatchScan(NamedTuple):
    """What `scan_batches` learned about a buffer of concatenated, valid batches."""

    batch_count: int
    record_count: int
    max_timestamp_ms: int
    size_bytes: int
    positions: list[int]  # byte position of each batch in the buffer


def build_batch(
    body: bytes | bytearray | memoryview,
    *,
    record_count: int,
    first_timestamp_ms: int,
    max_timestamp_ms: int,
    codec: Codec = Codec.NONE,
    producer_id: int = -1,
    producer_epoch: int = -1,
    base_sequence: int = -1,
) -> bytes:
    """Return a complete batch around `body` with base_offset 0, leader_epoch -1 and a valid CRC.

    Raises ValueError on arguments that would make an invalid batch.
    """
    if record_count < 1:
        raise ValueError(f"a batch holds at least one record, not {record_count}")
    if max_timestamp_ms < first_timestamp_ms:
        raise ValueError("max_timestamp_ms must be >= first_timestamp_ms")
    codec = Codec(codec)
    batch_length = HEADER_SIZE - LENGTH_FIELDS_SIZE + len(body)
    if batch_length > 0x7FFF_FFFF:
        raise ValueError(f"batch body of {len(body)} bytes is too large")
    covered = _CRC_COVERED_STRUCT.pack(
        int(codec),
        record_count,
        first_timestamp_ms,
        max_timestamp_ms,
        producer_id,
        producer_epoch,
        base_sequence,
    )
    crc = crc32c.crc32c(body, crc32c.crc32c(covered))
    prefix = _CRC_PREFIX_STRUCT.pack(0, batch_length, -1, MAGIC) + _CRC_STRUCT.pack(crc)
    return b"".join((prefix, covered, body))


def read_header(buf: bytes | bytearray | memoryview, pos: int = 0) -> BatchHeader:
    """Decode the header at `pos` (no validation beyond "there are enough bytes")."""
    if pos < 0 or len(buf) - pos < HEADER_SIZE:
        available = max(0, len(buf) - pos)
        raise CorruptBatchError(f"truncated header: {available} of {HEADER_SIZE} bytes", pos)
    return BatchHeader._make(HEADER_STRUCT.unpack_from(buf, pos))


def iter_batches(buf: bytes | bytearray | memoryview) -> Iterator[tuple[int, BatchHeader]]:
    """(position, header) of each whole batch in concatenated batches, trusting their sizes (for
    bytes already validated: read from the log or checked by `scan_batches`); stops before a
    trailing partial batch."""
    pos, end = 0, len(buf)
    while end - pos >= HEADER_SIZE:
        header = read_header(buf, pos)
        if header.size < HEADER_SIZE or pos + header.size > end:
            return
        yield pos, header
        pos += header.size


def check_batch(buf: memoryview, pos: int, end: int) -> BatchHeader:
    """Validate the batch starting at `pos` whose bytes must lie within [pos, end); return its header.

    Checks framing, magic, attributes, counts, timestamps and the CRC; raises CorruptBatchError
    with the reason otherwise. `buf` must be a byte-format memoryview (or anything sliceable
    without copying, such as an mmap wrapped in a memoryview).
    """
    if end - pos < HEADER_SIZE:
        raise CorruptBatchError(f"truncated header: {end - pos} of {HEADER_SIZE} bytes", pos)
    header = BatchHeader._make(HEADER_STRUCT.unpack_from(buf, pos))
    size = LENGTH_FIELDS_SIZE + header.batch_length
    if header.batch_length < HEADER_SIZE - LENGTH_FIELDS_SIZE:
        raise CorruptBatchError(
            f"batch_length {header.batch_length} is smaller than a header", pos
        )
    if size > end - pos:
        raise CorruptBatchError(
            f"batch_length {header.batch_length} runs past the end ({end - pos} bytes available)", pos
        )
    if header.magic != MAGIC:
        raise CorruptBatchError(f"unknown magic {header.magic} (expected {MAGIC})", pos)
    if header.attributes & ~CODEC_MASK or (header.attributes & CODEC_MASK) > Codec.LZ4:
        raise CorruptBatchError(f"invalid attributes 0x{header.attributes & 0xFFFF:04x}", pos)
    if header.record_count < 1:
        raise CorruptBatchError(f"record_count {header.record_count} must be at least 1", pos)
    if header.max_timestamp_ms < header.first_timestamp_ms:
        raise CorruptBatchError("max_timestamp_ms is before first_timestamp_ms", pos)
    actual = crc32c.crc32c(buf[pos + CRC_START : pos + size])
    if actual != header.crc:
        raise CorruptBatchError(
            f"CRC32C mismatch (stored 0x{header.crc:08x}, computed 0x{actual:08x})", pos
        )
    return header


def verify_crc(buf: bytes | bytearray | memoryview, pos: int, header: BatchHeader,
               where: str = "") -> None:
    """Raise CorruptBatchError unless the CRC32C of the batch at `pos` (framed by `header`, e.g.
    from `iter_batches`) matches: what a consumer calls on every batch it fetched, since the
    broker never verifies on reads (docs/storage.md, "What is verified when")."""
    actual = crc32c.crc32c(memoryview(buf)[pos + CRC_START : pos + header.size])
    if actual != header.crc:
        raise CorruptBatchError(
            f"{where}{': ' if where else ''}batch at offset {header.base_offset}: CRC32C "
            f"mismatch (stored 0x{header.crc:08x}, computed 0x{actual:08x}); the stored copy is "
            "damaged", pos)


def scan_batches(buf: bytes | bytearray | memoryview) -> BatchScan:
    """Validate one or more concatenated batches; raise CorruptBatchError at the first bad one.

    Loops per batch (never per record) and copies no payload. An empty buffer is rejected too:
    a produce request must carry at least one batch.
    """
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    end = len(view)
    if end == 0:
        raise CorruptBatchError("no batch in an empty buffer", 0)
    pos = 0
    record_count = 0
    max_timestamp_ms = -(1 << 63)
    positions: list[int] = []
    while pos < end:
        header = check_batch(view, pos, end)
        positions.append(pos)
        record_count += header.record_count
        if header.max_timestamp_ms > max_timestamp_ms:
            max_timestamp_ms = header.max_timestamp_ms
        pos += LENGTH_FIELDS_SIZE + header.batch_length
    return BatchScan(len(positions), record_count, max_timestamp_ms, end, positions)


def stamp_base_offset(buf: memoryview | bytearray, pos: int, base_offset: int) -> None:
    """Write `base_offset` into the header at `pos` in place (the CRC stays valid)."""
    _BASE_OFFSET_STRUCT.pack_into(buf, pos, base_offset)



def stamp_batch(buf: memoryview | bytearray, pos: int, base_offset: int,
                leader_epoch: int = NO_LEADER_EPOCH) -> None:
    """Write both broker-owned fields (base_offset, leader_epoch) of the batch at `pos` in place."""
    _BASE_OFFSET_STRUCT.pack_into(buf, pos, base_offset)
    _LEADER_EPOCH_STRUCT.pack_into(buf, pos + 12, leader_epoch)
