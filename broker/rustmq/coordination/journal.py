"""A compacting key/value journal on a PartitionLog: the persistence of every coordination store.

Layout (one directory per store, e.g. ``<data_dir>/coordination/consumer_offsets``)::

    gen-00000000000000000007/   a PartitionLog (rustmq.storage) holding the current generation
    gen-00000000000000000008/   a newer generation being written by `compact` (or a leftover)

Byte format: ordinary record batches (`rustmq.storage.batch`) whose bodies use the protocol's
record encoding (`rustmq.protocol.records`: a msgpack array of
``[timestamp_delta, key, value, headers]``), so the internal logs can be read with the same
tools as any topic. Keys and values are opaque bytes chosen by the store (offsets, queue);
a value of nil is a tombstone. Every generation starts with ONE batch whose first record has the
key GENERATION_KEY (value: msgpack ``{"generation": n, "created_ms": t}``) followed by the full
live state at compaction time; later batches are the changes since.

Why generations instead of in-place compaction: the storage engine deletes whole segments by
retention only, so the journal compacts by writing the live state as the first batch of a fresh
PartitionLog and then deleting the old one. A batch is atomic (CRC-checked, a torn tail is
truncated by recovery), so a generation either starts with its complete snapshot or is
invalid. `open` uses the newest valid generation and deletes the rest:

* crash while writing gen N+1: gen N+1 has no (complete) first batch -> discarded, gen N used;
* crash after gen N+1 was fsynced but before gen N was deleted: gen N+1 is used, gen N deleted.

Appends go to the current generation. Durability is the caller's choice: `flush()` blocks until
everything appended is on disk; a server can instead hand `partition` to its GroupCommitter.
Replay reads the generation from its first batch, so restart time is bounded by the live state
plus the tail since the last compaction (`compact_bytes`).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final

import msgpack

from rustmq.protocol import records
from rustmq.storage import batch, errors
from rustmq.storage.config import FlushPolicy, LogConfig
from rustmq.storage.partition import PartitionLog, make_directories

logger = logging.getLogger("rustmq.coordination")

GENERATION_KEY: Final = b"\x00rustmq.generation"
GENERATION_PREFIX: Final = "gen-"
READ_CHUNK_BYTES: Final = 4 << 20
DEFAULT_COMPACT_BYTES: Final = 16 << 20

Entry = tuple[bytes, bytes | None]

# The journal's own segments never expire by time or size: compaction is what bounds them.
JOURNAL_CONFIG: Final = LogConfig(
    segment_bytes=8 << 20, segment_ms=None, retention_ms=None, retention_bytes=None,
    retention_messages=None, flush=FlushPolicy(mode="always"),
)


class JournalCorruptError(Exception):
    """A generation whose records do not decode (not a torn tail: storage truncates those)."""


class Journal:
    """Open with `Journal.open`; then `replay()` once, then `append`/`flush`/`compact`."""

    def __init__(self, directory: Path, config: LogConfig, compact_bytes: int) -> None:
        self.directory = directory
        self.config = config
        self.compact_bytes = compact_bytes
        self.generation = 0
        self.partition: PartitionLog = None  # type: ignore[assignment]
        self._snapshot_bytes = 0  # size of the generation's first batch
        self._retry_at_tail = 0  # after a failed compaction, wait for this much more tail
        self.compactions = 0
        self.compaction_failures = 0

    @classmethod
    def open(cls, directory: Path, *, config: LogConfig = JOURNAL_CONFIG,
             compact_bytes: int = DEFAULT_COMPACT_BYTES) -> Journal:
        journal = cls(Path(directory), config, compact_bytes)
        journal._open()
        return journal

    def _open(self) -> None:
        make_directories(self.directory)  # named durably: a power loss must not lose the store
        generations = sorted(
            (int(entry.name[len(GENERATION_PREFIX):]), entry.name)
            for entry in os.scandir(self.directory)
            if entry.is_dir() and entry.name.startswith(GENERATION_PREFIX)
            and entry.name[len(GENERATION_PREFIX):].isdigit()
        )
        chosen: tuple[int, PartitionLog] | None = None
        for number, name in reversed(generations):
            path = self.directory / name
            if chosen is not None:
                logger.info("%s: removing superseded journal generation %s", self.directory, name)
                shutil.rmtree(path, ignore_errors=True)
                continue
            partition = PartitionLog.open(path, self.config)
            first = _first_batch_size(partition)
            if first is None:
                logger.warning("%s: journal generation %s has no complete snapshot; discarding",
                               self.directory, name)
                partition.close(clean=False)
                shutil.rmtree(path, ignore_errors=True)
                continue
            chosen = (number, partition)
            self._snapshot_bytes = first
        if chosen is None:
            self.generation = 0
            self.partition = self._create_generation(1, [], now_ms=0)
            self.generation = 1
        else:
            self.generation, self.partition = chosen
        _fsync_directory(self.directory)

    # ------------------------------------------------------------------------------- reading

    def replay(self) -> Iterator[Entry]:
        """Every (key, value) of the current generation in order, snapshot first, marker skipped."""
        partition = self.partition
        offset = partition.start_offset
        while offset < partition.end_offset:
            fetched = partition.read(offset, READ_CHUNK_BYTES)
            for view in fetched.views:
                try:
                    yield from _decode_batches(view)
                finally:
                    view.release()
            offset = fetched.next_offset

    # ------------------------------------------------------------------------------- writing

    def append(self, entries: Sequence[Entry], now_ms: int) -> int:
        """Append entries as one batch (atomic); return the offset of the last one."""
        if not entries:
            raise ValueError("nothing to append")
        result = self.partition.append(_build(entries, now_ms))
        return result.last_offset

    def flush(self) -> int:
        return self.partition.flush()

    def position(self) -> tuple[PartitionLog, int]:
        """(partition, offset): everything appended so far is durable once that partition's
        durable_offset is above offset. Ask after `maybe_compact`: a compaction moves the state
        to a new generation whose offsets are unrelated to those `append` returned before."""
        return self.partition, self.partition.end_offset - 1

    @property
    def tail_bytes(self) -> int:
        """Bytes appended since the generation's snapshot."""
        return self.partition.size_bytes - self._snapshot_bytes

    def wants_compaction(self) -> bool:
        tail = self.tail_bytes
        return tail > max(self.compact_bytes, self._snapshot_bytes, self._retry_at_tail)

    def maybe_compact(self, live: Callable[[], Sequence[Entry]], now_ms: int) -> bool:
        """Compact if due. A failure (disk full...) is logged and retried after another
        `compact_bytes` of tail: the current generation stays valid, so nothing is lost."""
        if not self.wants_compaction():
            return False
        try:
            self.compact(live(), now_ms)
        except (OSError, errors.StorageError) as error:
            self.compaction_failures += 1
            self._retry_at_tail = self.tail_bytes + self.compact_bytes
            logger.error("%s: compaction failed (%s); keeping generation %d",
                         self.directory, error, self.generation)
            return False
        self._retry_at_tail = 0
        return True

    def compact(self, live: Sequence[Entry], now_ms: int) -> None:
        """Start a new generation holding exactly `live`, then delete the old one.

        `live` must be the complete state as of everything appended so far.
        """
        number = self.generation + 1
        new_partition = self._create_generation(number, live, now_ms)
        old_partition, old_generation = self.partition, self.generation
        self.partition, self.generation = new_partition, number
        self._snapshot_bytes = new_partition.size_bytes
        old_partition.close(clean=False)
        shutil.rmtree(self.directory / _generation_name(old_generation), ignore_errors=True)
        _fsync_directory(self.directory)
        self.compactions += 1

    def _create_generation(self, number: int, live: Sequence[Entry], now_ms: int) -> PartitionLog:
        path = self.directory / _generation_name(number)
        shutil.rmtree(path, ignore_errors=True)  # a leftover of a crashed compaction
        marker = msgpack.packb({"generation": number, "created_ms": now_ms})
        partition = PartitionLog.open(path, self.config)
        try:
            partition.append(_build([(GENERATION_KEY, marker), *live], now_ms))
            # Hazard (compaction ordering): the new generation must be durable, and its directory
            # entry too, before the old generation is deleted.
            partition.flush()
            _fsync_directory(self.directory)
        except BaseException:
            partition.close(clean=False)
            raise
        return partition

    def close(self, clean: bool = True) -> None:
        if self.partition is not None:
            self.partition.close(clean=clean)


def _generation_name(number: int) -> str:
    return f"{GENERATION_PREFIX}{number:020d}"


def _build(entries: Sequence[Entry], now_ms: int) -> bytes:
    body = records.encode_body([[0, key, value, None] for key, value in entries])
    return batch.build_batch(body, record_count=len(entries), first_timestamp_ms=now_ms,
                             max_timestamp_ms=now_ms)


def _decode_batches(view: memoryview) -> Iterator[Entry]:
    pos = 0
    end = len(view)
    while pos < end:
        header = batch.read_header(view, pos)
        body = view[pos + batch.HEADER_SIZE : pos + header.size]
        try:
            decoded = records.decode_body(body, header.codec)
        except records.RecordDecodeError as error:
            raise JournalCorruptError(f"journal batch at offset {header.base_offset}: {error}"
                                      ) from error
        finally:
            body.release()
        for record in decoded:
            key = record[1]
            if key != GENERATION_KEY:
                yield bytes(key), (None if record[2] is None else bytes(record[2]))
        pos += header.size


def _first_batch_size(partition: PartitionLog) -> int | None:
    """Size of the generation's first batch if it is a valid snapshot batch, else None."""
    if partition.end_offset == partition.start_offset:
        return None
    fetched = partition.read(partition.start_offset, 1)
    view = fetched.views[0]
    try:
        header = batch.read_header(view, 0)
        body = view[batch.HEADER_SIZE : header.size]
        try:
            decoded = records.decode_body(body, header.codec)
        except records.RecordDecodeError:
            return None
        finally:
            body.release()
        if not decoded or decoded[0][1] != GENERATION_KEY:
            return None
        return header.size
    finally:
        for v in fetched.views:
            v.release()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
