"""The pure parts of cluster-wide queue subscriptions (docs/cluster.md, "Queue subscriptions"):
acks a new coordinator has not read yet, queue state sharing an internal partition with
committed offsets and producer names, and the window a coordinator reads a partition it holds
no replica of through. No sockets: real PartitionLogs in a temp directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from rustmq.coordination import internal_topic
from rustmq.coordination.journal import LogJournal, LogReplay
from rustmq.coordination.producers import NamedProducer
from rustmq.coordination.queue import QueueError, QueueSettings, QueueSubscription, SharedJournal
from rustmq.protocol import batch, records
from rustmq.replication.queue_sources import RemoteWindow
from rustmq.server.group_stores import PartitionStores
from rustmq.storage.config import LogConfig
from rustmq.storage.partition import PartitionLog


def one_batch(values: list[bytes]) -> bytes:
    body = records.encode_body([[0, None, v, None] for v in values])
    return batch.build_batch(body, record_count=len(values), first_timestamp_ms=1, max_timestamp_ms=1)


def partition(tmp_path: Path, name: str = "p") -> PartitionLog:
    return PartitionLog.open(tmp_path / name, LogConfig())


def test_an_ack_up_to_the_known_end_is_taken_before_the_records_are_read() -> None:
    sub = QueueSubscription("workers", "jobs", 0)
    with pytest.raises(QueueError):
        sub.ack([5])  # never offered and nothing says it exists
    with pytest.raises(QueueError):
        sub.ack([10], known_end=10)  # at the high watermark: does not exist yet
    assert sub.ack([5, 0], known_end=10).acked == 2
    assert sub.ack_floor == 1 and sub.done == {5}
    sub.offer(0, 0, 10, 1)  # read afterwards: the acked ones are not delivered
    delivery = sub.acquire(0, "c", 100)
    assert delivery is not None
    delivered = [o for start, end in delivery.ranges for o in range(start, end)]
    assert delivered == [1, 2, 3, 4, 6, 7, 8, 9]
    assert sub.ack([5]).duplicates == 1


def test_queue_state_shares_an_internal_partition_with_offsets_and_names(tmp_path: Path) -> None:
    plog = partition(tmp_path)
    stores = PartitionStores(LogJournal(plog, leader_epoch=3), QueueSettings())
    offsets, names, queues = stores.offsets, stores.names, stores.queues
    # A group whose id is exactly a queue coordination key stays a group.
    key = internal_topic.queue_key("jobs")
    offsets.commit(1, key, {("jobs", 0): 7})
    names.assign(1, "etl", NamedProducer(42, 1))
    sub = queues.get("workers", "jobs", 0)
    sub.offer(1, 0, 20, 1)
    sub.ack(range(0, 12))
    failed = sub.acquire(1, "c", 1)
    assert failed is not None
    sub.nack(2, [12])
    queues.configure(2, "jobs", "workers", {"max_deliveries": 2})
    queues.persist(3)
    # The partition's snapshot (what compaction appends) holds the queue state too.
    assert any(SharedJournal.is_queue_key(key) for key, _ in stores.live_entries())

    replayed = PartitionStores(LogJournal(plog, leader_epoch=4), QueueSettings())
    replay = LogReplay(plog, replayed.apply, replayed.reset)
    assert replay.step(1 << 20)
    replayed.replayed()
    offsets2, names2, queues2 = replayed.offsets, replayed.names, replayed.queues
    assert offsets2.fetch(key) and offsets2.fetch(key)[("jobs", 0)].offset == 7
    assert names2.names == {"etl": NamedProducer(42, 1)}
    restored = queues2.subscriptions[("workers", "jobs", 0)]
    assert restored.ack_floor == 12 and restored.failures == {12: 1}
    assert restored.settings.max_deliveries == 2
    assert ("workers", "jobs") in queues2.subscription_names()
    plog.close()


def window_over(tmp_path: Path, floor: list[int], *, max_bytes: int = 1 << 20) -> tuple[RemoteWindow, PartitionLog]:
    source = partition(tmp_path, "leader")
    for start in range(0, 30, 3):  # ten batches of three records: offsets 0..29
        source.append(one_batch([b"r%d" % i for i in range(start, start + 3)]))
    window = RemoteWindow("jobs", 0, 0, leader=lambda: None, floor=lambda: floor[0], wake=lambda: None,
                          max_bytes=max_bytes)
    return window, source


def test_the_window_reads_like_a_partition_and_drops_what_is_below_the_floor(tmp_path: Path) -> None:
    floor = [0]
    window, source = window_over(tmp_path, floor)
    fetched = source.read(0, 1 << 20)
    for view in fetched.views:
        window.add(view)
        window.add(view)  # a repeated fetch adds nothing
        view.release()
    assert window.end_offset == 30
    whole = window.size_bytes
    got = window.read(7, 1)  # at least the one batch holding offset 7
    assert got.next_offset == 9 and len(got.views) == 1
    assert batch.read_header(got.views[0], 0).base_offset == 6
    assert window.read(30, 1 << 20).views == []  # not fetched yet
    floor[0] = 10  # settled below 10: the batches ending at or below it go
    got = window.read(10, 1 << 20)
    assert batch.read_header(got.views[0], 0).base_offset == 9
    assert window.size_bytes < whole
    assert window.read(3, 1 << 20).views == []  # dropped: nothing reads below the floor again
    floor[0] = 30
    assert window.read(29, 1).views == [] and window.size_bytes == 0
    source.close()
