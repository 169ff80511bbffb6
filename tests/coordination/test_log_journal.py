"""Compaction of a coordination partition (cluster mode's LogJournal) on a real PartitionLog:
snapshots, the log-start advance and the stepwise replay that starts over at a snapshot."""

from __future__ import annotations

from pathlib import Path

import pytest

from rustmq.coordination import journal as j
from rustmq.coordination.producers import NamedProducer
from rustmq.server.group_stores import PartitionStores
from rustmq.storage.config import LogConfig
from rustmq.storage.partition import PartitionLog

SEGMENT = 16 << 10
COMPACT = 16 << 10


def open_stores(tmp_path: Path, *, compact_bytes: int = COMPACT) -> tuple[PartitionLog, PartitionStores, list[int]]:
    plog = PartitionLog.open(tmp_path / "p", LogConfig(segment_bytes=SEGMENT, retention_ms=None))
    snapshots: list[int] = []
    journal = j.LogJournal(plog, 4, compact_bytes=compact_bytes, on_snapshot=snapshots.append)
    stores = PartitionStores(journal)
    journal.live = stores.live_entries
    return plog, stores, snapshots


def replayed(plog: PartitionLog, step: int = 4096) -> tuple[PartitionStores, j.LogReplay, int]:
    stores = PartitionStores(j.LogJournal(plog, 4))
    replay = j.LogReplay(plog, stores.apply, stores.reset)
    steps = 1
    while not replay.step(step):
        steps += 1
    return stores, replay, steps


def state(stores: PartitionStores) -> tuple[dict[str, object], dict[str, NamedProducer]]:
    return ({g: stores.offsets.fetch(g) for g in stores.offsets.groups()}, dict(stores.names.names))


def test_snapshots_bound_the_log_and_a_replay_from_the_new_start_restores_everything(tmp_path: Path) -> None:
    plog, stores, snapshots = open_stores(tmp_path)
    try:
        for i in range(3000):
            group = f"g{i % 40}"
            stores.offsets.commit(i, group, {("orders", i % 7): i})
            if i % 500 == 0:
                stores.names.assign(i, f"producer-{i}", NamedProducer(100 + i, 1))
        stores.offsets.delete_group(3001, "g7")  # a tombstone after the last snapshot...
        stores.offsets.commit(3002, "g8", {("orders", 0): 1})
        stores.offsets.delete_group(3003, "g8")
        journal = stores.journal
        assert len(snapshots) >= 5, "the tail passed compact_bytes many times"
        assert journal.snapshot_offset is not None and journal.snapshot_end == snapshots[-1]
        # The snapshot starts a segment: it becomes the log start exactly, once replicated.
        assert journal.advance_start(journal.snapshot_end - 1) == 0  # the HW has not passed it
        assert plog.start_offset == 0
        assert journal.advance_start(plog.end_offset) > 0
        assert plog.start_offset == journal.snapshot_offset
        assert plog.size_bytes <= 3 * COMPACT  # snapshot + tail, not 3000 commits

        again, replay, steps = replayed(plog)
        assert state(again) == state(stores)
        assert "g7" not in state(again)[0] and "g8" not in state(again)[0]
        assert replay.snapshot_offset == journal.snapshot_offset
        assert replay.tail_bytes == journal.tail_bytes
        assert steps > 1  # bounded steps

        # A replay from before the log-start advance (a follower's longer log) ends the same:
        # each marker starts the state afresh, so entries deleted meanwhile do not come back.
    finally:
        plog.close()


def test_a_replay_of_a_log_with_several_snapshots_drops_what_precedes_each(tmp_path: Path) -> None:
    plog, stores, snapshots = open_stores(tmp_path)
    try:
        for i in range(1500):
            stores.offsets.commit(i, f"old-{i % 30}", {("t", 0): i})
        first = len(snapshots)
        assert first >= 1
        for g in range(30):
            stores.offsets.delete_group(2000, f"old-{g}")
        for i in range(1500):
            stores.offsets.commit(3000 + i, f"new-{i % 30}", {("t", 0): i})
        assert len(snapshots) > first
        # Nothing deleted: the replay reads every snapshot and must still end at the live state.
        again, replay, _ = replayed(plog)
        assert state(again) == state(stores)
        assert not any(g.startswith("old-") for g in again.offsets.groups())
        assert replay.bytes_read == plog.size_bytes
    finally:
        plog.close()


def test_a_live_state_too_large_for_one_snapshot_is_not_compacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(j, "MAX_LOG_SNAPSHOT_BYTES", 256)
    plog, stores, snapshots = open_stores(tmp_path, compact_bytes=4096)
    try:
        for i in range(400):
            stores.offsets.commit(i, f"g{i}", {("t", 0): i})  # distinct keys: the live state passes 256 bytes before the tail passes 4 KiB
        assert snapshots == []
        again, _, _ = replayed(plog)
        assert state(again) == state(stores)
    finally:
        plog.close()


def test_a_partition_without_an_owner_state_never_compacts(tmp_path: Path) -> None:
    plog = PartitionLog.open(tmp_path / "p", LogConfig(segment_bytes=SEGMENT, retention_ms=None))
    try:
        journal = j.LogJournal(plog, 1, compact_bytes=4096)
        stores = PartitionStores(journal)  # journal.live not set: one store's share is not a snapshot
        for i in range(500):
            stores.offsets.commit(i, f"g{i}", {("t", 0): i})
        assert journal.compactions == 0 and journal.snapshot_offset is None
        assert journal.advance_start(plog.end_offset) == 0
    finally:
        plog.close()


def test_delete_before_keeps_the_active_segment_and_partial_segments(tmp_path: Path) -> None:
    from rustmq.protocol import batch

    plog = PartitionLog.open(tmp_path / "p", LogConfig(segment_bytes=4096, retention_ms=None))
    try:
        body = b"x" * 1000
        for _ in range(20):
            plog.append(batch.build_batch(body, record_count=1, first_timestamp_ms=0, max_timestamp_ms=0))
        assert plog.segment_count > 3
        plog.flush()
        sealed = plog.sealed_segments()
        second_base = sealed[1].base_offset
        for segment in sealed:
            segment.view.release()
        assert plog.delete_before(second_base + 1) == 1  # the second segment holds second_base + 1
        assert plog.start_offset == second_base
        count = plog.segment_count
        assert plog.delete_before(plog.end_offset + 100) == count - 1  # never the active one
        assert plog.segment_count == 1
        plog.roll()
        plog.roll()  # nothing appended since: no empty segment
        assert plog.segment_count == 2
        plog.append(batch.build_batch(body, record_count=1, first_timestamp_ms=0, max_timestamp_ms=0))
        assert plog.delete_before(plog.end_offset) == 1
        assert plog.start_offset == plog.end_offset - 1
    finally:
        plog.close()
