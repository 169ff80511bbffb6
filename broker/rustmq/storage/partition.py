"""PartitionLog: one partition's ordered segments, its append/read paths, flushing and recovery.

Directory layout (one directory per partition)::

    00000000000000000000.log / .index / .timeindex   segments, named by base offset (see segment)
    recovery-point      decimal offset R: every segment before the one holding R is sealed, fsynced
                        and has fsynced index files; an unclean start scans from there
    clean-shutdown      JSON {"end_offset", "active_base_offset", "active_size"} written by a clean
                        close after everything was flushed; removed (and the removal fsynced) on open
                        before anything can be appended, so it never vouches for newer data
    compaction-commit   JSON {"replaced": [base, ...], "outputs": [base, ...]}: present only while
                        `replace_sealed_segments` swaps compacted segments in (see there); an open
                        that finds it finishes the swap
    *.compacting        compacted segment files not yet swapped in; deleted on open unless a
                        compaction-commit names them

Threads. Everything except `flush` runs on ONE owner thread (the server's event loop): append,
read, roll, retention, close. `flush` may run concurrently on a worker thread (GroupCommitter or
the Log's background flusher); the ordering argument is spelled out at `append` and `flush`.
The segment list is mutated only under `_segments_lock`, which `flush` holds just long enough to
snapshot it and dup the fds it will sync, never across I/O.

A follower's truncation and restart (`begin_truncate`, `begin_restart`) do their file work
(deleting segments, zeroing the cut tail, fsyncs, the re-open's recovery scan) on a worker
thread (`Rebuild.run`) so the event loop never waits for it. Hazard: meanwhile the segments
are closed and the files change underneath, so the partition is *fenced*: append, read, roll,
epoch_starts and the other owner-thread operations raise PartitionBusyError (retriable),
retention and `delete_before` delete nothing, `flush` syncs nothing (the rebuild fsyncs what
it writes) and `close` waits for the rebuild. `finish_rebuild` (owner thread) then adopts the
re-opened state in one step: no reader ever sees a half-truncated log.

Appends take batches already validated by `batch.scan_batches` (the server does that per
produce), re-walk their framing per batch (cheap, no CRC) and write them into the active segment
with one pwritev, each batch's broker-owned prefix (base_offset, length, leader_epoch) freshly
stamped and the rest taken from the caller's buffer; nothing is re-encoded and the CRC'd bytes
are copied once, by the kernel. Reads return memoryview slices of the maps, one per segment
touched, never copies.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

from rustmq.protocol import batch
from rustmq.storage import errors
from rustmq.storage.config import MAX_SEGMENT_BYTES, LogConfig
from rustmq.storage.segment import (
    COMPACTED_SUFFIX,
    INDEX_SUFFIX,
    LOG_SUFFIX,
    MAX_RELATIVE_OFFSET,
    SEGMENT_SUFFIXES,
    TIME_INDEX_SUFFIX,
    ScanResult,
    Segment,
    _write_fully,
    file_name,
    load_trusted,
    parse_base_offset,
    scan_file,
)

logger = logging.getLogger("rustmq.storage")

CLEAN_SHUTDOWN_FILE: Final = "clean-shutdown"
RECOVERY_POINT_FILE: Final = "recovery-point"
COMPACTION_COMMIT_FILE: Final = "compaction-commit"
COMPACTING_SUFFIX: Final = ".compacting"
_WRITE_CHUNK: Final = 1 << 20  # compaction output is written in pwritev calls of about this size
MAX_OFFSET: Final = (1 << 63) - 1
_HEADER = batch.HEADER_STRUCT


class AppendResult(NamedTuple):
    base_offset: int  # offset stamped into the first batch
    last_offset: int  # offset of the last record appended
    size_bytes: int


class FetchSlice(NamedTuple):
    views: list[memoryview]  # whole batches, zero copy; release them when sent
    next_offset: int  # the offset to fetch next
    size_bytes: int


class RecoveryReport(NamedTuple):
    """What `PartitionLog.open` did to get to a consistent log."""

    clean_shutdown: bool  # a valid clean-shutdown marker let it skip the scan
    recovery_point: int
    scanned_segments: int
    scanned_bytes: int
    scanned_batches: int
    truncated_segment: str | None  # the segment file cut at the first invalid batch
    truncated_position: int | None  # byte position of that cut within the segment
    truncated_at_offset: int | None  # end offset of the log after the cut, if anything was cut
    removed_segments: tuple[str, ...]  # later segment files deleted because of the cut
    reason: str | None  # why the scan stopped early
    duration_s: float


class SealedSegment(NamedTuple):
    """A sealed, durable segment as `sealed_segments` hands it to a compaction planner."""

    base_offset: int
    next_offset: int  # the next segment's base: the segment covers [base_offset, next_offset)
    view: memoryview  # its batches, zero copy; release it when done
    compacted: bool


class ReplaceResult(NamedTuple):
    replaced_segments: int
    new_segments: int
    bytes_before: int
    bytes_after: int
    start_offset: int  # the log's start offset afterwards


class PartitionLog:
    """A partition's log. Create with `PartitionLog.open`; see the module docstring for threads."""

    def __init__(self, directory: Path, config: LogConfig) -> None:
        self.directory = directory
        self.config = config
        self.recovery: RecoveryReport | None = None
        self._segments: list[Segment] = []
        self._bases: list[int] = []
        self._active: Segment = None  # type: ignore[assignment]
        self._end_offset = 0
        self._durable_offset = 0
        self._recovery_point = 0
        self._size_bytes = 0
        self._appended_bytes = 0  # monotonic, for the "bytes" flush policy
        self._flushed_appended_bytes = 0
        self._seal_generation = 0
        self._flushed_seal_generation = 0
        self._last_flush_monotonic = time.monotonic()
        self._retired: list[tuple[Segment, Any]] = []  # (sealed segment, its old full-size map)
        self._segments_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._failure: errors.StorageError | None = None
        self._closed = False  # no append, read or flush is accepted any more (owner thread)
        self._rebuild: Rebuild | None = None  # the partition is fenced while its files are rebuilt
        self._released = False  # fds and maps closed (close(), any thread after detach())
        self.flush_wakeup: Callable[[], None] | None = None  # set by a background flusher

    # ----------------------------------------------------------------------------- open/recover

    @classmethod
    def open(cls, directory: Path, config: LogConfig) -> PartitionLog:
        """Open (creating if needed) the partition in `directory`, recovering after an unclean stop.

        Raises StorageFullError/StorageIOError if the directory or a segment cannot be set up.
        """
        log = cls(Path(directory), config)
        try:
            log._open()
        except OSError as error:
            log._close_segments()
            raise errors.from_os_error(error, f"opening partition {directory}") from error
        except BaseException:
            log._close_segments()
            raise
        return log

    def _open(self) -> None:
        started = time.perf_counter()
        directory = self.directory
        make_directories(directory)
        _finish_compaction_commit(directory)
        bases: list[int] = []
        for entry in os.scandir(directory):
            if entry.name.endswith((".tmp", COMPACTING_SUFFIX)):
                os.unlink(entry.path)  # unfinished writes; an uncommitted compaction's outputs
            elif (base := parse_base_offset(entry.name)) is not None:
                bases.append(base)
        bases.sort()
        for entry in os.scandir(directory):  # index and compacted files whose segment is gone
            stem, _, suffix = entry.name.partition(".")
            if "." + suffix in (INDEX_SUFFIX, TIME_INDEX_SUFFIX, COMPACTED_SUFFIX) and stem.isdigit():
                if int(stem) not in bases:
                    os.unlink(entry.path)

        marker = _read_json(directory / CLEAN_SHUTDOWN_FILE)
        if marker is not None or (directory / CLEAN_SHUTDOWN_FILE).exists():
            # Hazard: drop the marker durably BEFORE anything new is appended, or a later crash
            # would be mistaken for a clean stop and skip the scan of unflushed data.
            (directory / CLEAN_SHUTDOWN_FILE).unlink()
            _fsync_directory(directory)
        clean = (
            marker is not None
            and bool(bases)
            and marker.get("active_base_offset") == bases[-1]
            and isinstance(marker.get("end_offset"), int)
        )
        recovery_point = _read_recovery_point(directory / RECOVERY_POINT_FILE)
        if clean:
            first_scanned = len(bases)  # none; the active one is trusted too
        else:
            first_scanned = max((i for i, b in enumerate(bases) if b <= recovery_point), default=0)

        scanned_segments = scanned_bytes = scanned_batches = 0
        truncated_at: int | None = None
        truncated_segment: str | None = None
        truncated_position: int | None = None
        reason: str | None = None
        removed: list[str] = []
        expected = bases[0] if bases else 0
        kept: list[tuple[int, int, int, ScanResult, bool, bool, bool]] = []  # base, fd, size, ...
        pending_fd = -1  # opened, not yet in `kept`
        try:
            for i, base in enumerate(bases):
                path = directory / f"{base:020d}{LOG_SUFFIX}"
                if reason is not None or base != expected:
                    if reason is None:
                        reason = f"segment {path.name} does not continue offset {expected}"
                        truncated_at = expected
                    removed.append(path.name)
                    _remove_segment_files(directory, base)
                    continue
                fd = pending_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                file_size = os.fstat(fd).st_size
                compacted_end = _read_compacted_end(directory, base)
                state = None
                trusted = i < first_scanned or (clean and i == len(bases) - 1)
                if trusted:
                    state = load_trusted(directory, base, fd, file_size)
                    if state is not None and compacted_end is not None:
                        if state.next_offset > compacted_end:
                            state = None
                        else:
                            state = state._replace(next_offset=compacted_end)
                    if state is not None and clean and i == len(bases) - 1:
                        # The active segment must end exactly where the marker says, followed by
                        # nothing but zeros; anything else and the scan decides.
                        tail = os.pread(fd, batch.LENGTH_FIELDS_SIZE, state.size)
                        if (
                            state.next_offset != marker["end_offset"]  # type: ignore[index]
                            or state.size != marker.get("active_size")  # type: ignore[union-attr]
                            or tail.strip(b"\0")
                        ):
                            state = None
                            clean = trusted = False
                index_loaded = state is not None
                if state is None:
                    state = scan_file(fd, file_size, base, self.config.index_interval_bytes,
                                      compacted_end)
                    scanned_segments += 1
                    scanned_bytes += state.size
                    scanned_batches += state.batch_count
                    if state.stop_reason is not None:
                        reason = state.stop_reason
                        truncated_segment, truncated_position = path.name, state.size
                        truncated_at = state.next_offset
                        if trusted:
                            logger.error("%s: data below the recovery point %d is damaged",
                                         directory, recovery_point)
                if state.size == 0 and i < len(bases) - 1 and reason is None:
                    os.close(fd)  # an empty segment in the middle holds nothing: drop it
                    pending_fd = -1
                    removed.append(path.name)
                    _remove_segment_files(directory, base)
                    continue
                kept.append((base, fd, file_size, state, trusted and index_loaded, trusted,
                             compacted_end is not None))
                pending_fd = -1
                expected = state.next_offset
            self._build(kept, clean, reason)
        except BaseException:
            if pending_fd >= 0:
                os.close(pending_fd)
            for _, fd, *_ in kept:
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            raise
        self._recovery_point = recovery_point if not clean else self._active.base_offset
        self.recovery = RecoveryReport(
            clean_shutdown=clean,
            recovery_point=recovery_point,
            scanned_segments=scanned_segments,
            scanned_bytes=scanned_bytes,
            scanned_batches=scanned_batches,
            truncated_segment=truncated_segment,
            truncated_position=truncated_position,
            truncated_at_offset=truncated_at,
            removed_segments=tuple(removed),
            reason=reason,
            duration_s=time.perf_counter() - started,
        )
        if reason is not None:
            logger.warning(
                "%s: recovery cut the log at offset %s: %s%s%s",
                directory, truncated_at, reason,
                f"; {truncated_segment} truncated at byte {truncated_position}"
                if truncated_segment else "",
                f"; segments removed: {', '.join(removed)}" if removed else "",
            )
        elif not clean and bases:
            logger.info(
                "%s: recovered after an unclean stop: scanned %d segment(s), %d batches, %d bytes "
                "from recovery point %d in %.3f s; nothing cut",
                directory, scanned_segments, scanned_batches, scanned_bytes, recovery_point,
                self.recovery.duration_s,
            )

    def _build(self, kept: list[tuple[int, int, int, ScanResult, bool, bool, bool]], clean: bool,
               reason: str | None) -> None:
        directory = self.directory
        if not kept:  # a new partition
            self._active = Segment.create(directory, 0, self.config.segment_bytes)
            self._segments = [self._active]
            self._bases = [self._active.base_offset]
            self._end_offset = self._durable_offset = self._active.base_offset
            return
        segments = self._segments  # filled as we go, so a failure half way closes what was built
        last = len(kept) - 1
        if kept[-1][6]:
            last += 1  # a compacted segment is never appended to: a new active one follows it
        for i, (base, fd, file_size, state, index_loaded, trusted, compacted) in enumerate(kept):
            if i < last:
                if file_size > state.size:
                    os.ftruncate(fd, state.size)  # not mapped yet: safe to trim
                segment = Segment(directory, base, fd, state.size, state, writable=False,
                                  dir_synced=True)
                segment.index_persisted = index_loaded
                segment.compacted = compacted
                if not index_loaded:
                    segment.pending_index_files = segment.index_files() if state.size else ()
            else:
                capacity = max(self.config.segment_bytes, state.size)
                if not clean:
                    # Hazard: zero everything after the last valid batch BEFORE mapping, so no
                    # stale or torn bytes can ever be read back as a batch after new appends.
                    os.ftruncate(fd, state.size)
                if os.fstat(fd).st_size < capacity:
                    os.ftruncate(fd, capacity)  # sparse; blocks are reserved as appends come
                if reason is not None:
                    os.fsync(fd)  # make the cut itself durable before appending after it
                segment = Segment(directory, base, fd, capacity, state, writable=True,
                                  dir_synced=True)
            kept[i] = (base, -1, file_size, state, index_loaded, trusted, compacted)  # fd owned
            segment.flushed_size = state.size if trusted or compacted else 0
            segments.append(segment)
        if last == len(kept):
            segments.append(Segment.create(directory, segments[-1].next_offset,
                                           self.config.segment_bytes))
        self._bases = [s.base_offset for s in segments]
        self._active = segments[-1]
        self._end_offset = self._active.next_offset
        self._size_bytes = sum(s.size for s in segments)
        self._durable_offset = self._durable_prefix(segments)
        if any(s.sealed and not s.index_persisted for s in segments):
            self._seal_generation += 1  # let a background flusher persist rebuilt indexes

    def _durable_prefix(self, segments: list[Segment]) -> int:
        for segment in segments:
            if segment.flushed_size < segment.size:
                return segment.base_offset
        return self._end_offset

    # ----------------------------------------------------------------------------- properties

    @property
    def start_offset(self) -> int:
        return self._bases[0]

    @property
    def end_offset(self) -> int:
        """The offset the next appended record will get."""
        return self._end_offset

    @property
    def durable_offset(self) -> int:
        """Every offset below this is on stable storage (fsync returned)."""
        return self._durable_offset

    @property
    def size_bytes(self) -> int:
        return self._size_bytes

    @property
    def active_base_offset(self) -> int:
        """The first offset of the active (last) segment."""
        return self._bases[-1]

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    @property
    def closed(self) -> bool:
        return self._closed

    # ----------------------------------------------------------------------------- append

    def append(self, batches: bytes | bytearray | memoryview,
               leader_epoch: int | None = batch.NO_LEADER_EPOCH) -> AppendResult:
        """Append whole, already validated batches; stamp their offsets; roll if needed.

        `leader_epoch` is stamped into each batch (-1: standalone); None keeps the epochs the
        batches carry (a follower appending its leader's batches at the same offsets).

        Raises CorruptBatchError on broken framing, BatchTooLargeError above MAX_SEGMENT_BYTES,
        StorageFullError/StorageIOError if a new segment cannot be created (nothing is appended
        then), LogClosedError after close or after a failed fsync.
        """
        if self._closed or self._failure is not None:
            raise self._closed_error()
        if self._rebuild is not None:
            raise self._busy_error()
        view = memoryview(batches)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        size = len(view)
        headers, record_count = _frame(view)
        if size > MAX_SEGMENT_BYTES:
            raise errors.BatchTooLargeError(
                f"append of {size} bytes exceeds the largest segment ({MAX_SEGMENT_BYTES} bytes)"
            )
        base_offset = self._end_offset
        if base_offset + record_count > MAX_OFFSET:
            raise errors.StorageError("the partition ran out of 63-bit offsets")
        segment = self._active
        if segment.size == 0:
            if size > segment.capacity:
                segment.grow(size)
        elif (
            segment.size + size > segment.capacity
            or base_offset + record_count - 1 - segment.base_offset > MAX_RELATIVE_OFFSET
            or self._segment_too_old(segment)
        ):
            segment = self._roll(size)
        # StorageFullError here leaves everything as it was: nothing written, still writable.
        segment.reserve(segment.size + size)
        try:
            segment.append(view, headers, base_offset, self.config.index_interval_bytes, leader_epoch)
        except OSError as error:
            # A failed write may have left part of the batches past the end: refuse further
            # writes until a restart, whose recovery scan decides what is valid.
            self._failure = errors.from_os_error(error, f"writing to {segment.path}")
            logger.error("%s: %s; the partition refuses writes until restarted",
                         self.directory, self._failure)
            raise self._failure from error
        # Hazard (flush ordering): publish the end offset only after the bytes and the stamps are
        # in the map and segment.size moved; flush() reads _end_offset first, sizes second.
        self._end_offset = base_offset + record_count
        self._size_bytes += size
        before = self._appended_bytes - self._flushed_appended_bytes
        self._appended_bytes += size
        if (
            self.flush_wakeup is not None
            and self.config.flush.mode == "bytes"
            and before < self.config.flush.bytes <= before + size
        ):
            self.flush_wakeup()
        return AppendResult(base_offset, base_offset + record_count - 1, size)

    def _segment_too_old(self, segment: Segment) -> bool:
        limit = self.config.segment_ms
        if limit is None or segment.rolling_base_ms is None:
            return False
        return time.time_ns() // 1_000_000 - segment.rolling_base_ms >= limit

    def _roll(self, needed: int) -> Segment:
        old = self._active
        new = Segment.create(self.directory, self._end_offset,
                             max(self.config.segment_bytes, needed), reserve=needed)
        try:
            retired = old.seal()
        except (OSError, ValueError) as error:
            new.delete()
            raise errors.StorageIOError(f"sealing segment {old.path}: {error}") from error
        with self._segments_lock:
            self._segments.append(new)
        self._bases.append(new.base_offset)
        self._active = new
        if retired is not None:
            self._retired.append((old, retired))
        self._reap()
        self._seal_generation += 1
        if self.flush_wakeup is not None:
            self.flush_wakeup()
        return new

    def _reap(self) -> None:
        """Unmap retired full-size maps whose readers are gone, then trim their segments."""
        still_exported = []
        for segment, old_map in self._retired:
            try:
                old_map.close()
            except BufferError:
                still_exported.append((segment, old_map))
                continue
            segment.trim()
        self._retired = still_exported

    # ----------------------------------------------------------------------------- read

    def read(self, offset: int, max_bytes: int) -> FetchSlice:
        """Whole batches from the one holding `offset`, up to `max_bytes` (at least one batch).

        Zero copy: one memoryview per segment touched. Views stay valid while held, even if the
        segment is sealed or deleted meanwhile (see segment's module docstring). Raises
        OffsetOutOfRangeError outside [start_offset, end_offset].
        """
        if self._closed:
            raise self._closed_error()
        if self._rebuild is not None:
            raise self._busy_error()
        end = self._end_offset
        if offset < self._bases[0] or offset > end:
            raise errors.OffsetOutOfRangeError(offset, self._bases[0], end)
        if offset == end:
            return FetchSlice([], offset, 0)
        segments = self._segments
        i = bisect.bisect_right(self._bases, offset) - 1
        views: list[memoryview] = []
        total = 0
        next_offset = offset
        while i < len(segments) and next_offset < end and total < max_bytes:
            segment = segments[i]
            if segment.compacted and segment.data_end_offset() <= next_offset < segment.next_offset:
                next_offset = segment.next_offset  # a gap compaction left at the segment's end
            elif next_offset < segment.next_offset:
                got = segment.read(next_offset, max_bytes - total, at_least_one=not views)
                if got is None:
                    break
                view, next_offset = got
                views.append(view)
                total += len(view)
            i += 1
        return FetchSlice(views, next_offset, total)

    def offset_for_timestamp(self, timestamp_ms: int) -> int | None:
        """First offset of the first batch whose max_timestamp_ms >= `timestamp_ms`, or None."""
        if self._rebuild is not None:
            raise self._busy_error()
        for segment in self._segments:
            found = segment.offset_for_timestamp(timestamp_ms)
            if found is not None:
                return found
        return None

    # ----------------------------------------------------------------------------- replication

    def epoch_starts(self) -> list[tuple[int, int]]:
        """(leader_epoch, first offset) at every epoch change in the log, oldest first.

        Walks the batch headers of every segment (one 57-byte header per batch, no payload), so
        cluster mode rebuilds its epoch cache from the log itself and it can never disagree
        with what is stored. Batches without an epoch (-1) start no entry.
        """
        if self._rebuild is not None:
            raise self._busy_error()
        starts: list[tuple[int, int]] = []
        last = batch.NO_LEADER_EPOCH
        for segment in list(self._segments):
            view = segment.view()
            try:
                for _, header in batch.iter_batches(view):
                    if header.leader_epoch > last:
                        starts.append((header.leader_epoch, header.base_offset))
                        last = header.leader_epoch
            finally:
                view.release()
        return starts

    def truncate_to(self, offset: int) -> int:
        """Remove every batch at and after the one holding `offset`; return the new end offset.
        All on the calling (owner) thread: `begin_truncate`, `Rebuild.run`, `finish_rebuild`."""
        rebuild = self.begin_truncate(offset)
        if rebuild is None:
            return self._end_offset
        rebuild.run()
        return self.finish_rebuild(rebuild)

    def begin_truncate(self, offset: int) -> Rebuild | None:
        """Fence the partition and return the file work of a truncation (None: nothing to cut).

        For a follower whose tail diverged from its new leader (KIP-101): the cut is at a batch
        boundary at or below `offset`. Implemented as a durable cut plus a re-open: the segments
        after the cut are deleted, the data bytes after the cut are overwritten with zeros and
        fsynced, the segment's index files are dropped and the recovery point moved before it,
        then the ordinary recovery scan rebuilds the state (it trims and re-sizes the sparse
        file) into a fresh object that `finish_rebuild` adopts. Run `Rebuild.run` on a worker
        thread (the file work blocks), then `finish_rebuild` on the owner thread; the partition
        is fenced in between (module docstring).
        Hazard: views of the cut range handed out before (a fetch response still queued in a
        transport) read zeros afterwards; only replication fetches can hold such views, since
        consumers never read above the high watermark and truncation never goes below it.
        """
        self._check_rebuildable()
        if offset >= self._end_offset:
            return None
        offset = max(offset, self._bases[0])
        i = bisect.bisect_right(self._bases, offset) - 1
        segment = self._segments[i]
        if segment.compacted:
            raise errors.StorageError("a compacted segment cannot be truncated")
        position = segment.position_of(offset) if offset < segment.next_offset else segment.size
        cut_base = segment.base_offset
        data_end = segment.size  # past it the file reads as zeros already (allocated or sparse)
        later = [s.base_offset for s in self._segments[i + 1:]]
        directory = self.directory

        def cut() -> None:
            for base in later:
                _remove_segment_files(directory, base)
            path = directory / file_name(cut_base, LOG_SUFFIX)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                size = min(os.fstat(fd).st_size, data_end)
                zeros = bytes(min(_WRITE_CHUNK, max(0, size - position)))
                at = position
                while at < size:
                    at += os.pwrite(fd, zeros[: size - at], at)
                os.fsync(fd)
            finally:
                os.close(fd)
            for suffix in (INDEX_SUFFIX, TIME_INDEX_SUFFIX):
                (directory / file_name(cut_base, suffix)).unlink(missing_ok=True)
            recovery_point = min(_read_recovery_point(directory / RECOVERY_POINT_FILE), cut_base)
            _write_durably(directory / RECOVERY_POINT_FILE, b"%d\n" % recovery_point)
            (directory / CLEAN_SHUTDOWN_FILE).unlink(missing_ok=True)

        rebuild = self._rebuild = Rebuild(self, cut, f"truncated to offset %d (asked {offset}) to follow a new leader")
        return rebuild

    def restart_at(self, offset: int, reuse_offsets: bool = False) -> int:
        """Drop every segment; the log goes on, empty, at `offset`. Returns the new end offset.
        All on the calling (owner) thread, like `truncate_to`."""
        rebuild = self.begin_restart(offset, reuse_offsets)
        rebuild.run()
        return self.finish_rebuild(rebuild)

    def begin_restart(self, offset: int, reuse_offsets: bool = False) -> Rebuild:
        """Fence the partition and return the file work of a restart at `offset` (as
        `begin_truncate`: run it on a worker thread, then `finish_rebuild`).

        For a follower whose leader no longer holds the offsets it lacks (retention removed them
        there): it cannot append them, so it starts over at the leader's log start (Kafka's
        truncate-fully-and-start-at). Only forward unless `reuse_offsets`: an offset below the
        current end is refused (StorageError), since readers could see one offset with two
        values; a replica that no longer belongs here (nothing reads it) is discarded with
        ``restart_at(0, reuse_offsets=True)``. The directory keeps one empty segment
        named by `offset`, which the recovery scan takes as the log's start.
        """
        self._check_rebuildable()
        if offset < 0 or (offset < self._end_offset and not reuse_offsets):
            raise errors.StorageError(f"cannot restart at {offset}, below the end offset {self._end_offset}")
        bases = list(self._bases)
        directory = self.directory

        def restart() -> None:
            # A crash in between leaves fewer segments or none: either way an empty log that
            # the follower's next fetch restarts again (nothing here was needed any more).
            (directory / CLEAN_SHUTDOWN_FILE).unlink(missing_ok=True)
            for base in bases:
                _remove_segment_files(directory, base)
            path = directory / file_name(offset, LOG_SUFFIX)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            _write_durably(directory / RECOVERY_POINT_FILE, b"%d\n" % offset)
            _fsync_directory(directory)

        rebuild = self._rebuild = Rebuild(self, restart, "restarted empty at offset %d")
        return rebuild

    def finish_rebuild(self, rebuild: Rebuild) -> int:
        """Owner thread, after `rebuild.run` returned: adopt the re-opened state (or, if the file
        work failed, refuse writes until a restart, as after a failed fsync) and lift the fence.
        Returns the new end offset. A rebuild that `close` already took over is left alone."""
        if self._rebuild is not rebuild:
            return self._end_offset
        if not rebuild.finished:
            raise errors.StorageError("finish_rebuild before the rebuild ran")
        self._adopt(rebuild)
        logger.warning("%s: " + rebuild.message, self.directory, self._end_offset)
        return self._end_offset

    def _adopt(self, rebuild: Rebuild) -> None:
        self._rebuild = None
        fresh = rebuild.fresh
        if fresh is None:
            error = rebuild.error
            self._failure = (errors.from_os_error(error, f"rebuilding partition {self.directory}")
                             if isinstance(error, OSError) else
                             error if isinstance(error, errors.StorageError) else
                             errors.StorageIOError(f"rebuilding partition {self.directory}: {error}"))
            logger.error("%s: %s; the partition refuses writes until restarted", self.directory, self._failure)
            raise self._failure
        # One step on the owner thread: every attribute but the locks (a flusher may be
        # waiting on them) and the flusher's wake-up.
        for name, value in vars(fresh).items():
            if name not in ("_flush_lock", "_segments_lock", "flush_wakeup"):
                setattr(self, name, value)

    def _check_rebuildable(self) -> None:
        if self._closed or self._failure is not None:
            raise self._closed_error()
        if self._rebuild is not None:
            raise self._busy_error()

    @property
    def busy(self) -> bool:
        """Fenced: its files are being rebuilt (module docstring)."""
        return self._rebuild is not None

    def _busy_error(self) -> errors.StorageError:
        return errors.PartitionBusyError(f"partition {self.directory} is being rebuilt (a follower's truncation); retry")

    # ----------------------------------------------------------------------------- flush

    def flush(self) -> int:
        """Block until everything appended so far is on stable storage; return durable_offset.

        Safe on a worker thread concurrently with append() on the owner thread. Ordering: the
        target is read from `_end_offset` BEFORE the segment sizes are snapshotted; append moves
        each segment's size before it publishes `_end_offset`, so the synced byte ranges cover
        every offset below the target. Appends are pwritev'd, so fdatasync on the segment fd is
        the whole story (and it releases the GIL while it waits). After a failed fsync the page
        cache state is unknown, so the partition refuses further writes (fsyncgate).
        """
        with self._flush_lock:
            if self._failure is not None:
                raise self._failure
            if self._closed:
                raise self._closed_error()
            if self._rebuild is not None:  # its segments are closed; the rebuild syncs its own work
                return self._durable_offset
            return self._flush_locked()

    def _flush_locked(self) -> int:
        target = self._end_offset  # Hazard: read before the sizes below (see the docstring).
        appended_bytes = self._appended_bytes
        seal_generation = self._seal_generation
        with self._segments_lock:
            segments = list(self._segments)
            work = [
                (segment, segment.size, os.dup(segment.fd))
                for segment in segments
                if segment.flushed_size < segment.size or not segment.dir_synced
            ]
        try:
            try:
                for _, _, fd in work:
                    os.fdatasync(fd)
            finally:
                for _, _, fd in work:
                    os.close(fd)
            sync_directory = any(not segment.dir_synced for segment, _, _ in work)
            for segment in segments:
                if segment.sealed and not segment.index_persisted and not segment.deleted:
                    try:
                        for path, data in segment.pending_index_files:
                            _write_durably(path, data, sync_directory=False)
                    except OSError as error:  # indexes are rebuildable: retry on the next flush
                        logger.warning("%s: could not write the indexes of %s: %s",
                                       self.directory, segment.path.name, error)
                        continue
                    segment.index_persisted = True
                    segment.pending_index_files = ()
                    sync_directory = True
            if sync_directory:
                _fsync_directory(self.directory)
        except OSError as error:
            self._failure = errors.from_os_error(error, f"flushing partition {self.directory}")
            logger.error("%s: %s; the partition refuses writes until restarted",
                         self.directory, self._failure)
            raise self._failure from error
        for segment, size, _ in work:
            segment.dir_synced = True
            if size > segment.flushed_size:
                segment.flushed_size = size
        if target > self._durable_offset:
            self._durable_offset = target
        self._flushed_appended_bytes = appended_bytes
        self._flushed_seal_generation = seal_generation
        self._last_flush_monotonic = time.monotonic()
        recovery_point = segments[-1].base_offset
        for segment in segments:
            if not (segment.sealed and segment.index_persisted and
                    segment.flushed_size >= segment.size):
                recovery_point = segment.base_offset
                break
        if recovery_point != self._recovery_point:
            try:
                _write_durably(self.directory / RECOVERY_POINT_FILE, b"%d\n" % recovery_point)
                self._recovery_point = recovery_point
            except OSError as error:  # only costs a longer scan after a crash
                logger.warning("%s: could not write the recovery point: %s", self.directory, error)
        return self._durable_offset

    def flush_due(self, now_monotonic: float) -> bool:
        """Whether the flush policy (or a freshly sealed segment) asks for a flush now."""
        if self._closed or self._failure is not None or self._rebuild is not None:
            return False
        if self._seal_generation != self._flushed_seal_generation:
            return True
        policy = self.config.flush
        unflushed = self._appended_bytes - self._flushed_appended_bytes
        if policy.mode == "bytes":
            return unflushed >= policy.bytes
        if policy.mode == "interval":
            return unflushed > 0 and (
                now_monotonic - self._last_flush_monotonic >= policy.interval_ms / 1000
            )
        return False

    # ----------------------------------------------------------------------------- retention

    def enforce_retention(self, now_ms: int, keep_from_offset: int | None = None) -> int:
        """Delete the oldest sealed segments beyond the time/size/count limits; return how many.

        Whole segments only, never the active one, and never a segment holding an offset at or
        above `keep_from_offset` (the "keep until consumed" floor the server computes from the
        named groups' commits; None: no floor). With cleanup_policy "compact" the limits do not
        apply and nothing is deleted here. Readers' views of a deleted segment stay valid (the
        unlinked file lives on until the last view is released).
        """
        if self._closed:
            raise self._closed_error()
        if self._rebuild is not None:
            return 0
        config = self.config
        deleted = 0
        while len(self._segments) > 1 and config.deletes:
            oldest, following = self._segments[0], self._segments[1]
            if keep_from_offset is not None and oldest.next_offset > keep_from_offset:
                break
            expired = (
                config.retention_ms is not None
                and oldest.max_timestamp_ms < now_ms - config.retention_ms
            )
            too_big = (
                config.retention_bytes is not None
                and self._size_bytes - oldest.size >= config.retention_bytes
            )
            too_many = (
                config.retention_messages is not None
                and self._end_offset - following.base_offset >= config.retention_messages
            )
            if not (expired or too_big or too_many):
                break
            self._delete_oldest()
            deleted += 1
        self._reap()
        if deleted:
            logger.info("%s: retention deleted %d segment(s); log now starts at offset %d",
                        self.directory, deleted, self._bases[0])
        return deleted

    def delete_before(self, offset: int) -> int:
        """Delete the oldest sealed segments that hold only offsets below `offset`; return how
        many. The log start moves to the first kept segment's base (at most `offset`). Whole
        segments only, never the active one, as retention does (views stay valid the same way).

        Cluster mode: a leader moves its log start to a coordination snapshot, a follower to its
        leader's log start, a leader to the deletion point of a retention hold (docs/cluster.md).
        """
        if self._closed:
            raise self._closed_error()
        if self._rebuild is not None:
            return 0
        deleted = 0
        while len(self._segments) > 1 and self._segments[0].next_offset <= offset:
            self._delete_oldest()
            deleted += 1
        self._reap()
        return deleted

    def _delete_oldest(self) -> None:
        oldest = self._segments[0]
        with self._segments_lock:
            self._segments.pop(0)
        self._bases.pop(0)
        self._size_bytes -= oldest.size
        oldest.delete()

    def roll(self) -> None:
        """Seal the active segment now (if it holds anything): the next append starts a segment,
        so its first offset can become the log start by `delete_before`."""
        self._check_rebuildable()
        if self._active.size:
            self._roll(0)

    # ----------------------------------------------------------------------------- compaction

    def sealed_segments(self) -> list[SealedSegment]:
        """The leading run of sealed segments that are durable and have persisted indexes.

        That is what compaction may rewrite: the active segment never, nor a sealed one the
        flusher has yet to persist (it would write its index files under the same names).
        The views are zero copy and stay valid after a swap; release them when done.
        """
        if self._closed:
            raise self._closed_error()
        if self._rebuild is not None:
            return []
        result = []
        for segment in self._segments[:-1]:
            if not (segment.sealed and segment.index_persisted and not segment.deleted
                    and segment.flushed_size >= segment.size):
                break
            result.append(SealedSegment(segment.base_offset, segment.next_offset, segment.view(),
                                        segment.compacted))
        return result

    def replace_sealed_segments(self, replaced: Sequence[SealedSegment],
                                batches: Iterable[bytes | memoryview]) -> ReplaceResult:
        """`write_compacted` then `install_compacted`, both on the calling (owner) thread."""
        return self.install_compacted(self.write_compacted(replaced, batches))

    def write_compacted(self, replaced: Sequence[SealedSegment],
                        batches: Iterable[bytes | memoryview]) -> CompactedSegments:
        """Step 1 of a compaction swap: write the new segments for `replaced` under `.compacting`.

        `batches` are stamped batches in offset order, each holding consecutive offsets, gaps
        allowed between them, all within [first replaced base, end of the last replaced
        segment). They are consumed one at a time and written straight to files, new segments
        started at `segment_bytes` (or when 32-bit relative offsets would overflow). A new
        segment starts at its first batch and ends where the next one starts (the last one at
        the end of `replaced`), so the offset chain stays unbroken. Every file is fsynced and
        re-scanned (CRC, offsets) before use, then the directory is fsynced.

        Touches only new files, so it may run on a worker thread while the owner thread keeps
        appending and reading. Pass the result to `install_compacted` (owner thread) or
        `discard` it. Raises CorruptBatchError for batches that break these rules,
        StorageFullError/StorageIOError on I/O errors (nothing is left behind then).
        """
        if not replaced:
            raise errors.StaleCompactionError("nothing to replace")
        writer = _CompactedWriter(self.directory, self.config, replaced)
        try:
            for data in batches:
                writer.add(data)
            return writer.finish()
        except BaseException as error:
            writer.abort()
            if isinstance(error, OSError):
                raise errors.from_os_error(
                    error, f"writing compacted segments in {self.directory}") from error
            raise

    def install_compacted(self, prepared: CompactedSegments) -> ReplaceResult:
        """Steps 2 and 3 of a compaction swap (owner thread): commit, rename, switch segments.

        Order on disk (each step durable before the next):

        1. (`write_compacted`) each output as `<base>.log.compacting` plus `.index`,
           `.timeindex` and `.compacted` files under the same suffix, fsynced; directory fsynced;
        2. `compaction-commit` naming replaced and output bases, written atomically: the commit
           point. A crash before it leaves the old segments untouched and the next open deletes
           the `.compacting` files;
        3. replaced segments no output reuses are unlinked, the `.compacting` files renamed over
           the final names, the directory fsynced, the commit file removed. A crash in this step
           is finished by the next open (`_finish_compaction_commit`, idempotent).

        Readers' views of the old segments stay valid (their inodes live while mapped). Raises
        StaleCompactionError (and discards `prepared`) if its replaced segments are no longer
        the leading run of sealed durable segments, e.g. because retention deleted some.
        """
        replaced = prepared.replaced
        if self._closed or self._failure is not None:
            prepared.discard()
            raise self._closed_error()
        segments = self._segments
        count = len(replaced)
        if count >= len(segments) or any(
            current.base_offset != old.base_offset or current.next_offset != old.next_offset
            or not current.sealed or not current.index_persisted or current.deleted
            for current, old in zip(segments, replaced, strict=False)
        ):
            prepared.discard()
            raise errors.StaleCompactionError(
                f"{self.directory}: the compaction plan no longer matches the segments")
        directory = self.directory
        created = prepared.segments
        old = segments[:count]
        with self._flush_lock:  # no flush may snapshot the segment list half way through
            try:
                commit = {"replaced": [s.base_offset for s in old],
                          "outputs": [s.base_offset for s in created]}
                _write_durably(directory / COMPACTION_COMMIT_FILE, json.dumps(commit).encode())
            except OSError as error:
                prepared.discard()
                raise errors.from_os_error(error, f"committing compaction in {directory}") from error
            # Hazard: from here on the swap is decided; if finishing it fails, the next open
            # finishes it, and until then this partition refuses writes.
            try:
                _finish_compaction_commit(directory)
            except (OSError, errors.StorageError) as error:
                self._failure = (error if isinstance(error, errors.StorageError) else
                                 errors.from_os_error(error, f"swapping segments in {directory}"))
                logger.error("%s: %s; the partition refuses writes until restarted",
                             directory, self._failure)
                for segment in created:
                    segment.close()
                raise self._failure from error
            with self._segments_lock:
                self._segments = created + segments[count:]
            self._bases = [s.base_offset for s in self._segments]
            bytes_before = sum(s.size for s in old)
            bytes_after = sum(s.size for s in created)
            self._size_bytes += bytes_after - bytes_before
            for segment in old:
                segment.deleted = True  # Hazard: close, never delete(): outputs reuse the names
                segment.close()
        self._reap()
        return ReplaceResult(count, len(created), bytes_before, bytes_after, self._bases[0])

    # ----------------------------------------------------------------------------- close

    def close(self, clean: bool = True) -> None:
        """Close the partition. `clean`: flush everything, persist indexes and write the marker.

        With clean=False nothing is flushed (the next open recovers as after a crash).
        Owner thread, or any thread once `detach` ran on the owner thread.
        """
        if self._released:
            return
        rebuild = self._rebuild
        if rebuild is not None:  # a rebuild on a worker thread: wait for it and take it over
            rebuild.done.wait()
            try:
                self._adopt(rebuild)
            except errors.StorageError:
                clean = False
        with self._flush_lock:
            if clean and self._failure is None:
                try:
                    self._flush_locked()
                    active = self._active
                    if active.size:
                        for path, data in active.index_files():
                            _write_durably(path, data, sync_directory=False)
                    _write_durably(self.directory / RECOVERY_POINT_FILE,
                                   b"%d\n" % active.base_offset, sync_directory=False)
                    marker = {
                        "end_offset": self._end_offset,
                        "active_base_offset": active.base_offset,
                        "active_size": active.size,
                    }
                    _write_durably(self.directory / CLEAN_SHUTDOWN_FILE,
                                   json.dumps(marker).encode(), sync_directory=False)
                    _fsync_directory(self.directory)
                except (OSError, errors.StorageError) as error:
                    clean = False
                    logger.error("%s: clean shutdown failed (%s); the next start will recover",
                                 self.directory, error)
            self._closed = self._released = True
            active = self._active
            unmapped = self._close_segments()
            if clean and unmapped:
                try:
                    os.truncate(active.path, active.size)  # give back the reserved tail
                except OSError:
                    pass

    def detach(self) -> None:
        """Refuse every later append, read and flush (LogClosedError), so that `close` may then
        run on another thread: call it on the owner thread, which is the only one that appends
        and reads (views already handed out stay valid)."""
        self._closed = True

    def _close_segments(self) -> bool:
        with self._segments_lock:
            segments, self._segments = self._segments, []
        unmapped = True
        for segment in segments:
            unmapped = segment.close() and unmapped
        self._reap()
        return unmapped

    def _closed_error(self) -> errors.StorageError:
        if self._failure is not None:
            return errors.LogClosedError(
                f"partition {self.directory} stopped accepting writes after: {self._failure}"
            )
        return errors.LogClosedError(f"partition {self.directory} is closed")

    def __repr__(self) -> str:
        return (f"PartitionLog({str(self.directory)!r}, offsets [{self.start_offset}, "
                f"{self._end_offset}), durable {self._durable_offset})")


class Rebuild:
    """The file work of a truncation or restart (`PartitionLog.begin_truncate`/`begin_restart`).

    `run` (any thread; once) closes the partition's segments, does the work under the flush
    lock and re-opens the directory into a fresh PartitionLog, or records the error; then the
    owner thread calls `PartitionLog.finish_rebuild`."""

    def __init__(self, plog: PartitionLog, work: Callable[[], None], message: str) -> None:
        self.plog = plog
        self.work = work
        self.message = message  # logged with the new end offset
        self.fresh: PartitionLog | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    @property
    def finished(self) -> bool:
        return self.done.is_set()

    def run(self) -> None:
        plog = self.plog
        try:
            with plog._flush_lock:
                plog._close_segments()
                self.work()
                self.fresh = PartitionLog.open(plog.directory, plog.config)
        except BaseException as error:  # noqa: BLE001 - handed to the owner thread
            self.error = error
        finally:
            self.done.set()


class CompactedSegments:
    """New segments written by `write_compacted`, not yet installed (files under .compacting)."""

    def __init__(self, replaced: Sequence[SealedSegment], segments: list[Segment],
                 pending: list[Path]) -> None:
        self.replaced = list(replaced)
        self.segments = segments
        self.pending = pending

    def discard(self) -> None:
        """Close and delete the new segments (safe to call more than once)."""
        for segment in self.segments:
            segment.close()
        for path in self.pending:
            path.unlink(missing_ok=True)
        self.segments, self.pending = [], []


class _CompactedWriter:
    """Writes a stream of batches into new compacted segment files (see write_compacted)."""

    def __init__(self, directory: Path, config: LogConfig, replaced: Sequence[SealedSegment]
                 ) -> None:
        self.directory = directory
        self.config = config
        self.replaced = replaced
        self.range_start = replaced[0].base_offset
        self.range_end = replaced[-1].next_offset
        self.segments: list[Segment] = []
        self.pending: list[Path] = []
        self.fd = -1
        self.base = 0
        self.size = 0  # bytes of the current file, buffered ones included
        self.written = 0  # bytes of the current file already written
        self.buffered: list[bytes | memoryview] = []  # one pwritev per _WRITE_CHUNK bytes
        self.next_free = self.range_start  # offsets below this are taken by earlier batches

    def add(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        if len(view) < batch.HEADER_SIZE:
            raise errors.CorruptBatchError("truncated compacted batch")
        header = batch.BatchHeader._make(_HEADER.unpack_from(view))
        if header.size != len(view) or header.record_count < 1:
            raise errors.CorruptBatchError("a compacted batch must be one whole batch")
        if header.base_offset < self.next_free or header.last_offset >= self.range_end:
            raise errors.CorruptBatchError(
                f"compacted batch at {header.base_offset} does not fit in "
                f"[{self.next_free}, {self.range_end})")
        if self.fd >= 0 and (
            self.size + len(view) > self.config.segment_bytes
            or header.last_offset - self.base > MAX_RELATIVE_OFFSET
            or self.size + len(view) > MAX_SEGMENT_BYTES
        ):
            self._seal(header.base_offset)
        if self.fd < 0:
            self.base = header.base_offset
            self.size = 0
            path = self.directory / (file_name(self.base, LOG_SUFFIX) + COMPACTING_SUFFIX)
            self.pending.append(path)
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            self.written = 0
        self.buffered.append(view)
        self.size += len(view)
        if self.size - self.written >= _WRITE_CHUNK:
            self._write_buffered()
        self.next_free = header.last_offset + 1

    def _write_buffered(self) -> None:
        _write_fully(self.fd, self.buffered, self.written)
        self.written = self.size
        self.buffered = []

    def _seal(self, end: int) -> None:
        """Finish the current file as a segment covering [base, end)."""
        self._write_buffered()
        fd, self.fd = self.fd, -1
        try:
            os.fsync(fd)
            state = scan_file(fd, self.size, self.base, self.config.index_interval_bytes, end)
            if state.stop_reason is not None or state.size != self.size:
                raise errors.CorruptBatchError(
                    f"compacted segment {self.base}: {state.stop_reason or 'trailing bytes'}",
                    state.size)
            segment = Segment(self.directory, self.base, fd, self.size, state, writable=False,
                              dir_synced=True)
        except BaseException:
            os.close(fd)
            raise
        segment.compacted = True
        segment.flushed_size = self.size
        self.segments.append(segment)
        files = [*segment.index_files(),
                 (self.directory / file_name(self.base, COMPACTED_SUFFIX), b"%d\n" % end)]
        for final, data in files:
            temporary = final.with_name(final.name + COMPACTING_SUFFIX)
            self.pending.append(temporary)
            _write_durably(temporary, data, sync_directory=False)

    def finish(self) -> CompactedSegments:
        if self.fd >= 0:
            self._seal(self.range_end)
        _fsync_directory(self.directory)
        return CompactedSegments(self.replaced, self.segments, self.pending)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        CompactedSegments(self.replaced, self.segments, self.pending).discard()


def _frame(view: memoryview) -> tuple[list[tuple[int, int, int, int]], int]:
    """Per-batch (position, size, record_count, max_timestamp_ms) and the total record count."""
    end = len(view)
    if end == 0:
        raise errors.CorruptBatchError("no batch in an empty append", 0)
    headers = []
    records = 0
    position = 0
    minimum = batch.HEADER_SIZE - batch.LENGTH_FIELDS_SIZE
    while position < end:
        if end - position < batch.HEADER_SIZE:
            raise errors.CorruptBatchError("truncated header", position)
        header = _HEADER.unpack_from(view, position)
        length, count = header[1], header[6]
        size = batch.LENGTH_FIELDS_SIZE + length
        if length < minimum or size > end - position or count < 1 or header[3] != batch.MAGIC:
            raise errors.CorruptBatchError("invalid framing (scan_batches first)", position)
        headers.append((position, size, count, header[8]))
        records += count
        position += size
    return headers, records


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _read_recovery_point(path: Path) -> int:
    try:
        return max(0, int(path.read_bytes().strip()))
    except (OSError, ValueError):
        return 0


def _remove_segment_files(directory: Path, base: int) -> None:
    for suffix in SEGMENT_SUFFIXES:
        (directory / f"{base:020d}{suffix}").unlink(missing_ok=True)


def _read_compacted_end(directory: Path, base: int) -> int | None:
    """The end offset in a compacted segment's `.compacted` file; None for other segments."""
    try:
        data = (directory / f"{base:020d}{COMPACTED_SUFFIX}").read_bytes()
    except FileNotFoundError:
        return None
    try:
        end = int(data.strip())
    except ValueError:
        raise errors.StorageIOError(
            f"{directory}: {base:020d}{COMPACTED_SUFFIX} does not hold an offset"
        ) from None
    if end <= base:
        raise errors.StorageIOError(f"{directory}: {base:020d}{COMPACTED_SUFFIX} ends before it starts")
    return end


def _finish_compaction_commit(directory: Path) -> None:
    """Complete a swap `replace_sealed_segments` committed but may not have finished (idempotent).

    Removes the files of replaced segments that no output reuses, renames every remaining
    `<output>.*.compacting` file into place, fsyncs the directory, then removes the commit file.
    """
    commit = directory / COMPACTION_COMMIT_FILE
    try:
        plan = json.loads(commit.read_bytes())
        replaced = [int(base) for base in plan["replaced"]]
        outputs = [int(base) for base in plan["outputs"]]
    except FileNotFoundError:
        return
    except (OSError, ValueError, KeyError, TypeError) as error:
        # Written with _write_durably (temp file, fsync, rename): it is whole or absent.
        raise errors.StorageIOError(f"{commit}: unreadable compaction commit: {error}") from error
    reused = set(outputs)
    for base in replaced:
        if base not in reused:
            _remove_segment_files(directory, base)
    for base in outputs:
        for suffix in SEGMENT_SUFFIXES:
            final = directory / f"{base:020d}{suffix}"
            pending = final.with_name(final.name + COMPACTING_SUFFIX)
            if pending.exists():
                os.replace(pending, final)
            elif suffix == COMPACTED_SUFFIX or suffix == LOG_SUFFIX:
                if not final.exists():
                    raise errors.StorageIOError(f"{directory}: compaction output {final.name} is missing")
    _fsync_directory(directory)
    commit.unlink()
    _fsync_directory(directory)


def _write_durably(path: Path, data: bytes, sync_directory: bool = True) -> None:
    """Replace `path` atomically: write a temp file, fsync it, rename (and fsync the directory)."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    if sync_directory:
        _fsync_directory(path.parent)


def make_directories(directory: Path) -> None:
    """`mkdir -p` whose result survives a power loss: every directory it creates is named
    durably (its parent fsynced after the creation). Existing directories are left alone."""
    missing: list[Path] = []
    path = directory
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
        _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
