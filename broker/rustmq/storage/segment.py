"""One segment: a memory-mapped `.log` file of whole batches plus its two indexes.

Files, named by the segment's base offset (the offset of its first batch), 20 digits::

    00000000000000001000.log        batches back to back from position 0; the tail after the last
                                    batch reads as zeros (allocated ahead of the writes, or a hole
                                    of the sparse file; a zero batch_length ends a scan)
    00000000000000001000.index      sparse offset index  (see rustmq.storage.index)
    00000000000000001000.timeindex  sparse time index
    00000000000000001000.compacted  only for a segment written by compaction: its end offset
                                    (decimal, newline): the segment covers [base, end) with gaps

Compacted segments. Compaction (rustmq.compaction, installed by
`PartitionLog.replace_sealed_segments`) rewrites sealed segments so that each batch still holds
consecutive offsets (base_offset + index) but batches may be separated by gaps, the first batch
starts at the segment's base offset, and the segment ends at the offset in its `.compacted`
file (the next segment's base, past a possible trailing gap). Only a segment with that file may
have gaps: every other segment's scan still demands contiguous offsets, since base_offset is not
covered by the CRC and the sequence is what catches a damaged one.

Life cycle. `create` sizes the new file to its capacity with ftruncate (a sparse file: no
blocks yet) and maps it read-only; nothing reads the map past `size`, so no reader ever touches
a hole. Blocks are then allocated in bounded steps AHEAD of the write position (`reserve`,
posix_fallocate of the next PREALLOCATE_MIN_STEP .. PREALLOCATE_MAX_STEP bytes, doubling while
the segment is young), always before the bytes are written: a full disk is reported
(ENOSPC -> StorageFullError) before anything of an append is written, never half way through
it, and an empty partition holds no data blocks at all instead of a whole preallocated segment.
The next step is allocated by the process's segment-file thread (`_FileWork`) once the writes
reach the second half of the current one, so the appending thread (the broker's event loop)
does not wait for posix_fallocate; it allocates itself only when the writes outran that thread
or it failed (a full disk: then the append gets StorageFullError as before). The same thread
trims sealed segments (`trim`). Hazard: a segment settles its pending file work before closing
its fd (else the thread could act on a closed or reused descriptor).
The active segment is appended to with pwritev on its fd: the map shares the page cache the
writes fill, so readers' views see the bytes, and no store through a map can ever corrupt a
segment. Because the file's size is the capacity from the start, growing the allocation never
needs a new map (no remap, so no view of an old map to outlive). `seal` (on roll) swaps in a map
of exactly the used size and trims the file to it once the old capacity-sized map is unmapped.
Files are never truncated while a map that covers the cut range is alive, so no reader can touch
a page past end of file.

View lifetime. `read` hands out memoryview slices of the map (zero copy). `mmap.close()` raises
BufferError while any of them is alive, so closing is deferred: `close` releases our own view and
tries to unmap; if readers still hold slices, the map object simply stays referenced by them and
is unmapped by CPython when the last slice is released. The fd is ours alone and closes at once.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Final, NamedTuple

from rustmq.protocol import batch
from rustmq.storage import errors
from rustmq.storage.index import OffsetIndex, TimeIndex

LOG_SUFFIX: Final = ".log"
INDEX_SUFFIX: Final = ".index"
TIME_INDEX_SUFFIX: Final = ".timeindex"
COMPACTED_SUFFIX: Final = ".compacted"
SEGMENT_SUFFIXES: Final = (LOG_SUFFIX, INDEX_SUFFIX, TIME_INDEX_SUFFIX, COMPACTED_SUFFIX)
MAX_RELATIVE_OFFSET: Final = 0xFFFF_FFFF

_HEADER = batch.HEADER_STRUCT
_LENGTH_AT_8: Final = struct.Struct(">i")
_EPOCH_AT_12: Final = struct.Struct(">i")
_NO_TIMESTAMP: Final = -(1 << 63)
_ZERO_PREFIX: Final = bytes(batch.LENGTH_FIELDS_SIZE)
_STAMPED_PREFIX: Final = struct.Struct(">qii")  # base_offset, batch_length, leader_epoch
_IOV_MAX: Final = 1024
# Blocks are allocated ahead of the write position in steps that double from the first to the
# last (a step is never more than the segment's capacity): a young or idle segment holds a few
# KiB, a busy one pays one posix_fallocate per PREALLOCATE_MAX_STEP bytes appended.
PREALLOCATE_MIN_STEP: Final = 64 << 10
PREALLOCATE_MAX_STEP: Final = 8 << 20
_BLOCK: Final = 4096


logger = logging.getLogger(__name__)


class _FileWork:
    """One thread per process for the segments' slow file calls (posix_fallocate ahead of the
    writes, ftruncate of sealed tails), in submission order; started at first use."""

    _lock = threading.Lock()
    _executor: ThreadPoolExecutor | None = None

    @classmethod
    def submit(cls, call: Callable[..., int], *args: int) -> Future[int]:
        with cls._lock:
            if cls._executor is None:
                cls._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rustmq-segment-files")
            return cls._executor.submit(call, *args)


def _allocate(fd: int, start: int, end: int) -> int:
    os.posix_fallocate(fd, start, end - start)
    return end


def _trim(fd: int, size: int) -> int:
    if os.fstat(fd).st_size > size:
        os.ftruncate(fd, size)
    return -1


def _write_fully(fd: int, buffers: list[bytes | memoryview], position: int) -> None:
    """pwritev all `buffers` at `position`, IOV_MAX at a time, finishing short writes."""
    for first in range(0, len(buffers), _IOV_MAX):
        chunk = buffers[first : first + _IOV_MAX]
        expected = sum(len(buffer) for buffer in chunk)
        written = os.pwritev(fd, chunk, position)
        if written < expected:  # rare (a signal, a limit): finish buffer by buffer
            _finish_short_write(fd, chunk, position, written)
        position += expected


def _finish_short_write(fd: int, chunk: list[bytes | memoryview], position: int, written: int
                        ) -> None:
    done_until = position + written
    cursor = position
    for buffer in chunk:
        view = memoryview(buffer)
        if cursor + len(view) <= done_until:
            cursor += len(view)
            continue
        skip = max(0, done_until - cursor)
        view, cursor = view[skip:], cursor + skip
        while len(view):
            count = os.pwrite(fd, view, cursor)
            if count <= 0:
                raise OSError(errno.EIO, "pwrite wrote nothing")
            view, cursor = view[count:], cursor + count


def file_name(base_offset: int, suffix: str) -> str:
    return f"{base_offset:020d}{suffix}"


def parse_base_offset(name: str) -> int | None:
    """Base offset of a `<20 digits>.log` file name, None for any other name."""
    stem, dot, suffix = name.partition(".")
    if dot and "." + suffix == LOG_SUFFIX and len(stem) == 20 and stem.isdigit():
        return int(stem)
    return None


class ScanResult(NamedTuple):
    """What a walk over a segment file found: where the valid batches end and their indexes."""

    size: int  # bytes of valid batches from position 0
    next_offset: int
    batch_count: int
    record_count: int
    max_timestamp_ms: int
    max_timestamp_before_last: int
    last_batch_position: int  # -1 when empty
    first_batch_max_timestamp: int
    offset_index: OffsetIndex
    time_index: TimeIndex
    stop_reason: str | None  # None: clean end (end of file or zero-filled tail); else why it stopped


def scan_file(fd: int, file_size: int, base_offset: int, index_interval_bytes: int,
              compacted_end: int | None = None) -> ScanResult:
    """Walk the batches of a segment file from position 0 and rebuild its indexes.

    Every batch is fully validated (`batch.check_batch`: framing, header sanity, CRC32C) and must
    continue the offset sequence. Stops at the end of file, at a zero-filled header (the
    tail) or at the first invalid batch, whose reason is returned. Only the file's data is mapped:
    a sparse tail after the first hole is never read (on tmpfs even a read fault in a hole
    allocates a page, which a full file system answers with SIGBUS).

    `compacted_end`: the segment is compacted (see the module docstring): the first batch must
    start at `base_offset`, later ones may skip offsets but must stay below `compacted_end`, and
    a scan that reaches the end cleanly reports `compacted_end` as its next offset.
    """
    offset_index, time_index = OffsetIndex(), TimeIndex()
    file_size = data_extent(fd, file_size)
    if file_size == 0:
        return ScanResult(0, base_offset, 0, 0, _NO_TIMESTAMP, _NO_TIMESTAMP, -1, _NO_TIMESTAMP,
                          offset_index, time_index, None)
    mm = mmap.mmap(fd, file_size, access=mmap.ACCESS_READ)
    try:
        with memoryview(mm) as view:
            return _scan(view, file_size, base_offset, index_interval_bytes, offset_index,
                         time_index, compacted_end)
    finally:
        mm.close()


def _scan(view: memoryview, end: int, base_offset: int, interval: int,
          offset_index: OffsetIndex, time_index: TimeIndex,
          compacted_end: int | None = None) -> ScanResult:
    pos = 0
    expected = base_offset
    batch_count = record_count = 0
    max_ts = max_ts_before_last = first_max_ts = _NO_TIMESTAMP
    last_position = -1
    bytes_since_entry = 0
    stop_reason: str | None = None
    epoch_runs: list[tuple[int, int]] = []  # (leader_epoch, position) where each epoch starts
    while pos < end:
        if end - pos >= batch.LENGTH_FIELDS_SIZE and view[pos : pos + 12] == _ZERO_PREFIX:
            break  # the zero-filled tail: a clean end
        try:
            header = batch.check_batch(view, pos, end)
        except errors.CorruptBatchError as error:
            stop_reason = error.reason
            break
        if header.base_offset != expected and (
            compacted_end is None
            or batch_count == 0
            or header.base_offset < expected
            or header.last_offset >= compacted_end
        ):
            stop_reason = f"base_offset {header.base_offset} breaks the sequence (expected {expected})"
            break
        if header.leader_epoch < batch.NO_LEADER_EPOCH:
            stop_reason = f"leader_epoch {header.leader_epoch} was never stamped by a broker"
            break
        if epoch_runs and header.leader_epoch < epoch_runs[-1][0]:
            # Epochs never decrease along a log, and leader_epoch is outside the CRC: a batch
            # whose epoch is above a later one's was damaged, or the later one was. Cut at the
            # start of the first run above it (in standalone mode, where every epoch is -1, that
            # is exactly the damaged batch).
            cut = next(position for epoch, position in epoch_runs if epoch > header.leader_epoch)
            result = _scan(view, cut, base_offset, interval, OffsetIndex(), TimeIndex(),
                           compacted_end)
            return result._replace(stop_reason=(
                f"leader_epoch {header.leader_epoch} at byte {pos} follows "
                f"{epoch_runs[-1][0]}: epochs never decrease, so the log is cut at byte {cut}"))
        if not epoch_runs or header.leader_epoch > epoch_runs[-1][0]:
            epoch_runs.append((header.leader_epoch, pos))
        if header.base_offset + header.record_count - 1 - base_offset > MAX_RELATIVE_OFFSET:
            stop_reason = "offsets overflow the segment's 32-bit relative offsets"
            break
        if bytes_since_entry > interval:
            offset_index.append(header.base_offset - base_offset, pos)
            time_index.append(max_ts, header.base_offset - base_offset)
            bytes_since_entry = 0
        size = batch.LENGTH_FIELDS_SIZE + header.batch_length
        bytes_since_entry += size
        if batch_count == 0:
            first_max_ts = header.max_timestamp_ms
        max_ts_before_last = max_ts
        if header.max_timestamp_ms > max_ts:
            max_ts = header.max_timestamp_ms
        last_position = pos
        batch_count += 1
        record_count += header.record_count
        expected = header.base_offset + header.record_count
        pos += size
    if compacted_end is not None and stop_reason is None:
        expected = compacted_end
    return ScanResult(pos, expected, batch_count, record_count, max_ts, max_ts_before_last,
                      last_position, first_max_ts, offset_index, time_index, stop_reason)


def data_extent(fd: int, file_size: int) -> int:
    """Where the file's first hole starts (its size if it has none, or if the file system
    cannot say): segment data is written contiguously from 0, so none lies beyond."""
    try:
        return min(file_size, os.lseek(fd, 0, os.SEEK_HOLE))
    except OSError:
        return file_size


def load_trusted(
    directory: Path, base_offset: int, fd: int, file_size: int
) -> ScanResult | None:
    """Rebuild a segment's state from its index files alone (no scan), or None if they don't hold.

    The terminal entry must point at a well-framed batch with the right base offset that ends
    within the file; anything else (missing, torn, stale) returns None and the caller scans.
    """
    try:
        offset_data = (directory / file_name(base_offset, INDEX_SUFFIX)).read_bytes()
        time_data = (directory / file_name(base_offset, TIME_INDEX_SUFFIX)).read_bytes()
        offset_index = OffsetIndex.decode(offset_data, file_size)
        time_index = TimeIndex.decode(time_data)
    except (OSError, ValueError):
        return None
    if not len(offset_index) or len(offset_index) != len(time_index):
        return None
    if time_index.relative_offsets != offset_index.relative_offsets:
        return None
    last_position = offset_index.positions[-1]
    if file_size - last_position < batch.HEADER_SIZE:
        return None
    buf = os.pread(fd, batch.HEADER_SIZE, last_position)
    first = os.pread(fd, batch.HEADER_SIZE, 0)
    if len(buf) < batch.HEADER_SIZE or len(first) < batch.HEADER_SIZE:
        return None
    header = batch.BatchHeader._make(_HEADER.unpack_from(buf))
    first_header = batch.BatchHeader._make(_HEADER.unpack_from(first))
    size = last_position + header.size
    if (
        header.magic != batch.MAGIC
        or first_header.base_offset != base_offset
        or header.record_count < 1
        or header.base_offset != base_offset + offset_index.relative_offsets[-1]
        or header.batch_length < batch.HEADER_SIZE - batch.LENGTH_FIELDS_SIZE
        or size > file_size
    ):
        return None
    before_last = time_index.timestamps[-1]
    return ScanResult(
        size=size,
        next_offset=header.base_offset + header.record_count,
        batch_count=-1,
        record_count=header.base_offset + header.record_count - base_offset,
        max_timestamp_ms=max(before_last, header.max_timestamp_ms),
        max_timestamp_before_last=before_last,
        last_batch_position=last_position,
        first_batch_max_timestamp=first_header.max_timestamp_ms,
        offset_index=offset_index,
        time_index=time_index,
        stop_reason=None,
    )


class Segment:
    """A segment's open file, its map and its in-memory indexes. Owned by one PartitionLog."""

    __slots__ = (
        "directory", "base_offset", "fd", "capacity", "size", "next_offset", "max_timestamp_ms",
        "max_timestamp_before_last", "last_batch_position", "rolling_base_ms", "offset_index",
        "time_index", "bytes_since_index_entry", "sealed", "flushed_size", "dir_synced",
        "index_persisted", "pending_index_files", "deleted", "compacted", "allocated", "_mm",
        "_view", "_file_work",
    )

    def __init__(self, directory: Path, base_offset: int, fd: int, capacity: int,
                 state: ScanResult, writable: bool, dir_synced: bool) -> None:
        self.directory = directory
        self.base_offset = base_offset
        self.fd = fd
        self.capacity = capacity
        self.size = state.size
        self.next_offset = state.next_offset
        self.max_timestamp_ms = state.max_timestamp_ms
        self.max_timestamp_before_last = state.max_timestamp_before_last
        self.last_batch_position = state.last_batch_position
        self.rolling_base_ms: int | None = None if state.size == 0 else _now_ms()
        self.offset_index = state.offset_index
        self.time_index = state.time_index
        self.bytes_since_index_entry = 0
        if state.size:
            tail = state.offset_index.positions[-1] if len(state.offset_index) else 0
            self.bytes_since_index_entry = state.size - tail
        self.sealed = not writable
        self.flushed_size = state.size  # what is on disk is assumed flushed only by the caller
        self.dir_synced = dir_synced
        self.index_persisted = not writable
        self.pending_index_files: tuple[tuple[Path, bytes], ...] = ()
        self.deleted = False
        self.compacted = False  # written by compaction: may have gaps (see the module docstring)
        self.allocated = state.size  # blocks known allocated from 0 (reserve); more may be
        self._file_work: Future[int] | None = None  # the segment-file thread's call for this segment
        if writable:
            self._mm = mmap.mmap(fd, capacity, access=mmap.ACCESS_READ)
        else:
            self._mm = mmap.mmap(fd, state.size, access=mmap.ACCESS_READ)
        self._view = memoryview(self._mm)

    @classmethod
    def create(cls, directory: Path, base_offset: int, capacity: int, reserve: int = 0
               ) -> Segment:
        """Create and map a new empty segment of `capacity` bytes (a sparse file) with the first
        `reserve` bytes allocated (see `reserve`); StorageFullError, and no file left, if the
        file system cannot give them."""
        path = directory / file_name(base_offset, LOG_SUFFIX)
        for stale in (INDEX_SUFFIX, TIME_INDEX_SUFFIX, COMPACTED_SUFFIX):
            (directory / file_name(base_offset, stale)).unlink(missing_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise errors.from_os_error(error, f"creating segment {path}") from error
        try:
            os.ftruncate(fd, capacity)  # EFBIG here under a file size limit; no blocks used
            empty = ScanResult(0, base_offset, 0, 0, _NO_TIMESTAMP, _NO_TIMESTAMP, -1,
                               _NO_TIMESTAMP, OffsetIndex(), TimeIndex(), None)
            segment = cls(directory, base_offset, fd, capacity, empty, writable=True,
                          dir_synced=False)
        except OSError as error:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise errors.from_os_error(error, f"creating segment {path} of {capacity} bytes"
                                       ) from error
        try:
            segment.reserve(reserve)
        except BaseException:
            segment.delete()
            raise
        return segment

    def reserve(self, end: int) -> None:
        """Make sure blocks are allocated up to byte `end` (at most the capacity), and have the
        segment-file thread allocate the next step ahead once `end` passes the middle of the
        current one, so that appends find their blocks already there.

        Raises StorageFullError (ENOSPC, EDQUOT, EFBIG) with nothing written and the segment
        unchanged, so the caller can refuse the append and keep serving; a later call retries.
        """
        self._collect_file_work(wait=False)
        if end > self.allocated:
            if self._file_work is not None:  # an allocation ahead may cover it: wait, not twice
                self._collect_file_work(wait=True)
            if end > self.allocated:
                target = self._step_target(end)
                try:
                    _allocate(self.fd, self.allocated, target)
                except OSError as error:
                    raise errors.from_os_error(
                        error, f"allocating {target - self.allocated} bytes for {self.path}") from error
                self.allocated = target
        step = self._step()
        # An empty segment gets no blocks ahead: an idle partition holds none (see the docstring).
        if end and self._file_work is None and self.allocated < self.capacity and self.allocated - end < step // 2:
            self._file_work = _FileWork.submit(_allocate, self.fd, self.allocated, self._step_target(end))

    def _step(self) -> int:
        return min(max(self.allocated, PREALLOCATE_MIN_STEP), PREALLOCATE_MAX_STEP)

    def _step_target(self, end: int) -> int:
        return min(self.capacity, -(-(end + self._step()) // _BLOCK) * _BLOCK)

    def _collect_file_work(self, *, wait: bool) -> None:
        """Take the result of the segment-file thread's call once it is done (or wait for it):
        a finished allocation raises `allocated`; a failed one only leaves the allocation to
        the appending thread, which reports the error with the append it refuses."""
        work = self._file_work
        if work is None or not (wait or work.done()):
            return
        self._file_work = None
        try:
            allocated = work.result()
        except OSError as error:
            logger.debug("%s: file work ahead failed (%s); the next append allocates itself", self.path, error)
            return
        self.allocated = max(self.allocated, allocated)

    @property
    def path(self) -> Path:
        return self.directory / file_name(self.base_offset, LOG_SUFFIX)

    @property
    def record_count(self) -> int:
        return self.next_offset - self.base_offset

    def append(self, data: memoryview, headers: list[tuple[int, int, int, int]], first_offset: int,
               index_interval_bytes: int, leader_epoch: int | None = batch.NO_LEADER_EPOCH) -> None:
        """Write whole batches after the last one, with their broker fields stamped.

        `headers` holds (position in data, size, record_count, max_timestamp_ms) per batch, from
        the caller's framing walk. One pwritev per append writes, per batch, a freshly packed
        16-byte prefix (base_offset, batch_length, leader_epoch) and then the rest of the batch
        straight from the caller's buffer: the payload is copied once, by the kernel, into the
        page cache this segment's map shares, and the CRC'd bytes are never touched.
        `leader_epoch` is stamped into every batch; None keeps each batch's own (a follower
        copying its leader's batches). (A write
        fills fresh page cache about twice as fast as faulting it in through the map on the VMs
        measured; see docs/storage.md.) Raises OSError; the new bytes become visible to readers
        only when `size` moves, after the write.
        """
        start = self.size
        buffers: list[bytes | memoryview] = []
        offset = first_offset
        base = self.base_offset
        max_ts = self.max_timestamp_ms
        max_ts_before_last = self.max_timestamp_before_last
        since = self.bytes_since_index_entry
        entries: list[tuple[int, int, int]] = []  # applied only once the write succeeded
        for position, size, record_count, batch_max_ts in headers:
            epoch = _EPOCH_AT_12.unpack_from(data, position + 12)[0] if leader_epoch is None else leader_epoch
            buffers.append(_STAMPED_PREFIX.pack(offset, size - batch.LENGTH_FIELDS_SIZE, epoch))
            buffers.append(data[position + _STAMPED_PREFIX.size : position + size])
            if since > index_interval_bytes:
                entries.append((offset - base, start + position, max_ts))
                since = 0
            since += size
            max_ts_before_last = max_ts
            if batch_max_ts > max_ts:
                max_ts = batch_max_ts
            offset += record_count
        _write_fully(self.fd, buffers, start)
        for relative_offset, position, timestamp_ms in entries:
            self.offset_index.append(relative_offset, position)
            self.time_index.append(timestamp_ms, relative_offset)
        self.max_timestamp_before_last = max_ts_before_last
        self.last_batch_position = start + headers[-1][0]
        self.bytes_since_index_entry = since
        self.max_timestamp_ms = max_ts
        if self.rolling_base_ms is None:
            self.rolling_base_ms = _now_ms()
        self.next_offset = offset
        self.size = start + len(data)

    def batch_at(self, position: int) -> batch.BatchHeader:
        return batch.BatchHeader._make(_HEADER.unpack_from(self._mm, position))

    def position_of(self, offset: int) -> int:
        """Position of the batch that contains `offset` (base_offset <= offset < next_offset)."""
        _, position = self.offset_index.lookup(offset - self.base_offset)
        mm = self._mm
        while True:
            header = _HEADER.unpack_from(mm, position)
            if offset < header[0] + header[6]:  # base_offset + record_count
                return position
            position += batch.LENGTH_FIELDS_SIZE + header[1]  # batch_length

    def read(self, offset: int, max_bytes: int, at_least_one: bool) -> tuple[memoryview, int] | None:
        """Whole batches from the one holding `offset`, within `max_bytes` (or one if forced).

        Returns (zero-copy view, next offset after the view) or None if nothing fits.
        """
        start = self.position_of(offset)
        mm = self._mm
        stop = start + batch.LENGTH_FIELDS_SIZE + _LENGTH_AT_8.unpack_from(mm, start + 8)[0]
        limit = start + max_bytes
        if stop > limit and not at_least_one:
            return None
        if stop < limit:
            indexed = self.offset_index.last_position_at_or_before(min(limit, self.size))
            if indexed > stop:
                stop = indexed
            while stop < self.size:
                following = stop + batch.LENGTH_FIELDS_SIZE + _LENGTH_AT_8.unpack_from(mm, stop + 8)[0]
                if following > limit:
                    break
                stop = following
        next_offset = self.next_offset if stop >= self.size else _HEADER.unpack_from(mm, stop)[0]
        return self._view[start:stop], next_offset

    def offset_for_timestamp(self, timestamp_ms: int) -> int | None:
        """Base offset of the first batch whose max_timestamp_ms >= `timestamp_ms`, if any."""
        if self.size == 0 or self.max_timestamp_ms < timestamp_ms:
            return None
        i = self.time_index.last_entry_before(timestamp_ms)
        position = self.offset_index.positions[i] if i >= 0 else 0
        while position < self.size:
            header = self.batch_at(position)
            if header.max_timestamp_ms >= timestamp_ms:
                return header.base_offset
            position += header.size
        return None

    def seal(self) -> mmap.mmap | None:
        """Seal the segment: swap in a map of exactly the used size, then trim the file to it.

        Returns the old full-size map if readers still hold views of it; the caller retries
        closing it later and calls `trim` once it could (PartitionLog._reap).
        """
        self.pending_index_files = self.index_files()
        read_only = mmap.mmap(self.fd, self.size, access=mmap.ACCESS_READ)
        old_view, old_map = self._view, self._mm
        self._mm, self._view = read_only, memoryview(read_only)
        self.sealed = True
        old_view.release()
        try:
            old_map.close()
        except BufferError:
            return old_map  # Hazard: readers still slice the full-size map; trim only after unmap.
        self.trim()
        return None

    def trim(self) -> None:
        """Have the segment-file thread give the tail of a sealed segment (allocated ahead or
        sparse) back to the file system, after any allocation it still runs for it. A failure
        only wastes space: recovery and the next clean start trim again."""
        if self.deleted or self.fd < 0:
            return
        self._collect_file_work(wait=False)
        self._file_work = _FileWork.submit(_trim, self.fd, self.size)

    def index_files(self) -> tuple[tuple[Path, bytes], tuple[Path, bytes]]:
        """The two index files' paths and contents, each ending with the terminal entry."""
        relative_last = self.batch_at(self.last_batch_position).base_offset - self.base_offset
        offset_terminal = (relative_last, self.last_batch_position)
        time_terminal = (self.max_timestamp_before_last, relative_last)
        return (
            (self.directory / file_name(self.base_offset, INDEX_SUFFIX),
             self.offset_index.encode(offset_terminal)),
            (self.directory / file_name(self.base_offset, TIME_INDEX_SUFFIX),
             self.time_index.encode(time_terminal)),
        )

    def data_end_offset(self) -> int:
        """One past the last record stored: below `next_offset` only for a compacted segment
        whose last offsets were compacted away."""
        if not self.compacted:
            return self.next_offset
        return self.batch_at(self.last_batch_position).last_offset + 1

    def view(self) -> memoryview:
        """The whole segment's batches, zero copy (release it when done; see View lifetime)."""
        return self._view[: self.size]

    def grow(self, capacity: int) -> None:
        """Enlarge an EMPTY active segment (for an append larger than segment_bytes); the
        caller reserves the blocks."""
        assert self.size == 0 and not self.sealed
        try:
            os.ftruncate(self.fd, capacity)
        except OSError as error:
            raise errors.from_os_error(error, f"growing {self.path} to {capacity} bytes") from error
        # An empty segment never handed out a view, so its map closes without BufferError.
        self._view.release()
        self._mm.close()
        self._mm = mmap.mmap(self.fd, capacity, access=mmap.ACCESS_READ)
        self._view = memoryview(self._mm)
        self.capacity = capacity

    def close(self) -> bool:
        """Close the fd and unmap; False if the unmap is deferred to the last reader's release."""
        if self.fd < 0:
            return True
        self._collect_file_work(wait=True)  # Hazard: the thread must not outlive our fd.
        self._view.release()
        unmapped = True
        try:
            self._mm.close()
        except BufferError:
            unmapped = False  # Hazard: readers hold slices; CPython unmaps after the last one.
        self._mm = None  # type: ignore[assignment]
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.fd = -1
        return unmapped

    def delete(self) -> None:
        """Close, then unlink the segment's files (live views keep the unlinked inode alive)."""
        self.deleted = True
        self.close()
        for suffix in SEGMENT_SUFFIXES:
            (self.directory / file_name(self.base_offset, suffix)).unlink(missing_ok=True)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
