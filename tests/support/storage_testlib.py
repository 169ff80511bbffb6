"""Helpers shared by the storage tests (loaded by conftest.py as module `storage_testlib`)."""

from __future__ import annotations

from rustmq.protocol import batch
from rustmq.storage import config


def make_batch(index: int, records: int = 3, body_size: int = 100, timestamp_ms: int | None = None
               ) -> bytes:
    """A valid batch whose body encodes `index` and holds no zero byte (so zeroing always damages)."""
    body = bytes((index + k) % 251 + 1 for k in range(body_size))
    ts = 1_000 + index if timestamp_ms is None else timestamp_ms
    return batch.build_batch(body[:body_size], record_count=records, first_timestamp_ms=ts,
                             max_timestamp_ms=ts + 1)


def stamped(raw: bytes, base_offset: int) -> bytes:
    """`raw` as it must read back after being appended at `base_offset`."""
    out = bytearray(raw)
    batch.stamp_batch(out, 0, base_offset)
    return bytes(out)


def small_config(**changes: object) -> config.LogConfig:
    values: dict[str, object] = {
        "segment_bytes": 4096,
        "index_interval_bytes": 256,
        "retention_ms": None,
        "segment_ms": None,
        "flush": {"mode": "none"},
    }
    values.update(changes)
    return config.LogConfig.from_dict(values)


def read_all(partition, start: int | None = None) -> bytes:  # type: ignore[no-untyped-def]
    """Every byte the partition serves from `start` on, following next_offset."""
    offset = partition.start_offset if start is None else start
    out = bytearray()
    while offset < partition.end_offset:
        fetched = partition.read(offset, 1 << 20)
        assert fetched.views, "a read below end_offset must return at least one batch"
        for view in fetched.views:
            out += view
        offset = fetched.next_offset
    return bytes(out)


def crash_batch(index: int) -> bytes:
    """The batch the crash-test writer appends as its `index`-th: 1..8 KiB, 1..64 records."""
    size = 1024 * (1 + index % 8)
    body = (index.to_bytes(4, "big") * (size // 4 + 1))[:size]
    return batch.build_batch(body, record_count=1 + index % 64, first_timestamp_ms=index,
                             max_timestamp_ms=index + 5)


def read_records(log, start: int | None = None  # type: ignore[no-untyped-def]
                 ) -> list[tuple[int, bytes | None, bytes | None]]:
    """Every (offset, key, value) a consumer gets from `start` (default: the log start) on, read
    the way consumers read: fetch, decode, continue after the batch (gaps of compaction too)."""
    from rustmq.client.consumer import decode_batches

    out: list[tuple[int, bytes | None, bytes | None]] = []
    offset = log.start_offset if start is None else start
    while offset < log.end_offset:
        fetched = log.read(offset, 1 << 20)
        data = b"".join(bytes(view) for view in fetched.views)
        for view in fetched.views:
            view.release()
        messages, position = decode_batches("t", 0, data, offset)
        out += [(m.offset, m.key, m.value) for m in messages]
        assert max(position, fetched.next_offset) > offset, "a read made no progress"
        offset = max(position, fetched.next_offset)
    return out
