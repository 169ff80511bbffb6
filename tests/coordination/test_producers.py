"""Idempotent producer bookkeeping: sequence checks, fencing, rebuild from a real log, id allocation."""

from __future__ import annotations

from pathlib import Path

import pytest

from rustmq.coordination import producers as p
from rustmq.coordination.producers import ProducerIds, ProducerStateTable, Verdict
from rustmq.protocol import batch
from rustmq.storage.config import LogConfig
from rustmq.storage.partition import PartitionLog


def test_sequences_duplicates_and_gaps() -> None:
    table = ProducerStateTable()
    assert table.check(7, 0, 0, 10).verdict is Verdict.APPEND
    table.record(7, 0, 0, 10, base_offset=100)
    dup = table.check(7, 0, 0, 10)
    assert dup.verdict is Verdict.DUPLICATE and dup.original == (0, 9, 100, 109)
    assert table.check(7, 0, 10, 5).verdict is Verdict.APPEND
    with pytest.raises(p.OutOfOrderSequenceError):
        table.check(7, 0, 12, 5)  # a gap
    with pytest.raises(p.OutOfOrderSequenceError):
        table.check(7, 0, 5, 5)  # overlaps an appended batch but is not one of them
    assert table.check(-1, -1, -1, 3).verdict is Verdict.APPEND  # not idempotent


def test_only_recent_batches_are_recognised_as_duplicates() -> None:
    table = ProducerStateTable()
    for i in range(p.RECENT_BATCHES + 1):
        table.record(1, 0, i * 2, 2, i * 2)
    with pytest.raises(p.OutOfOrderSequenceError):
        table.check(1, 0, 0, 2)  # too old to remember: refused rather than written twice
    assert table.check(1, 0, 2, 2).verdict is Verdict.DUPLICATE


def test_epochs_fence_zombies_and_restart_sequences() -> None:
    table = ProducerStateTable()
    table.record(1, 3, 0, 1, 0)
    with pytest.raises(p.ProducerFencedError):
        table.check(1, 2, 1, 1)
    with pytest.raises(p.OutOfOrderSequenceError):
        table.check(1, 4, 5, 1)
    assert table.check(1, 4, 0, 1).verdict is Verdict.APPEND


def test_sequence_wraps() -> None:
    table = ProducerStateTable()
    table.record(1, 0, p.SEQUENCE_MODULUS - 2, 2, 0)
    assert table.check(1, 0, 0, 1).verdict is Verdict.APPEND


def test_plan_sees_earlier_batches_of_the_same_request() -> None:
    table = ProducerStateTable()
    table.record(1, 0, 0, 5, 0)
    decisions = table.plan([(1, 0, 5, 5), (1, 0, 10, 5), (1, 0, 0, 5), (2, 0, 0, 1)])
    assert [d.verdict for d in decisions] == [Verdict.APPEND, Verdict.APPEND, Verdict.DUPLICATE,
                                              Verdict.APPEND]
    assert table.check(1, 0, 5, 5).verdict is Verdict.APPEND  # plan changed nothing
    with pytest.raises(p.OutOfOrderSequenceError):
        table.plan([(1, 0, 5, 5), (1, 0, 11, 1)])


def _batch(pid: int, seq: int, count: int) -> bytes:
    return batch.build_batch(b"x" * count, record_count=count, first_timestamp_ms=1,
                             max_timestamp_ms=1, producer_id=pid, producer_epoch=0,
                             base_sequence=seq)


def test_state_is_rebuilt_from_a_reopened_log(tmp_path: Path) -> None:
    config = LogConfig(segment_bytes=4096)
    log = PartitionLog.open(tmp_path / "p", config)
    table = ProducerStateTable()
    for seq in range(0, 300, 3):  # several segments
        request = _batch(9, seq, 3) + _batch(-1, -1, 1)
        decisions = table.plan([(9, 0, seq, 3), (-1, -1, -1, 1)])
        assert all(d.verdict is Verdict.APPEND for d in decisions)
        result = log.append(request)
        table.record(9, 0, seq, 3, result.base_offset)
    assert log.segment_count > 1
    log.close(clean=False)  # as after a crash: recovery scans
    log = PartitionLog.open(tmp_path / "p", config)
    rebuilt = ProducerStateTable.rebuild(log)
    retry = rebuilt.check(9, 0, 297, 3)
    assert retry.verdict is Verdict.DUPLICATE
    assert retry.original == table.check(9, 0, 297, 3).original
    assert rebuilt.check(9, 0, 300, 1).verdict is Verdict.APPEND
    log.close()


def test_producer_ids_are_never_reused_across_restarts(tmp_path: Path) -> None:
    ids = ProducerIds.open(tmp_path / "ids")
    first = [ids.allocate(0) for _ in range(5)]
    ids.close(clean=False)
    ids = ProducerIds.open(tmp_path / "ids")
    second = [ids.allocate(0) for _ in range(p.ID_BLOCK + 5)]
    ids.close()
    assert first == list(range(5))
    assert not set(first) & set(second) and len(set(second)) == len(second)
    third = ProducerIds.open(tmp_path / "ids")
    assert third.allocate(0) == 3 * p.ID_BLOCK
    third.close()


def test_producer_names_bump_epochs_survive_reopen_and_share_a_log_with_offsets(tmp_path: Path) -> None:
    from rustmq.coordination.journal import LogJournal
    from rustmq.coordination.offsets import OffsetStore

    names = p.ProducerNames.open(tmp_path / "names")
    assert names.next_for("etl") is None  # new: needs an id
    names.assign(1, "etl", p.NamedProducer(42, 0))
    assert names.next_for("etl") == p.NamedProducer(42, 1)
    names.assign(2, "etl", p.NamedProducer(42, 1))
    names.journal.flush()
    names.close()
    again = p.ProducerNames.open(tmp_path / "names")
    assert again.names == {"etl": p.NamedProducer(42, 1)}
    again.assign(3, "etl", p.NamedProducer(42, p.MAX_EPOCH))
    assert again.next_for("etl") is None  # epochs used up: a fresh id
    again.close()

    # Cluster mode: one replicated partition holds both kinds of record, one replay splits them.
    plog = PartitionLog.open(tmp_path / "shared", LogConfig())
    try:
        journal = LogJournal(plog, leader_epoch=3)
        OffsetStore(journal).commit(1, "billing", {("orders", 0): 7})
        p.ProducerNames(journal).assign(1, "billing", p.NamedProducer(5, 2))
        assert all(h.leader_epoch == 3 for _, h in batch.iter_batches(plog.read(0, 1 << 20).views[0]))
        offsets, replayed = OffsetStore(journal), p.ProducerNames(journal)
        for key, value in journal.replay():
            (replayed if p.ProducerNames.is_name_key(key) else offsets).apply(key, value)
        assert offsets.fetch("billing") and offsets.fetch("billing")[("orders", 0)].offset == 7
        assert replayed.names == {"billing": p.NamedProducer(5, 2)}
    finally:
        plog.close()
