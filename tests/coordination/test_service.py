"""The Coordinator facade on a real storage Log: groups with lag, queues with a DLQ topic,
idempotent produce decisions, and state that survives closing and reopening everything."""

from __future__ import annotations

from pathlib import Path

import pytest

from rustmq.coordination import group as group_mod
from rustmq.coordination import queue
from rustmq.coordination.producers import Verdict
from rustmq.coordination.service import Coordinator
from rustmq.protocol import batch, records
from rustmq.storage.config import LogConfig
from rustmq.storage.log import Log

CONFIG = LogConfig(segment_bytes=1 << 16)


def open_all(data: Path, incarnation: str = "a") -> tuple[Log, Coordinator]:
    log = Log.open(data, CONFIG, background_flusher=False)
    return log, Coordinator.open(data, log, incarnation=incarnation)


def close_all(log: Log, coordinator: Coordinator) -> None:
    coordinator.close()
    log.close()


def produce(log: Log, topic: str, partition: int, n: int, *, pid: int = -1, seq: int = -1,
            headers=None) -> bytes:
    recs = [[0, None, b"v%d" % i, (headers or {}).get(i)] for i in range(n)]
    built = batch.build_batch(records.encode_body(recs), record_count=n, first_timestamp_ms=1,
                              max_timestamp_ms=1, producer_id=pid, producer_epoch=0,
                              base_sequence=seq)
    log.topic(topic).partitions[partition].append(built)
    return built


def wait_durable(durable) -> None:
    if durable is not None:
        durable.partition.flush()
        assert durable.partition.durable_offset > durable.offset


def test_group_commit_lag_and_restart(tmp_path: Path) -> None:
    log, coord = open_all(tmp_path)
    log.create_topic("orders", 3)
    for p in range(3):
        produce(log, "orders", p, 10)
    a = coord.join_group(0, "billing", ["orders"], client_id="a")
    b = coord.join_group(0, "billing", ["orders"], client_id="b")
    with pytest.raises(group_mod.IllegalGenerationError):
        coord.commit_offsets(1, "billing", a.member_id, a.generation, {a.assignment[0]: 1})
    view = coord.heartbeat(1, "billing", a.member_id, a.generation)
    wait_durable(coord.commit_offsets(2, "billing", view.member_id, view.generation,
                                      {tp: 4 for tp in view.assignment}))
    lag = coord.group_lag("billing")
    assert sum(lag.values()) == 30 - 4 * len(view.assignment)
    described = coord.describe_group("billing")
    assert len(described["members"]) == 2 and len(described["lag"]) == 3
    assert coord.next_deadline_ms() == 10_000
    coord.tick(10_001)
    assert coord.describe_group("billing")["state"] == "empty"
    close_all(log, coord)

    log, coord = open_all(tmp_path, incarnation="b")
    assert coord.list_groups() == ["billing"]
    assert coord.fetch_offsets("billing") == {tp: 4 for tp in view.assignment}
    with pytest.raises(group_mod.UnknownMemberError):
        coord.heartbeat(0, "billing", b.member_id, b.generation)
    close_all(log, coord)


def test_queue_acks_dead_letters_and_restart(tmp_path: Path) -> None:
    log, coord = open_all(tmp_path)
    log.create_topic("jobs", 2)
    produce(log, "jobs", 1, 6)
    got = coord.queue_fetch(0, "workers", "jobs", 1, "c1", 10)
    assert got is not None and got.delivery.record_count == 6
    for view in got.views:
        view.release()
    result, durable = coord.queue_ack(1, "workers", "jobs", 1, [0, 1, 3])
    assert result.acked == 3
    wait_durable(durable)
    for attempt in range(queue.QueueSettings().max_deliveries):
        wait_durable(coord.queue_nack(2 + attempt, "workers", "jobs", 1, [2], reason="bad"))
        fetched = coord.queue_fetch(2 + attempt, "workers", "jobs", 1, "c1", 1)
        if fetched is not None:
            for view in fetched.views:
                view.release()
    dlq = log.topic("jobs.workers.dlq")
    assert len(dlq.partitions) == 2 and dlq.partitions[1].end_offset == 1
    coord.flush_dead_letters()  # what the server does once the DLQ append is durable
    wait_durable(coord.consumer_gone(10, "c1"))  # 4 and 5 back to available
    close_all(log, coord)

    log, coord = open_all(tmp_path)
    fetched = coord.queue_fetch(20, "workers", "jobs", 1, "c2", 10)
    assert fetched is not None
    offsets = sorted(o for s, e in fetched.delivery.ranges for o in range(s, e))
    for view in fetched.views:
        view.release()
    assert offsets == [4, 5]  # acked and dead-lettered records never come back
    assert coord.metrics()["queues"][0]["in_flight"] == 2
    close_all(log, coord)


def test_idempotent_produce_survives_restart(tmp_path: Path) -> None:
    log, coord = open_all(tmp_path)
    log.create_topic("t", 1)
    pid = coord.init_producer(0)
    request = produce(log, "t", 0, 5, pid=pid, seq=0)
    coord.record_produce("t", 0, request, 0)
    assert [d.verdict for d in coord.plan_produce("t", 0, request)] == [Verdict.DUPLICATE]
    close_all(log, coord)
    log, coord = open_all(tmp_path)
    decisions = coord.plan_produce("t", 0, request)
    assert decisions[0].verdict is Verdict.DUPLICATE and decisions[0].original.base_offset == 0
    assert coord.init_producer(0) != pid
    close_all(log, coord)


def test_unknown_topic_and_partition_are_clear_errors(tmp_path: Path) -> None:
    from rustmq.coordination.service import UnknownPartitionError
    from rustmq.storage import errors

    log, coord = open_all(tmp_path)
    log.create_topic("t", 1)
    with pytest.raises(UnknownPartitionError, match="no partition 3"):
        coord.queue_fetch(0, "s", "t", 3, "c", 1)
    with pytest.raises(errors.UnknownTopicError):
        coord.queue_fetch(0, "s", "nope", 0, "c", 1)
    close_all(log, coord)


def _count_headers_walked(monkeypatch) -> list[int]:
    from rustmq.coordination import producers

    walked = [0]
    original = producers._headers

    def counting(view):  # type: ignore[no-untyped-def]
        for header in original(view):
            walked[0] += 1
            yield header

    monkeypatch.setattr(producers, "_headers", counting)
    return walked


def test_a_clean_shutdown_saves_producer_state_and_the_next_start_walks_only_newer_batches(
        tmp_path: Path, monkeypatch) -> None:
    log, coord = open_all(tmp_path)
    log.create_topic("t", 1)
    pid = coord.init_producer(0)
    first = produce(log, "t", 0, 5, pid=pid, seq=0)
    coord.record_produce("t", 0, first, 0)
    for _ in range(30):
        produce(log, "t", 0, 2)  # plain batches: walked by a full rebuild, not after a snapshot
    close_all(log, coord)
    assert (tmp_path / "coordination" / "producer_state" / "snapshot").exists()

    walked = _count_headers_walked(monkeypatch)
    log, coord = open_all(tmp_path)
    assert not (tmp_path / "coordination" / "producer_state" / "snapshot").exists()  # taken
    produce(log, "t", 0, 1)  # appended after the snapshot: the one header walked
    decisions = coord.plan_produce("t", 0, first)
    assert decisions[0].verdict is Verdict.DUPLICATE and decisions[0].original.base_offset == 0
    assert walked[0] == 1
    nxt = produce(log, "t", 0, 3, pid=pid, seq=5)  # the sequence continues from the snapshot
    coord.record_produce("t", 0, nxt, log.topic("t").partitions[0].end_offset - 3)
    close_all(log, coord)

    # A crash (no clean close) leaves no snapshot: the next start rebuilds from every header.
    log, coord = open_all(tmp_path)
    coord.producer_state("t", 0)
    coord.close(clean=False)
    log.close(clean=False)
    assert not (tmp_path / "coordination" / "producer_state" / "snapshot").exists()
    walked[0] = 0
    log, coord = open_all(tmp_path)
    assert [d.verdict for d in coord.plan_produce("t", 0, nxt)] == [Verdict.DUPLICATE]
    assert walked[0] == 33
    close_all(log, coord)


def test_a_snapshot_that_does_not_fit_the_log_is_not_used(tmp_path: Path, monkeypatch) -> None:
    from rustmq.coordination.producers import ProducerSnapshots, ProducerStateTable

    log, coord = open_all(tmp_path)
    log.create_topic("t", 1)
    produce(log, "t", 0, 4, pid=7, seq=0)
    close_all(log, coord)
    snapshots = ProducerSnapshots(tmp_path / "coordination" / "producer_state")
    bogus = ProducerStateTable()
    bogus.record(7, 0, 100, 1, 50)  # a state the log does not hold, ending beyond the log's end
    snapshots.save([("t", 0, 999, bogus)])
    log, coord = open_all(tmp_path)
    following = batch.build_batch(records.encode_body([[0, None, b"x", None]] * 2), record_count=2,
                                  first_timestamp_ms=1, max_timestamp_ms=1, producer_id=7,
                                  producer_epoch=0, base_sequence=4)
    # The bogus table would expect sequence 101 (OutOfOrderSequenceError); the log says 4.
    assert coord.plan_produce("t", 0, following)[0].verdict is Verdict.APPEND
    log.topic("t").partitions[0].append(following)
    coord.record_produce("t", 0, following, 4)
    close_all(log, coord)

    (tmp_path / "coordination" / "producer_state" / "snapshot").write_bytes(b"\x93garbage")
    log, coord = open_all(tmp_path)  # an unreadable snapshot is ignored (logged), not fatal
    assert coord.producer_state("t", 0).producers[7].recent[-1].last_sequence == 5
    close_all(log, coord)

    # A topic deleted and re-created after the start does not inherit the saved table.
    log, coord = open_all(tmp_path)
    log.delete_topic("t")
    log.create_topic("t", 1)
    assert coord.producer_state("t", 0).producers == {}
    close_all(log, coord)
