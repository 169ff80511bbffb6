"""Idempotent producers: producer ids, and per-partition sequence checks that drop retried batches.

A producer asks once for a producer id (`ProducerIds.allocate`) and numbers its records per
partition from 0 (the batch header's base_sequence is the number of its first record, see
`rustmq.protocol.batch`). For every produced batch with producer_id >= 0 the server asks the
partition's `ProducerStateTable`:

* same epoch, same (base_sequence, record_count) as one of the producer's last
  RECENT_BATCHES batches -> DUPLICATE: not appended again; the answer repeats the original
  offsets (a retry after a lost response, even across a broker restart);
* same epoch, base_sequence == last sequence + 1 (wrapping at 2**31) -> APPEND;
* any other sequence of a known producer -> OutOfOrderSequenceError (a gap, or a duplicate
  older than the remembered window): nothing is written, the producer must not skip ahead;
* an older epoch -> ProducerFencedError (a zombie of a re-initialised producer);
* a newer epoch must start at sequence 0; an unknown producer id is accepted at any sequence
  (its state may have left with retention), which is what Kafka does too.

Persistence: the state is a function of the log (producer_id, producer_epoch, base_sequence
and record_count are in every batch header), so `rebuild` reconstructs it on first use by
walking batch headers (no body decoding) and nothing extra is written per produce. A clean
shutdown saves the tables it holds (`ProducerSnapshots`), so the next start walks only the
batches appended after each table's end offset (Kafka's producer snapshots, one file). Producer
ids come from `ProducerIds`, which reserves blocks of ids in a journal so an id is never handed
out twice, even across restarts.

Snapshot file ``<data_dir>/coordination/producer_state/snapshot`` (msgpack): ``{"version": 1,
"partitions": [[topic, partition, end_offset, [[producer_id, epoch, [[first_sequence,
last_sequence, base_offset, last_offset], ...]], ...]], ...]}``, written atomically (temporary
file, fsync, rename, directory fsync) after the last append of a clean shutdown. It is read and
deleted at start, before any append: a crash later leaves no snapshot behind, and the next
start rebuilds from the headers, so a snapshot never describes a log that changed after it was
written. One is used only if its end offset is within the partition's current log.
"""

from __future__ import annotations

import enum
import logging
import os
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple

import msgpack

from rustmq.coordination.journal import Journal, LogJournal
from rustmq.protocol import batch
from rustmq.storage.durability import FlushTarget
from rustmq.storage.partition import PartitionLog

RECENT_BATCHES: Final = 5
SEQUENCE_MODULUS: Final = 1 << 31
ID_BLOCK: Final = 1000
NO_PRODUCER: Final = -1
_ID_KEY: Final = b"producer-id-block"
_READ_CHUNK: Final = 4 << 20

log = logging.getLogger(__name__)


class ProducerError(Exception):
    code = "PRODUCER_ERROR"


class OutOfOrderSequenceError(ProducerError):
    code = "OUT_OF_ORDER_SEQUENCE"


class ProducerFencedError(ProducerError):
    code = "PRODUCER_FENCED"


class Verdict(enum.Enum):
    APPEND = "append"
    DUPLICATE = "duplicate"


class BatchMeta(NamedTuple):
    first_sequence: int
    last_sequence: int
    base_offset: int
    last_offset: int


class Decision(NamedTuple):
    verdict: Verdict
    original: BatchMeta | None  # for DUPLICATE: where the first copy was written


class _Producer:
    __slots__ = ("epoch", "recent")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.recent: deque[BatchMeta] = deque(maxlen=RECENT_BATCHES)


class ProducerStateTable:
    """Producer state of one partition."""

    def __init__(self) -> None:
        self.producers: dict[int, _Producer] = {}

    def check(self, producer_id: int, epoch: int, base_sequence: int, record_count: int
              ) -> Decision:
        """Decide about one batch (raises on a sequence or epoch error). Changes nothing."""
        if producer_id < 0:
            return Decision(Verdict.APPEND, None)
        if base_sequence < 0:
            raise OutOfOrderSequenceError(
                f"producer {producer_id}: an idempotent batch needs base_sequence >= 0")
        state = self.producers.get(producer_id)
        if state is None:
            return Decision(Verdict.APPEND, None)
        if epoch < state.epoch:
            raise ProducerFencedError(
                f"producer {producer_id} epoch {epoch} is fenced by epoch {state.epoch}")
        if epoch > state.epoch:
            if base_sequence != 0:
                raise OutOfOrderSequenceError(
                    f"producer {producer_id}: a new epoch {epoch} must start at sequence 0")
            return Decision(Verdict.APPEND, None)
        last_sequence = (base_sequence + record_count - 1) % SEQUENCE_MODULUS
        for meta in state.recent:
            if meta.first_sequence == base_sequence and meta.last_sequence == last_sequence:
                return Decision(Verdict.DUPLICATE, meta)
        if not state.recent:
            return Decision(Verdict.APPEND, None)
        expected = (state.recent[-1].last_sequence + 1) % SEQUENCE_MODULUS
        if base_sequence != expected:
            raise OutOfOrderSequenceError(
                f"producer {producer_id}: sequence {base_sequence}, expected {expected}")
        return Decision(Verdict.APPEND, None)

    def record(self, producer_id: int, epoch: int, base_sequence: int, record_count: int,
               base_offset: int) -> None:
        """Remember a batch that was appended at `base_offset`."""
        if producer_id < 0:
            return
        state = self.producers.get(producer_id)
        if state is None or epoch > state.epoch:
            state = self.producers[producer_id] = _Producer(epoch)
        state.recent.append(BatchMeta(
            base_sequence, (base_sequence + record_count - 1) % SEQUENCE_MODULUS,
            base_offset, base_offset + record_count - 1))

    def plan(self, batches: Sequence[tuple[int, int, int, int]]) -> list[Decision]:
        """Decide about the batches of one produce request in order, each seeing the previous.

        `batches`: (producer_id, epoch, base_sequence, record_count). Raises at the first bad
        one (the whole request is refused then: nothing written). Duplicate batches are to be
        left out of the append; APPEND ones are to be recorded after the append.
        """
        scratch = ProducerStateTable()
        for producer_id in {b[0] for b in batches if b[0] >= 0}:
            state = self.producers.get(producer_id)
            if state is not None:
                copy = scratch.producers[producer_id] = _Producer(state.epoch)
                copy.recent.extend(state.recent)
        decisions = []
        for producer_id, epoch, sequence, count in batches:
            decision = scratch.check(producer_id, epoch, sequence, count)
            if decision.verdict is Verdict.APPEND:
                scratch.record(producer_id, epoch, sequence, count, -1)
            decisions.append(decision)
        return decisions

    def record_headers(self, headers: Iterable[batch.BatchHeader]) -> None:
        for header in headers:
            if header.producer_id >= 0:
                self.record(header.producer_id, header.producer_epoch, header.base_sequence,
                            header.record_count, header.base_offset)

    def snapshot(self) -> list[list[object]]:
        return [[producer_id, state.epoch, [list(meta) for meta in state.recent]]
                for producer_id, state in self.producers.items()]

    @classmethod
    def from_snapshot(cls, entries: Iterable[Sequence[Any]]) -> ProducerStateTable:
        table = cls()
        for producer_id, epoch, recent in entries:
            state = table.producers[int(producer_id)] = _Producer(int(epoch))
            state.recent.extend(BatchMeta(*map(int, meta)) for meta in recent)
        return table

    @classmethod
    def rebuild(cls, partition: PartitionLog, base: ProducerStateTable | None = None,
                from_offset: int = 0) -> ProducerStateTable:
        """The state implied by the batch headers of the partition (no body is decoded): of all
        of them, or of those from `from_offset` on added to `base` (a snapshot's table).
        Blocking for as long as the walk takes; a server uses `ProducerRebuild` in steps."""
        rebuild = ProducerRebuild(partition, base, from_offset)
        while not rebuild.step(_READ_CHUNK):
            pass
        return rebuild.table


class ProducerRebuild:
    """`ProducerStateTable.rebuild` in steps of a bounded number of bytes, so a server can walk
    a long log (after a crash, or on becoming a partition's leader) between other requests.
    Each step reads from where the last ended up to the partition's end at that moment, so
    batches appended between steps are included."""

    def __init__(self, partition: PartitionLog, base: ProducerStateTable | None = None,
                 from_offset: int = 0) -> None:
        self.partition = partition
        self.table = base if base is not None else ProducerStateTable()
        self.offset = max(partition.start_offset, from_offset)
        self.bytes_read = 0
        self.generation = 0  # set by the owner to tell a stale rebuild from a current one

    def step(self, max_bytes: int) -> bool:
        """Walk about `max_bytes` more of the log; True once the table covers all of it."""
        partition = self.partition
        self.offset = max(self.offset, partition.start_offset)  # retention may have moved it
        if self.offset >= partition.end_offset:
            return True
        fetched = partition.read(self.offset, max_bytes)
        for view in fetched.views:
            try:
                self.bytes_read += len(view)
                self.table.record_headers(_headers(view))
            finally:
                view.release()
        self.offset = max(self.offset + 1, fetched.next_offset)
        return self.offset >= partition.end_offset


def _headers(view: memoryview) -> Iterable[batch.BatchHeader]:
    return (header for _, header in batch.iter_batches(view))


class ProducerSnapshots:
    """The producer tables saved by the last clean shutdown (see the module docstring)."""

    VERSION: Final = 1

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / "snapshot"

    def take(self) -> dict[tuple[str, int], tuple[int, ProducerStateTable]]:
        """Read and delete the saved tables: (topic, partition) -> (end_offset, table). A file
        that does not parse is ignored (the tables are then rebuilt from the log)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            loaded = msgpack.unpackb(data, raw=False, strict_map_key=False)
            if loaded.get("version") != self.VERSION:
                raise ValueError(f"snapshot version {loaded.get('version')!r}")
            tables = {(str(topic), int(partition)): (int(end), ProducerStateTable.from_snapshot(entries))
                      for topic, partition, end, entries in loaded["partitions"]}
        except Exception as exc:  # any damage: fall back to rebuilding from the log
            log.warning("ignoring unreadable producer snapshot %s: %s", self.path, exc)
            tables = {}
        self.path.unlink()
        _fsync_directory(self.path.parent)
        return tables

    def save(self, tables: Iterable[tuple[str, int, int, ProducerStateTable]]) -> None:
        """Write (topic, partition, end_offset, table) atomically; call after the last append."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = msgpack.packb({"version": self.VERSION, "partitions": [
            [topic, partition, end, table.snapshot()] for topic, partition, end, table in tables]})
        temporary = self.path.with_name(self.path.name + ".tmp")
        with open(temporary, "wb") as file:
            file.write(body)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)  # fsync before rename: never a named, empty snapshot
        _fsync_directory(self.path.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ProducerIds:
    """Hands out producer ids, never the same twice (blocks reserved durably in a journal)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._next = 0
        self._reserved_end = 0

    @classmethod
    def open(cls, directory: Path) -> ProducerIds:
        ids = cls(Journal.open(directory))
        for key, value in ids.journal.replay():
            if key == _ID_KEY and value is not None:
                ids._reserved_end = max(ids._reserved_end, msgpack.unpackb(value))
        ids._next = ids._reserved_end  # ids of a block reserved before a restart are skipped
        return ids

    def allocate(self, now_ms: int, *, flush: bool = True) -> int:
        """A fresh producer id. With flush, blocks (fsync) when a new block has to be reserved;
        without, the caller must not hand the id out before `reservation_position()` is durable
        (a crash before that would reuse the ids of the unrecorded block)."""
        if self._next >= self._reserved_end:
            end = self._next + ID_BLOCK
            self.journal.append([(_ID_KEY, msgpack.packb(end))], now_ms)
            if flush:
                self.journal.flush()
            self._reserved_end = end
            self.journal.maybe_compact(lambda: [(_ID_KEY, msgpack.packb(end))], now_ms)
        producer_id = self._next
        self._next += 1
        return producer_id

    def reservation_position(self) -> tuple[FlushTarget, int]:
        """The journal position covering the current block's reservation (see `Journal.position`)."""
        return self.journal.position()

    def close(self, clean: bool = True) -> None:
        self.journal.close(clean)


MAX_EPOCH: Final = (1 << 15) - 1  # producer_epoch is an i16 in the batch header
NAME_KEY_VERSION: Final = 2  # offsets use 1: both may share one internal partition (cluster mode)


class NamedProducer(NamedTuple):
    producer_id: int
    epoch: int


class ProducerNames:
    """Stable producer names (Kafka's transactional id) -> (producer id, epoch), on a journal.

    INIT_PRODUCER with a name returns the name's producer id with its epoch bumped, so the
    partition leaders, which refuse batches of an older epoch of a producer id once they have
    seen a newer one (`ProducerStateTable`), fence the older instances. Record format (msgpack,
    inside the journal's record batches): key ``[2, name]``, value ``[producer_id, epoch,
    assigned_ms]``. Standalone the journal is ``<data_dir>/coordination/producer_names``; in
    cluster mode it is the name's partition of the internal topic (docs/cluster.md).
    """

    def __init__(self, journal: Journal | LogJournal) -> None:
        self.journal = journal
        self.names: dict[str, NamedProducer] = {}

    @classmethod
    def open(cls, directory: Path) -> ProducerNames:
        names = cls(Journal.open(directory))
        for key, value in names.journal.replay():
            names.apply(key, value)
        return names

    @staticmethod
    def is_name_key(key: bytes) -> bool:
        decoded = msgpack.unpackb(key)
        return isinstance(decoded, list) and bool(decoded) and decoded[0] == NAME_KEY_VERSION

    def apply(self, key: bytes, value: bytes | None) -> None:
        _, name = msgpack.unpackb(key)
        if value is None:
            self.names.pop(name, None)
            return
        producer_id, epoch, _ = msgpack.unpackb(value)
        self.names[name] = NamedProducer(producer_id, epoch)

    def next_for(self, name: str) -> NamedProducer | None:
        """The id and epoch the next INIT_PRODUCER of `name` gets; None: it needs a new id (an
        unknown name, or its epochs are used up)."""
        current = self.names.get(name)
        if current is None or current.epoch >= MAX_EPOCH:
            return None
        return NamedProducer(current.producer_id, current.epoch + 1)

    def assign(self, now_ms: int, name: str, producer: NamedProducer) -> None:
        """Record `name` -> producer (one journal batch); the caller waits for it to be durable."""
        key = msgpack.packb([NAME_KEY_VERSION, name])
        value = msgpack.packb([producer.producer_id, producer.epoch, now_ms])
        self.journal.append([(key, value)], now_ms)
        self.apply(key, value)
        self.journal.maybe_compact(self.live_entries, now_ms)

    def live_entries(self) -> list[tuple[bytes, bytes | None]]:
        return [(msgpack.packb([NAME_KEY_VERSION, name]), msgpack.packb([p.producer_id, p.epoch, 0]))
                for name, p in self.names.items()]

    def close(self, clean: bool = True) -> None:
        self.journal.close(clean)
