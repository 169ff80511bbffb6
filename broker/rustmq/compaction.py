"""Key-based compaction of a partition: keep the latest record per key in the sealed segments.

Storage treats batch bodies as opaque and may not import msgpack, so the part that has to read
records lives here, between the wire format (`rustmq.protocol.records`) and the storage engine:
`Plan` decodes the sealed segments and decides the survivors, then streams the new batches
into storage's `PartitionLog.write_compacted`, which writes them to new segment files as they
come; `PartitionLog.install_compacted` swaps those in crash-safely (docs/storage.md). Memory is
the key map plus one batch, never the rewritten log. The broker runs `prepare` and `install` on
the log's owner thread and `Job.write` (decode, decide, write files) on a worker thread, since
sealed segments never change; `compact` does all of it in one call.

Rules (docs/semantics.md, "Key-based compaction"):

* Only sealed, durable segments are compacted, never the active one, and "latest" means latest
  within them: a key whose newest record sits in the active segment keeps its newest sealed
  record too until that segment is sealed and compacted.
* A record with a key survives if no later record in the sealed segments has the same key.
* A tombstone (a keyed record whose value is None) survives like any record until its timestamp
  is older than `delete_retention_ms`; then it is dropped (so consumers that read slowly still
  see the delete for that long).
* Records without a key are always kept: there is nothing to compact them against.
* Offsets never change. A batch holds consecutive offsets (base_offset + index), so the
  survivors of one source batch become one new batch per run of consecutive offsets; the gaps
  between batches are the compacted records. A batch that survives whole keeps its body bytes
  (compressed as it was) and only gets a new header. New batches keep the source batch's codec.
* Rewritten batches carry no producer id (-1): their sequence numbers no longer describe a
  contiguous run, so the idempotent-producer state rebuilt from the log skips them (an unknown
  producer is accepted at any sequence; see docs/semantics.md).
* A batch whose body does not decode (not our record format) is kept unchanged.

Cost: the key map holds one entry per distinct key of the sealed segments, and every pass
decodes the sealed segments twice (keys and counts first, then the survivors while writing)
and rewrites them all. The
broker compacts a partition only when new sealed segments appeared or a kept tombstone expired
since its last pass (`CompactionState`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from rustmq.protocol import batch, records
from rustmq.storage import errors as storage_errors
from rustmq.storage.partition import (
    CompactedSegments,
    PartitionLog,
    ReplaceResult,
    SealedSegment,
)

log = logging.getLogger("rustmq.compaction")


@dataclasses.dataclass
class CompactionState:
    """Per-partition memory between passes (in the broker process only; a restart recompacts)."""

    cleaned_until: int = -1  # end offset of the sealed range the last pass covered
    next_tombstone_expiry_ms: int | None = None

    def due(self, sealed_end: int, now_ms: int) -> bool:
        if sealed_end > self.cleaned_until:
            return True
        expiry = self.next_tombstone_expiry_ms
        return expiry is not None and now_ms >= expiry


class Compacted(NamedTuple):
    partition: str
    replace: ReplaceResult
    records_before: int
    records_after: int
    tombstones_removed: int


def _batches(view: memoryview) -> Iterator[tuple[batch.BatchHeader, memoryview]]:
    for position, header in batch.iter_batches(view):
        yield header, view[position + batch.HEADER_SIZE : position + header.size]


def _decode(header: batch.BatchHeader, body: memoryview) -> tuple[Any, ...] | None:
    try:
        entries = records.decode_body(body, header.attributes & records.CODEC_MASK)
    except records.RecordDecodeError:
        return None
    if len(entries) != header.record_count:
        return None
    return entries


def _stamped(raw: bytes, base_offset: int) -> bytes:
    out = bytearray(raw)
    batch.stamp_batch(out, 0, base_offset)
    return bytes(out)


def _whole(header: batch.BatchHeader, body: memoryview) -> bytes:
    """The batch as stored (header re-packed from its fields, body as is)."""
    return batch.HEADER_STRUCT.pack(*header) + bytes(body)


def _runs(indexes: list[int]) -> Iterator[list[int]]:
    run: list[int] = []
    for index in indexes:
        if run and index != run[-1] + 1:
            yield run
            run = []
        run.append(index)
    if run:
        yield run


class Plan:
    """The compaction of `sealed` (the leading sealed segments of a partition) at `now_ms`.

    Construction reads every record once (the key map, the counts and whether anything changes
    at all); `batches()` reads them again and yields the new stamped batches in offset order.
    """

    def __init__(self, sealed: Sequence[SealedSegment], now_ms: int, delete_retention_ms: int
                 ) -> None:
        self.sealed = sealed
        self.tombstone_limit_ms = now_ms - delete_retention_ms
        # key -> (offset of its latest record, that record's timestamp if it is a tombstone)
        latest: dict[bytes, tuple[int, int | None]] = {}
        keyed = records_before = 0
        with_producer_ids = False
        for segment in sealed:
            for header, body in _batches(segment.view):
                records_before += header.record_count
                with_producer_ids = with_producer_ids or header.producer_id >= 0
                entries = _decode(header, body)
                if entries is None:
                    continue
                base, first_ts = header.base_offset, header.first_timestamp_ms
                for index, entry in enumerate(entries):
                    key = entry[1]
                    if key is not None:
                        keyed += 1
                        latest[key] = (base + index,
                                       first_ts + entry[0] if entry[2] is None else None)
        expired = 0
        next_expiry: int | None = None
        for _, tombstone_ms in latest.values():
            if tombstone_ms is None:
                continue
            if tombstone_ms < self.tombstone_limit_ms:
                expired += 1
            else:
                expiry = tombstone_ms + delete_retention_ms + 1
                next_expiry = expiry if next_expiry is None else min(next_expiry, expiry)
        self.latest = latest
        self.records_before = records_before
        self.records_after = records_before - (keyed - len(latest)) - expired
        self.tombstones_removed = expired
        self.next_tombstone_expiry_ms = next_expiry
        self.changed = self.records_after < records_before or with_producer_ids

    def batches(self) -> Iterator[bytes]:
        """The surviving records as stamped batches, one per run of consecutive offsets."""
        latest, limit = self.latest, self.tombstone_limit_ms
        for segment in self.sealed:
            for header, body in _batches(segment.view):
                entries = _decode(header, body)
                if entries is None:
                    log.warning("compaction keeps undecodable batch at offset %d", header.base_offset)
                    yield _whole(header, body)
                    continue
                base, first_ts = header.base_offset, header.first_timestamp_ms
                keep: list[int] = []
                for index, entry in enumerate(entries):
                    key = entry[1]
                    if key is not None:
                        offset, tombstone_ms = latest[key]
                        if offset != base + index:
                            continue  # superseded
                        if tombstone_ms is not None and tombstone_ms < limit:
                            continue  # an expired tombstone
                    keep.append(index)
                if len(keep) == header.record_count:
                    if header.producer_id < 0:
                        yield _whole(header, body)  # already stamped; the CRC still holds
                    else:  # the producer id goes (see the module docstring)
                        yield _stamped(batch.build_batch(
                            body, record_count=header.record_count,
                            first_timestamp_ms=header.first_timestamp_ms,
                            max_timestamp_ms=header.max_timestamp_ms,
                            codec=batch.Codec(header.codec)), base)
                    continue
                codec = header.attributes & records.CODEC_MASK
                for run in _runs(keep):
                    kept = [entries[index] for index in run]
                    timestamps = [first_ts + entry[0] for entry in kept]
                    run_first_ts = timestamps[0]
                    rebased = [(ts - run_first_ts, entry[1], entry[2], entry[3])
                               for ts, entry in zip(timestamps, kept, strict=False)]
                    raw = batch.build_batch(
                        records.encode_body(rebased, codec), record_count=len(run),
                        first_timestamp_ms=run_first_ts, max_timestamp_ms=max(timestamps),
                        codec=batch.Codec(codec))
                    yield _stamped(raw, base + run[0])


class Job(NamedTuple):
    """A due compaction of one partition: the sealed segments it covers (views held)."""

    partition: PartitionLog
    name: str
    sealed: list[SealedSegment]
    now_ms: int

    def write(self) -> tuple[Plan, CompactedSegments | None]:
        """Decide and write the new segment files (None: nothing would change). Touches only
        immutable views and new files, so it may run on a worker thread."""
        decided = Plan(self.sealed, self.now_ms, self.partition.config.delete_retention_ms)
        if not decided.changed:
            return decided, None
        return decided, self.partition.write_compacted(self.sealed, decided.batches())

    def release(self) -> None:
        for segment in self.sealed:
            segment.view.release()


def prepare(partition: PartitionLog, now_ms: int, state: CompactionState, name: str = ""
            ) -> Job | None:
    """The compaction job for `partition` if one is due (release it when done), else None."""
    sealed = partition.sealed_segments()
    if sealed and state.due(sealed[-1].next_offset, now_ms):
        return Job(partition, name or str(partition.directory), sealed, now_ms)
    for segment in sealed:
        segment.view.release()
    return None


def install(job: Job, decided: Plan, written: CompactedSegments | None, state: CompactionState
            ) -> Compacted | None:
    """Swap the written segments in (on the partition's owner thread); None if nothing changed.

    A StaleCompactionError (retention or another swap moved the segments meanwhile) is not an
    error: the written files are discarded and the next pass plans again.
    """
    state.cleaned_until = job.sealed[-1].next_offset
    state.next_tombstone_expiry_ms = decided.next_tombstone_expiry_ms
    if written is None:
        return None
    try:
        replaced = job.partition.install_compacted(written)
    except storage_errors.StaleCompactionError:
        state.cleaned_until = -1
        return None
    result = Compacted(job.name, replaced, decided.records_before, decided.records_after,
                       decided.tombstones_removed)
    log.info("compacted %s: %d segment(s) of %d bytes -> %d of %d bytes, records %d -> %d, "
             "%d tombstone(s) removed; log starts at %d", result.partition,
             replaced.replaced_segments, replaced.bytes_before, replaced.new_segments,
             replaced.bytes_after, decided.records_before, decided.records_after,
             decided.tombstones_removed, replaced.start_offset)
    return result


def compact(partition: PartitionLog, now_ms: int, state: CompactionState | None = None,
            name: str = "") -> Compacted | None:
    """Compact one partition now if due, all on the calling (owner) thread."""
    state = state if state is not None else CompactionState()
    job = prepare(partition, now_ms, state, name)
    if job is None:
        return None
    try:
        decided, written = job.write()
        return install(job, decided, written, state)
    finally:
        job.release()
