"""Committed offsets of stream consumer groups, kept durably in the broker's own journal.

(Cluster mode: the same store on a `LogJournal`, one per partition of the replicated internal
topic this broker leads; docs/cluster.md.)

One `Journal` (``<data_dir>/coordination/consumer_offsets``) holds one record per committed
(group, topic, partition). Record format (msgpack, inside the journal's record batches)::

    key   = [1, group:str, topic:str, partition:int]          (1 = key format version)
    value = [offset:int, metadata:str, commit_ms:int]          or nil: the commit was deleted

The last record for a key wins; compaction rewrites the live map as a new journal generation
(see `journal`), so the journal stays about as large as the number of committed partitions.
A commit is one batch (atomic: all partitions of a commit request or none) and is durable once
`flush()` (or the server's GroupCommitter on `journal.partition`) returns; the server answers
a commit only then, so an acknowledged commit survives a crash.

An offset is "the next offset to consume", as in Kafka: committing 42 means 0..41 are done.
Lag of a partition = log end offset - committed offset (or - log start offset when the group
never committed there; it consumes from its reset point).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final, NamedTuple

import msgpack

from rustmq.coordination.journal import DEFAULT_COMPACT_BYTES, Entry, Journal, LogJournal

MAX_METADATA_BYTES: Final = 4096
KEY_VERSION: Final = 1

TopicPartition = tuple[str, int]


class InvalidCommitError(ValueError):
    """A commit request with a bad offset, partition or metadata (nothing is written)."""

    code = "INVALID_COMMIT"


class Committed(NamedTuple):
    offset: int
    metadata: str
    commit_ms: int


class OffsetStore:
    """group -> (topic, partition) -> Committed, restored from and persisted to a Journal."""

    def __init__(self, journal: Journal | LogJournal) -> None:
        self.journal = journal
        self._groups: dict[str, dict[TopicPartition, Committed]] = {}

    @classmethod
    def open(cls, directory: Path, *, compact_bytes: int = DEFAULT_COMPACT_BYTES) -> OffsetStore:
        return cls.replayed(Journal.open(directory, compact_bytes=compact_bytes))

    @classmethod
    def replayed(cls, journal: Journal | LogJournal) -> OffsetStore:
        """The store rebuilt from everything `journal` holds (either backend)."""
        store = cls(journal)
        for key, value in store.journal.replay():
            store._apply(key, value)
        return store

    # ------------------------------------------------------------------------------- queries

    def groups(self) -> list[str]:
        return sorted(self._groups)

    def fetch_groups_view(self) -> Mapping[str, object]:
        """The groups with committed offsets, as a read-only view (membership tests)."""
        return self._groups

    def fetch(self, group: str, partitions: Iterable[TopicPartition] | None = None
              ) -> dict[TopicPartition, Committed]:
        """Committed offsets of `group` (only the partitions asked for, when given)."""
        committed = self._groups.get(group, {})
        if partitions is None:
            return dict(committed)
        return {tp: committed[tp] for tp in partitions if tp in committed}

    def lag(self, group: str, end_offsets: Mapping[TopicPartition, int],
            start_offsets: Mapping[TopicPartition, int] | None = None) -> dict[TopicPartition, int]:
        """Per-partition lag of `group` for the partitions in `end_offsets` (never negative)."""
        committed = self._groups.get(group, {})
        result = {}
        for tp, end in end_offsets.items():
            done = committed.get(tp)
            position = done.offset if done is not None else (start_offsets or {}).get(tp, 0)
            result[tp] = max(0, end - position)
        return result

    def min_committed(self, groups: Iterable[str], tp: TopicPartition) -> int | None:
        """The smallest committed offset of `groups` on `tp`: what "keep the log until these
        groups consumed it" may delete below. 0 if one of them never committed there; None if
        `groups` is empty."""
        result: int | None = None
        for group in groups:
            done = self._groups.get(group, {}).get(tp)
            offset = 0 if done is None else done.offset
            result = offset if result is None else min(result, offset)
        return result

    # ------------------------------------------------------------------------------- commands

    def commit(self, now_ms: int, group: str, offsets: Mapping[TopicPartition, int],
               metadata: str = "") -> int:
        """Record `offsets` for `group` as one atomic journal batch; return its last journal offset.

        Validate first (InvalidCommitError, nothing written), then append, then update memory.
        The caller makes it durable (`flush`) before acknowledging the client.
        """
        if not group:
            raise InvalidCommitError("group must be a non-empty string")
        if not offsets:
            raise InvalidCommitError("a commit needs at least one partition")
        if len(metadata.encode()) > MAX_METADATA_BYTES:
            raise InvalidCommitError(f"metadata is longer than {MAX_METADATA_BYTES} bytes")
        entries: list[Entry] = []
        for (topic, partition), offset in offsets.items():
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
                raise InvalidCommitError(f"{topic}/{partition}: offset must be an integer >= 0")
            if not isinstance(partition, int) or partition < 0 or not topic:
                raise InvalidCommitError(f"invalid partition {topic!r}/{partition!r}")
            entries.append((_key(group, topic, partition),
                            msgpack.packb([offset, metadata, now_ms])))
        last = self.journal.append(entries, now_ms)
        for key, value in entries:
            self._apply(key, value)
        self._maybe_compact(now_ms)
        return last

    def delete_group(self, now_ms: int, group: str) -> int:
        """Forget every committed offset of `group` (tombstones); returns how many were removed."""
        committed = self._groups.get(group)
        if not committed:
            return 0
        entries: list[Entry] = [(_key(group, t, p), None) for (t, p) in committed]
        self.journal.append(entries, now_ms)
        del self._groups[group]
        self._maybe_compact(now_ms)
        return len(entries)

    def flush(self) -> int:
        return self.journal.flush()

    def close(self, clean: bool = True) -> None:
        self.journal.close(clean)

    # ------------------------------------------------------------------------------- internals

    def live_entries(self) -> list[Entry]:
        return [
            (_key(group, topic, partition), msgpack.packb(list(c)))
            for group, committed in self._groups.items()
            for (topic, partition), c in committed.items()
        ]

    def _maybe_compact(self, now_ms: int) -> None:
        self.journal.maybe_compact(self.live_entries, now_ms)

    def apply(self, key: bytes, value: bytes | None) -> None:
        """Apply one journal entry (replay of a journal shared with other stores)."""
        self._apply(key, value)

    def _apply(self, key: bytes, value: bytes | None) -> None:
        version, group, topic, partition = msgpack.unpackb(key)
        if version != KEY_VERSION:
            raise ValueError(f"unknown offset key version {version}")
        tp = (topic, partition)
        if value is None:
            committed = self._groups.get(group)
            if committed is not None:
                committed.pop(tp, None)
                if not committed:
                    del self._groups[group]
            return
        offset, metadata, commit_ms = msgpack.unpackb(value)
        self._groups.setdefault(group, {})[tp] = Committed(offset, metadata, commit_ms)


def _key(group: str, topic: str, partition: int) -> bytes:
    return msgpack.packb([KEY_VERSION, group, topic, partition])
