"""Segment blocks are allocated in steps ahead of the appends, not a whole segment up front.

An empty topic must cost (almost) no disk space whatever its segment size; a busy partition must
find its blocks allocated before it writes (so a full disk fails an append cleanly, see
test_disk_full); recovery must cope with files whose allocated or apparent size exceeds the data;
and topics must be creatable and deletable from a worker thread while the owner thread appends
and reads.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from rustmq.storage import config, errors, segment
from rustmq.storage.log import Log
from rustmq.storage.partition import PartitionLog
from storage_testlib import make_batch, read_all, small_config, stamped


def allocated_bytes(directory: Path) -> int:
    return sum(path.stat().st_blocks * 512 for path in directory.rglob("*") if path.is_file())


def test_an_empty_topic_allocates_almost_nothing(tmp_path: Path) -> None:
    log = Log.open(tmp_path, config.LogConfig(), background_flusher=False)  # 64 MiB segments
    for name in ("a", "b", "c", "d", "e", "f"):
        log.create_topic(name, partitions=12)
    used = allocated_bytes(tmp_path)
    assert used < 1 << 20, used  # was 6 x 12 x 64 MiB = 4.6 GiB
    active = next(tmp_path.glob("topics/a/0/*.log"))
    assert active.stat().st_size == 64 << 20  # apparent size: the capacity, as a sparse file
    log.close()


def test_blocks_are_allocated_ahead_of_the_write_position_in_bounded_steps(tmp_path: Path
                                                                           ) -> None:
    partition = PartitionLog.open(tmp_path, small_config(segment_bytes=64 << 20))
    active = partition._active  # noqa: SLF001 - the allocation watermark is the point here
    raw = make_batch(0, records=1, body_size=1000)
    partition.append(raw)
    assert active.size < active.allocated <= segment.PREALLOCATE_MIN_STEP + 8192
    appended = len(raw)
    while appended < 40 << 20:
        partition.append(raw)
        appended += len(raw)
        assert active.size <= active.allocated
        assert active.allocated - active.size <= segment.PREALLOCATE_MAX_STEP + 4096
    active._collect_file_work(wait=True)  # noqa: SLF001 - the thread's step ahead, if one runs
    assert active.allocated - active.size <= segment.PREALLOCATE_MAX_STEP + 4096
    on_disk = os.stat(active.path).st_blocks * 512
    assert active.size <= on_disk <= active.allocated + 4096
    partition.close()


def test_an_unclean_file_with_allocated_space_after_the_data_recovers(tmp_path: Path) -> None:
    partition = PartitionLog.open(tmp_path, small_config(segment_bytes=1 << 20))
    batches = [make_batch(i, records=2, body_size=300) for i in range(20)]
    for raw in batches:
        partition.append(raw)
    path = partition._active.path  # noqa: SLF001
    partition.close(clean=False)
    fd = os.open(path, os.O_RDWR)
    try:  # allocated zeros after the data and a hole after those, as a crash leaves them
        os.posix_fallocate(fd, 0, 512 << 10)
    finally:
        os.close(fd)
    reopened = PartitionLog.open(tmp_path, small_config(segment_bytes=1 << 20))
    assert reopened.recovery is not None and reopened.recovery.reason is None
    expected = b"".join(stamped(raw, 2 * i) for i, raw in enumerate(batches))
    assert read_all(reopened) == expected
    reopened.append(batches[0])
    assert reopened.end_offset == 42
    reopened.close()
    again = PartitionLog.open(tmp_path, small_config(segment_bytes=1 << 20))
    assert again.recovery is not None and again.recovery.clean_shutdown
    assert read_all(again) == expected + stamped(batches[0], 40)
    again.close()


def test_an_append_larger_than_the_segment_gets_a_segment_of_its_size(tmp_path: Path) -> None:
    partition = PartitionLog.open(tmp_path, small_config(segment_bytes=4096))
    big = make_batch(1, records=4, body_size=20_000)
    partition.append(big)  # the empty active segment grows to fit
    partition.append(make_batch(0))  # rolls: no room left
    partition.append(big)  # rolls into a new segment sized to fit
    assert partition.end_offset == 4 + 3 + 4
    partition.close()
    reopened = PartitionLog.open(tmp_path, small_config(segment_bytes=4096))
    assert reopened.end_offset == 11
    assert read_all(reopened) == (stamped(big, 0) + stamped(make_batch(0), 4) + stamped(big, 7))
    reopened.close()


def test_topics_are_created_and_deleted_on_a_worker_thread_while_the_owner_appends(
        tmp_path: Path) -> None:
    log = Log.open(tmp_path, small_config(segment_bytes=64 << 10))
    busy = log.create_topic("busy", partitions=1).partitions[0]
    failures: list[BaseException] = []
    done = threading.Event()

    def admin() -> None:
        try:
            for round_ in range(15):
                log.create_topic(f"t{round_}", partitions=4)
                log.add_partitions(f"t{round_}", 6)
                log.alter_topic_config(f"t{round_}", {"retention_ms": 1000}, [])
                if round_ % 2:
                    # detach happens on the owner thread in the broker; here nothing else uses it
                    log.destroy_topic(log.detach_topic(f"t{round_}"))
        except BaseException as error:  # reported to the test thread
            failures.append(error)
        finally:
            done.set()

    worker = threading.Thread(target=admin)
    worker.start()
    appended = 0
    while not done.is_set() or appended < 50:
        partition_names = [topic.name for topic in log.topics()]  # iterating while it changes
        assert "busy" in partition_names
        busy.append(make_batch(appended, records=1))
        appended += 1
        assert len(read_all(busy, max(0, appended - 5))) > 0
        log.enforce_retention(now_ms=0)
    worker.join()
    assert not failures, failures
    assert sorted(t.name for t in log.topics()) == sorted(
        ["busy"] + [f"t{i}" for i in range(0, 15, 2)])
    assert all(len(log.topic(f"t{i}").partitions) == 6 for i in range(0, 15, 2))
    log.close()
    reopened = Log.open(tmp_path, small_config(segment_bytes=64 << 10))
    assert len(reopened.topics()) == 9 and reopened.topic("busy").partitions[0].end_offset == appended
    assert not list((tmp_path / "trash").iterdir())
    reopened.close()


def test_a_detached_topic_refuses_the_owner_and_its_views_outlive_destroy(tmp_path: Path) -> None:
    log = Log.open(tmp_path, small_config())
    partition = log.create_topic("gone", partitions=1).partitions[0]
    raw = make_batch(7)
    partition.append(raw)
    view = partition.read(0, 1 << 20).views[0]
    topic = log.detach_topic("gone")
    with pytest.raises(errors.LogClosedError):
        partition.append(raw)
    with pytest.raises(errors.LogClosedError):
        partition.read(0, 100)
    with pytest.raises(errors.UnknownTopicError):
        log.topic("gone")
    worker = threading.Thread(target=log.destroy_topic, args=(topic,))
    worker.start()
    worker.join()
    assert bytes(view) == stamped(raw, 0)  # the unlinked file lives while mapped
    view.release()
    assert not (tmp_path / "topics" / "gone").exists()
    log.create_topic("gone", partitions=1)  # the name is free again
    log.close()


def test_a_topics_segment_size_is_bounded_by_the_broker(tmp_path: Path) -> None:
    log = Log.open(tmp_path, small_config(), override_segment_bytes=(1 << 20, 256 << 20))
    with pytest.raises(errors.InvalidConfigError, match="segment_bytes must be between"):
        log.create_topic("tiny", 1, {"segment_bytes": 4096})
    with pytest.raises(errors.InvalidConfigError, match="segment_bytes must be between"):
        log.create_topic("huge", 1, {"segment_bytes": 1 << 30})
    log.create_topic("ok", 1, {"segment_bytes": 8 << 20})
    with pytest.raises(errors.InvalidConfigError, match="segment_bytes must be between"):
        log.alter_topic_config("ok", {"segment_bytes": 4096}, [])
    assert log.topic("ok").config.segment_bytes == 8 << 20
    log.create_topic("default", 1)  # the broker's own default is not bound by it
    log.close()
    with pytest.raises(errors.InvalidConfigError, match="override_segment_bytes"):
        Log.open(tmp_path, small_config(), override_segment_bytes=(100, 1 << 20))


def test_the_appending_thread_does_not_allocate_while_the_file_thread_keeps_ahead(tmp_path: Path) -> None:
    """Past the first step, every posix_fallocate of a steadily written segment runs on the
    segment-file thread, not on the thread that appends (the broker's event loop)."""
    import threading
    from unittest import mock

    partition = PartitionLog.open(tmp_path, small_config(segment_bytes=64 << 20))
    raw = make_batch(0, records=1, body_size=1000)
    partition.append(raw)
    callers: list[str] = []
    real = os.posix_fallocate

    def recording(fd: int, offset: int, length: int) -> None:
        callers.append(threading.current_thread().name)
        real(fd, offset, length)

    with mock.patch.object(os, "posix_fallocate", recording):
        appended = 0
        while appended < 40 << 20:
            partition.append(raw)
            appended += len(raw)
            partition._active._collect_file_work(wait=True)  # noqa: SLF001 - a thread that keeps up
    partition.close()
    assert len(callers) >= 5, callers
    assert all(name.startswith("rustmq-segment-files") for name in callers), callers
