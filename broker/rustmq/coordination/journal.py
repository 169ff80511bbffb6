"""A compacting key/value journal on a PartitionLog: the persistence of every coordination store.

Layout (one directory per store, e.g. ``<data_dir>/coordination/consumer_offsets``)::

    gen-00000000000000000007/   a PartitionLog (rustmq.storage) holding the current generation
    gen-00000000000000000008/   a newer generation being written by `compact` (or a leftover)

Byte format: ordinary record batches (`rustmq.protocol.batch`) whose bodies use the protocol's
record encoding (`rustmq.protocol.records`: a msgpack array of
``[timestamp_delta, key, value, headers]``), so the internal logs can be read with the same
tools as any topic. Keys and values are opaque bytes chosen by the store (offsets, queue);
a value of nil is a tombstone. Every generation starts with ONE batch whose first record has the
key GENERATION_KEY (value: msgpack ``{"generation": n, "created_ms": t}``) followed by the full
live state at compaction time; later batches are the changes since.

Why generations instead of in-place compaction: the storage engine deletes whole segments by
retention only, so the journal compacts by writing the live state as the first batch of a fresh
PartitionLog and then deleting the old one. A batch is atomic (CRC-checked, a torn tail is
truncated by recovery), so a generation either starts with its complete snapshot or is invalid.

Format versions (the snapshot marker's ``"format"`` field): a generation written by older code
has none (format 1) and is valid once its first batch is complete. A format-2 generation is valid
only once its directory also holds the file ``journal-committed`` (empty, fsynced, directory
fsynced): it is written last, after the generation holds everything the old one acknowledged.
`open` uses the newest valid generation and deletes the rest (older ones and invalid newer ones).

Compaction off the event loop (`maybe_compact`), all on the owner thread except where noted:

1. snapshot the live state in memory (cheap) at old-generation offset T; start a worker thread;
2. worker thread: create gen N+1, append the snapshot batch, fsync it and the journal directory.
   Appends keep going to gen N meanwhile;
3. a later `maybe_compact` finds the thread done: copy gen N's batches from T on into gen N+1
   (the tail since the snapshot: small; written to the page cache, not synced) and switch
   appends to gen N+1 at once;
4. commit, on whichever thread flushes first (a commit thread started by the switch, or the
   server's GroupCommitter asked to make an append to gen N+1 durable): fsync gen N+1, then write
   ``journal-committed`` and fsync it and the directory, then delete gen N's directory.

Nothing in gen N+1 counts as durable before its marker is: `position()` hands out the
generation's `_Generation` flush target, whose `durable_offset` stays at the generation's start
until the commit, so no append to gen N+1 is acknowledged before recovery would choose gen N+1.
Crash outcomes: before the marker is durable gen N+1 is ignored (and deleted) and gen N is used;
it holds everything acknowledged, because its files are deleted only after the commit and every
acknowledgement until then was of an append to gen N. After the marker gen N+1 is used: it was
synced, holding all of gen N, before the marker was written. A failed commit (disk full) is
retried by the next flush; until one succeeds, appends to gen N+1 are not acknowledged. No fsync
of a compaction runs on the owner thread.

Appends go to the current generation. Durability is the caller's choice: `flush()` blocks until
everything appended is on disk (committing the generation if needed); a server can instead hand
the target of `position()` to its GroupCommitter. An append whose `position()` was taken before a
switch waits on gen N, which stays open until the next switch; gen N+1 holds it too once
committed, so the acknowledgement is true either way.
Replay reads the generation from its first batch, so restart time is bounded by the live state
plus the tail since the last compaction (`compact_bytes`).

`LogJournal` is the second backend of the same stores (cluster mode, docs/cluster.md): the
entries go, in the same batch format, to one partition of the replicated internal topic
``__rustmq_coordination`` instead of a private directory, stamped with the leader epoch of the
broker that writes them. That partition is replicated like any topic and the caller waits for
its high watermark (acks=all) instead of an fsync; a new leader replays the partition
(`LogReplay`, in bounded steps). It compacts with the same snapshot convention inside the one
log instead of generations: a snapshot batch appended to the partition, then, once every
in-sync replica holds it, the segments before it deleted (see `LogJournal`).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import msgpack

from rustmq.protocol import batch, records
from rustmq.storage import errors
from rustmq.storage.config import FlushPolicy, LogConfig
from rustmq.storage.durability import FlushTarget
from rustmq.storage.partition import PartitionLog, make_directories

logger = logging.getLogger("rustmq.coordination")

GENERATION_KEY: Final = b"\x00rustmq.generation"
GENERATION_PREFIX: Final = "gen-"
READ_CHUNK_BYTES: Final = 4 << 20
DEFAULT_COMPACT_BYTES: Final = 16 << 20
# A coordination partition's tail since its last snapshot beyond which the coordinator writes a
# new one (cluster mode; the broker setting coordination_compact_bytes, docs/cluster.md).
DEFAULT_LOG_COMPACT_BYTES: Final = 8 << 20
# A coordination snapshot is one batch (atomic on every replica) and must reach followers in one
# replica fetch response, below the default frame limit (16 MiB): a larger live state is not
# compacted (logged; the log keeps growing as before compaction existed).
MAX_LOG_SNAPSHOT_BYTES: Final = 12 << 20
FORMAT_VERSION: Final = 2
COMMITTED_FILE: Final = "journal-committed"

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
        self._pending: _PendingGeneration | None = None
        # The generation before the last switch: its files are deleted, but it stays open until
        # the next switch so that durability requests made on it before the switch still succeed.
        self._retired: PartitionLog | None = None
        # The current generation's commit, while its marker may not be durable yet (step 4).
        self._committing: _Generation | None = None

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
            if first is None or (first[1] >= 2 and not (path / COMMITTED_FILE).exists()):
                logger.warning("%s: journal generation %s has no complete snapshot or was not "
                               "committed; discarding", self.directory, name)
                partition.close(clean=False)
                shutil.rmtree(path, ignore_errors=True)
                continue
            chosen = (number, partition)
            self._snapshot_bytes = first[0]
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
        return _entries(self.partition)

    # ------------------------------------------------------------------------------- writing

    def append(self, entries: Sequence[Entry], now_ms: int) -> int:
        """Append entries as one batch (atomic); return the offset of the last one."""
        if not entries:
            raise ValueError("nothing to append")
        result = self.partition.append(_build(entries, now_ms))
        return result.last_offset

    def flush(self) -> int:
        return self._flush_target().flush()

    def position(self) -> tuple[FlushTarget, int]:
        """(target, offset): everything appended so far is durable once the target's
        durable_offset is above offset. Ask after `maybe_compact`: a compaction moves the state
        to a new generation whose offsets are unrelated to those `append` returned before."""
        return self._flush_target(), self.partition.end_offset - 1

    def _flush_target(self) -> FlushTarget:
        committing = self._committing
        if committing is None or committing.committed:
            return self.partition
        return committing

    @property
    def tail_bytes(self) -> int:
        """Bytes appended since the generation's snapshot."""
        return self.partition.size_bytes - self._snapshot_bytes

    def wants_compaction(self) -> bool:
        tail = self.tail_bytes
        return tail > max(self.compact_bytes, self._snapshot_bytes, self._retry_at_tail)

    def maybe_compact(self, live: Callable[[], Sequence[Entry]], now_ms: int) -> bool:
        """Advance a compaction (see the module docstring): finish one whose new generation the
        worker thread has written, or start one if due. True when this call switched generations.
        A failure (disk full...) is logged and retried after another `compact_bytes` of tail:
        the current generation stays valid, so nothing is lost."""
        committing = self._committing
        if committing is not None and not committing.committed:
            committing.retry_in_thread()
            return False
        pending = self._pending
        if pending is not None:
            if pending.thread.is_alive():
                return False
            self._pending = None
            try:
                self._install(pending)
            except (OSError, errors.StorageError, batch.CorruptBatchError) as error:
                self._compaction_failed(error)
                return False
            self._retry_at_tail = 0
            return True
        if not self.wants_compaction():
            return False
        number = self.generation + 1
        pending = _PendingGeneration(self.directory / _generation_name(number), number,
                                     self.partition.end_offset, self.config,
                                     _build(_snapshot_entries(number, live(), now_ms), now_ms))
        self._pending = pending
        pending.thread.start()
        return False

    @property
    def compacting(self) -> bool:
        return self._pending is not None

    def _compaction_failed(self, error: BaseException) -> None:
        self.compaction_failures += 1
        self._retry_at_tail = self.tail_bytes + self.compact_bytes
        logger.error("%s: compaction failed (%s); keeping generation %d",
                     self.directory, error, self.generation)

    def _install(self, pending: _PendingGeneration) -> None:
        """Step 3 (owner thread): catch the new generation up and switch to it; its commit
        (step 4) runs on a worker thread."""
        if pending.error is not None:
            raise pending.error
        new_partition = pending.partition
        assert new_partition is not None
        try:
            snapshot_bytes = new_partition.size_bytes
            _copy_batches(self.partition, pending.snapshot_offset, new_partition)
        except BaseException:
            new_partition.close(clean=False)  # no marker yet: the next open discards it
            raise
        old_path = self.directory / _generation_name(self.generation)
        self._switch(new_partition, pending.number, snapshot_bytes)
        self._committing = _Generation(new_partition, pending.path, old_path, self.directory)
        self._committing.retry_in_thread()

    def _switch(self, new_partition: PartitionLog, number: int, snapshot_bytes: int) -> None:
        old_partition = self.partition
        self.partition, self.generation = new_partition, number
        self._snapshot_bytes = snapshot_bytes
        if self._retired is not None:
            self._retired.close(clean=False)
        self._retired = old_partition
        self.compactions += 1

    def compact(self, live: Sequence[Entry], now_ms: int) -> None:
        """Start a new generation holding exactly `live`, then delete the old one, all on the
        calling thread (blocking). `live` must be the complete state as of everything appended
        so far."""
        self.wait_compaction()
        number = self.generation + 1
        old_path = self.directory / _generation_name(self.generation)
        new_partition = self._create_generation(number, live, now_ms)
        self._switch(new_partition, number, new_partition.size_bytes)
        _remove_generation(old_path, self.directory)

    def wait_compaction(self) -> None:
        """Block until a compaction in progress has finished (or failed) and is installed."""
        pending = self._pending
        if pending is not None:
            pending.thread.join()
            self.maybe_compact(lambda: [], 0)
        if self._committing is not None:
            self._committing.flush()  # raises if the commit still fails
            self._committing.join()
            self._committing = None

    def _create_generation(self, number: int, live: Sequence[Entry], now_ms: int) -> PartitionLog:
        """A new, committed generation holding `live` (blocking: calling thread)."""
        path = self.directory / _generation_name(number)
        partition = _write_snapshot(path, self.config,
                                    _build(_snapshot_entries(number, live, now_ms), now_ms))
        try:
            _commit(path)
        except BaseException:
            partition.close(clean=False)
            _remove_generation(path, self.directory)  # the marker may be on disk (see _install)
            raise
        return partition

    def close(self, clean: bool = True) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:  # never committed: the next open discards it
            pending.thread.join()
            if pending.partition is not None:
                pending.partition.close(clean=False)
        committing, self._committing = self._committing, None
        if committing is not None:
            committing.join()
            if clean and not committing.committed:
                try:  # appends since the switch live only in the new generation
                    committing.flush()
                except (OSError, errors.StorageError) as error:
                    logger.error("%s: journal generation %d not committed at close (%s); the "
                                 "previous one is used on restart", self.directory,
                                 self.generation, error)
        if self._retired is not None:
            self._retired.close(clean=False)
            self._retired = None
        if self.partition is not None:
            self.partition.close(clean=clean)


class LogJournal:
    """A Journal's append/replay/position on a partition the caller owns and replicates.

    ``on_append`` runs after every append (the server advances the high watermark and wakes
    follower fetches there). Closing leaves the partition open.

    Compaction (cluster mode, docs/cluster.md "Compaction of the internal topic"): the partition
    is shared by several stores (committed offsets, producer names, ...), so the snapshot is the
    live state of all of them, which only the owner knows: it passes ``live``. When the bytes
    appended since the newest snapshot exceed ``max(compact_bytes, size of that snapshot)``,
    `maybe_compact` rolls the partition's segment and appends ONE batch: the GENERATION_KEY
    marker, then every live entry (the private `Journal`'s snapshot convention). A batch is
    atomic on every replica (CRC-checked; a torn tail is cut by recovery), so a replay that meets
    a marker may drop everything before it (`LogReplay`). The owner then waits until the high
    watermark passes the snapshot and calls `advance_start`, which deletes the whole segments
    below it: only then does every in-sync replica (any possible next leader) hold the snapshot,
    and truncation never goes below the high watermark. The stores' own ``live`` argument to
    `maybe_compact` is ignored (it is one store's share of the partition only).
    """

    def __init__(self, partition: PartitionLog, leader_epoch: int,
                 on_append: Callable[[], None] | None = None, *,
                 live: Callable[[], Sequence[Entry]] | None = None,
                 compact_bytes: int = DEFAULT_LOG_COMPACT_BYTES,
                 on_snapshot: Callable[[int], None] | None = None) -> None:
        self.partition = partition
        self.leader_epoch = leader_epoch
        self.on_append = on_append
        self.live = live
        self.compact_bytes = compact_bytes
        self.on_snapshot = on_snapshot  # called with the offset just past a snapshot it appended
        self.snapshot_offset: int | None = None  # base offset of the newest snapshot batch known
        self.snapshot_end = 0  # the offset just past it
        self.snapshot_bytes = 0
        self.tail_bytes = 0  # bytes appended after the newest snapshot (the whole log without one)
        self.compactions = 0
        self._retry_at_tail = 0  # after a snapshot too large to write, wait for this much tail

    def replay(self) -> Iterator[Entry]:
        """Every (key, value) of the partition in order (snapshot markers skipped). For a
        partition that may hold snapshots use `LogReplay`, which drops what precedes one."""
        return _entries(self.partition)

    def replayed(self, replay: LogReplay) -> None:
        """Take over what a finished replay learnt: where the newest snapshot is, the tail size."""
        self.snapshot_offset, self.snapshot_end = replay.snapshot_offset, replay.snapshot_end
        self.snapshot_bytes, self.tail_bytes = replay.snapshot_bytes, replay.tail_bytes

    def append(self, entries: Sequence[Entry], now_ms: int) -> int:
        if not entries:
            raise ValueError("nothing to append")
        result = self.partition.append(_build(entries, now_ms), self.leader_epoch)
        self.tail_bytes += result.size_bytes
        if self.on_append is not None:
            self.on_append()
        return result.last_offset

    def position(self) -> tuple[PartitionLog, int]:
        return self.partition, self.partition.end_offset - 1

    def wants_compaction(self) -> bool:
        return self.live is not None and self.tail_bytes > max(self.compact_bytes, self.snapshot_bytes,
                                                               self._retry_at_tail)

    def maybe_compact(self, live: Callable[[], Sequence[Entry]], now_ms: int) -> bool:
        """Append a snapshot of the owner's live state if the tail is due (see the class
        docstring); True when it did. `live` (one store's entries) is not used."""
        if not self.wants_compaction():
            return False
        assert self.live is not None
        snapshot = _build(_snapshot_entries(self.compactions + 1, self.live(), now_ms), now_ms)
        if len(snapshot) > MAX_LOG_SNAPSHOT_BYTES:
            self._retry_at_tail = self.tail_bytes + self.compact_bytes
            logger.warning("%s: the live state (%d bytes) is larger than a snapshot may be (%d): not "
                           "compacted", self.partition.directory, len(snapshot), MAX_LOG_SNAPSHOT_BYTES)
            return False
        self.partition.roll()  # the snapshot starts a segment: the leader's log start lands on it
        result = self.partition.append(snapshot, self.leader_epoch)
        self._retry_at_tail = 0
        self.snapshot_offset, self.snapshot_end = result.base_offset, result.last_offset + 1
        self.snapshot_bytes, self.tail_bytes = result.size_bytes, 0
        self.compactions += 1
        if self.on_append is not None:
            self.on_append()
        if self.on_snapshot is not None:
            self.on_snapshot(self.snapshot_end)
        return True

    def advance_start(self, high_watermark: int) -> int:
        """Delete the whole segments below the newest snapshot once the high watermark has
        passed it (every in-sync replica holds it); return how many were deleted."""
        offset = self.snapshot_offset
        if offset is None or high_watermark < self.snapshot_end or self.partition.start_offset >= offset:
            return 0
        return self.partition.delete_before(offset)

    def flush(self) -> int:
        return self.partition.flush()

    def close(self, clean: bool = True) -> None:
        """The partition belongs to the broker's Log: nothing to close here."""


class LogReplay:
    """A replay of a `LogJournal`'s partition in bounded steps (the caller runs one step per
    event-loop pass, so a long log never stalls the loop).

    ``apply(key, value)`` gets each entry; ``reset()`` is called at each snapshot marker before
    the snapshot's entries: the snapshot is the complete live state as of its offset, so what
    came before it no longer counts (the caller starts its stores afresh). A step reads at most
    ``max_bytes`` of batches, except that a batch larger than that (a big snapshot) is read
    whole: a snapshot is atomic and is applied in one step."""

    def __init__(self, partition: PartitionLog, apply: Callable[[bytes, bytes | None], None],
                 reset: Callable[[], None]) -> None:
        self.partition = partition
        self.apply = apply
        self.reset = reset
        self.offset = partition.start_offset
        self.bytes_read = 0
        self.snapshot_offset: int | None = None
        self.snapshot_end = 0
        self.snapshot_bytes = 0
        self.tail_bytes = 0

    @property
    def done(self) -> bool:
        return self.offset >= self.partition.end_offset

    def step(self, max_bytes: int) -> bool:
        """Read and apply up to `max_bytes` of batches; True once the replay is complete.
        Raises OffsetOutOfRangeError when the partition changed underneath (truncated or
        restarted: the caller gives the replay up)."""
        if self.done:
            return True
        fetched = self.partition.read(self.offset, max_bytes)
        for view in fetched.views:
            try:
                self._apply_view(view)
            finally:
                view.release()
        self.offset = fetched.next_offset
        return self.done

    def _apply_view(self, view: memoryview) -> None:
        for header, decoded in _batches_in(view):
            self.bytes_read += header.size
            if decoded and decoded[0][1] == GENERATION_KEY:
                self.reset()
                self.snapshot_offset = header.base_offset
                self.snapshot_end = header.base_offset + header.record_count
                self.snapshot_bytes, self.tail_bytes = header.size, 0
            else:
                self.tail_bytes += header.size
            for record in decoded:
                key = record[1]
                if key != GENERATION_KEY:
                    self.apply(bytes(key), None if record[2] is None else bytes(record[2]))


class _PendingGeneration:
    """Step 2 of a compaction: a worker thread writes the snapshot batch into a new generation.
    The partition belongs to that thread until `thread` ended, then to the owner thread."""

    def __init__(self, path: Path, number: int, snapshot_offset: int, config: LogConfig,
                 snapshot: bytes) -> None:
        self.path = path
        self.number = number
        self.snapshot_offset = snapshot_offset  # the old generation's offset the snapshot covers
        self.partition: PartitionLog | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(config, snapshot),
                                       name=f"journal-compaction-{number}", daemon=True)

    def _run(self, config: LogConfig, snapshot: bytes) -> None:
        try:
            self.partition = _write_snapshot(self.path, config, snapshot)
        except (OSError, errors.StorageError) as error:
            self.error = error


class _Generation:
    """Flush target of a generation switched to before its marker is durable (step 4).

    `durable_offset` stays at the start until the commit: a waiter on an append to this
    generation is answered only once recovery would choose it. `flush` (any thread; the
    GroupCommitter's, a commit thread's, or the owner's in `flush()`/`close()`) syncs the
    partition and, the first time that succeeds, writes the marker and deletes the previous
    generation. A failure leaves it uncommitted for the next flush to retry."""

    RETRY_AFTER_S: Final = 1.0

    def __init__(self, partition: PartitionLog, path: Path, previous: Path, directory: Path) -> None:
        self.partition = partition
        self.path = path
        self.previous = previous
        self.journal_directory = directory
        self.committed = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._removal: threading.Thread | None = None
        self._failed_at = -1e9

    @property
    def directory(self) -> Path:
        return self.partition.directory

    @property
    def durable_offset(self) -> int:
        return self.partition.durable_offset if self.committed else self.partition.start_offset

    def flush(self) -> int:
        # Hazard (compaction ordering): the generation's data must be durable before the
        # marker makes recovery choose it, and the previous generation may be deleted only once
        # the marker is durable.
        durable = self.partition.flush()
        with self._lock:
            if not self.committed:
                try:
                    _commit(self.path)
                except BaseException:
                    self._failed_at = time.monotonic()
                    raise
                self.committed = True
                # Off the flushing thread: the group committer may have other waiters to answer.
                self._removal = threading.Thread(target=_remove_generation, name="journal-remove",
                                                 args=(self.previous, self.journal_directory), daemon=True)
                self._removal.start()
        return durable

    def retry_in_thread(self) -> None:
        """Start a commit on a worker thread unless one runs or the last failed under a second ago."""
        if self.committed or (self._thread is not None and self._thread.is_alive()):
            return
        if time.monotonic() - self._failed_at < self.RETRY_AFTER_S:
            return
        self._thread = threading.Thread(target=self._commit_quietly, name="journal-commit",
                                        daemon=True)
        self._thread.start()

    def _commit_quietly(self) -> None:
        try:
            self.flush()
        except (OSError, errors.StorageError) as error:
            logger.error("%s: committing journal generation failed (%s); retried by the next "
                         "flush", self.path, error)

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self._removal is not None:
            self._removal.join()


def _snapshot_entries(number: int, live: Sequence[Entry], now_ms: int) -> list[Entry]:
    marker = msgpack.packb({"generation": number, "created_ms": now_ms, "format": FORMAT_VERSION})
    return [(GENERATION_KEY, marker), *live]


def _write_snapshot(path: Path, config: LogConfig, snapshot: bytes) -> PartitionLog:
    """Create the generation at `path` holding the snapshot batch, durably (any thread)."""
    shutil.rmtree(path, ignore_errors=True)  # a leftover of a crashed compaction
    partition = PartitionLog.open(path, config)
    try:
        partition.append(snapshot)
        partition.flush()
        _fsync_directory(path.parent)
    except BaseException:
        partition.close(clean=False)
        raise
    return partition


def _commit(path: Path) -> None:
    """Make the generation at `path` the one recovery picks (format 2)."""
    fd = os.open(path / COMMITTED_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_directory(path)


def _copy_batches(source: PartitionLog, offset: int, target: PartitionLog) -> None:
    """Append source's batches from `offset` on to target (new offsets, same records)."""
    while offset < source.end_offset:
        fetched = source.read(offset, READ_CHUNK_BYTES)
        for view in fetched.views:
            try:
                target.append(view)
            finally:
                view.release()
        offset = fetched.next_offset


def _remove_generation(path: Path, directory: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    try:
        _fsync_directory(directory)
    except OSError as error:  # the next open removes it again if it came back
        logger.warning("%s: fsync after removing %s failed: %s", directory, path.name, error)


def _generation_name(number: int) -> str:
    return f"{GENERATION_PREFIX}{number:020d}"


def _build(entries: Sequence[Entry], now_ms: int) -> bytes:
    body = records.encode_body([[0, key, value, None] for key, value in entries])
    return batch.build_batch(body, record_count=len(entries), first_timestamp_ms=now_ms,
                             max_timestamp_ms=now_ms)


def _entries(partition: PartitionLog) -> Iterator[Entry]:
    offset = partition.start_offset
    while offset < partition.end_offset:
        fetched = partition.read(offset, READ_CHUNK_BYTES)
        for view in fetched.views:
            try:
                yield from _decode_batches(view)
            finally:
                view.release()
        offset = fetched.next_offset


def _decode_batches(view: memoryview) -> Iterator[Entry]:
    for _, decoded in _batches_in(view):
        for record in decoded:
            key = record[1]
            if key != GENERATION_KEY:
                yield bytes(key), (None if record[2] is None else bytes(record[2]))


def _batches_in(view: memoryview) -> Iterator[tuple[batch.BatchHeader, tuple[Any, ...]]]:
    """Each whole batch in `view` with its decoded records; JournalCorruptError on a bad body."""
    pos, end = 0, len(view)
    while pos < end:
        header = batch.read_header(view, pos)
        body = view[pos + batch.HEADER_SIZE : pos + header.size]
        try:
            decoded = records.decode_body(body, header.codec)
        except records.RecordDecodeError as error:
            raise JournalCorruptError(f"journal batch at offset {header.base_offset}: {error}") from error
        finally:
            body.release()
        yield header, decoded
        pos += header.size


def _first_batch_size(partition: PartitionLog) -> tuple[int, int] | None:
    """(size, format version) of the generation's first batch if it is a valid snapshot batch,
    else None. Format 1: written by code that predates the version field."""
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
        try:
            info = msgpack.unpackb(decoded[0][2])
        except (ValueError, msgpack.UnpackException):
            return None
        version = info.get("format", 1) if isinstance(info, dict) else 1
        return header.size, version if isinstance(version, int) else 1
    finally:
        for v in fetched.views:
            v.release()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
