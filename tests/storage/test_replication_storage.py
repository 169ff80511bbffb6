"""Storage support for replication: leader epochs stamped and kept, epoch walk, truncation."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from rustmq.protocol import batch
from rustmq.replication.node import rebuild_off_loop
from rustmq.storage import errors
from rustmq.storage.config import LogConfig
from rustmq.storage.partition import PartitionLog


def one(value: bytes = b"x", count: int = 1) -> bytes:
    return batch.build_batch(value, record_count=count, first_timestamp_ms=1, max_timestamp_ms=1)


def headers(plog: PartitionLog) -> list[tuple[int, int]]:
    fetched = plog.read(plog.start_offset, 1 << 30)
    out = []
    for view in fetched.views:
        out += [(h.base_offset, h.leader_epoch) for _, h in batch.iter_batches(view)]
        view.release()
    return out


def config() -> LogConfig:
    return LogConfig().merged({"segment_bytes": 4096, "flush": {"mode": "interval", "interval_ms": 1000}})


def test_epochs_are_stamped_kept_and_survive_recovery(tmp_path: Path) -> None:
    plog = PartitionLog.open(tmp_path, config())
    plog.append(one(count=2), leader_epoch=3)
    follower_copy = bytearray(one())
    batch.stamp_batch(follower_copy, 0, 0, leader_epoch=5)
    plog.append(follower_copy, leader_epoch=None)  # a follower keeps the leader's epoch
    plog.append(one(), leader_epoch=5)
    assert headers(plog) == [(0, 3), (2, 5), (3, 5)]
    assert plog.epoch_starts() == [(3, 0), (5, 2)]
    plog.close(clean=False)
    reopened = PartitionLog.open(tmp_path, config())
    assert reopened.end_offset == 4 and reopened.recovery.truncated_at_offset is None
    assert reopened.epoch_starts() == [(3, 0), (5, 2)]
    reopened.close()


def test_truncate_cuts_at_a_batch_boundary_across_segments_and_appends_continue(tmp_path: Path) -> None:
    plog = PartitionLog.open(tmp_path, config())
    for i in range(40):  # ~1 KiB batches over several 4 KiB segments
        plog.append(one(bytes(1000), count=2), leader_epoch=1 if i < 20 else 2)
    assert plog.segment_count > 3
    assert plog.truncate_to(41) == 40  # inside a batch: cut at its start
    assert plog.end_offset == 40 and plog.epoch_starts() == [(1, 0)]  # epoch 2 began at 40
    assert plog.truncate_to(40) == 40
    assert plog.truncate_to(13) == 12
    assert plog.epoch_starts() == [(1, 0)]
    result = plog.append(one(), leader_epoch=7)
    assert result.base_offset == 12
    assert headers(plog)[-2:] == [(10, 1), (12, 7)]
    plog.close(clean=False)
    reopened = PartitionLog.open(tmp_path, config())
    assert reopened.end_offset == 13 and reopened.epoch_starts() == [(1, 0), (7, 12)]
    reopened.close()


def test_truncate_to_the_start_empties_the_log(tmp_path: Path) -> None:
    plog = PartitionLog.open(tmp_path, config())
    plog.append(one(), leader_epoch=1)
    plog.append(one(), leader_epoch=1)
    assert plog.truncate_to(0) == 0
    assert plog.append(one(), leader_epoch=2).base_offset == 0
    plog.close()


def test_restart_at_drops_everything_and_goes_on_at_a_later_offset(tmp_path: Path) -> None:
    plog = PartitionLog.open(tmp_path, config())
    for _ in range(12):  # several segments
        plog.append(one(bytes(1000), count=2), leader_epoch=1)
    assert plog.segment_count > 2 and plog.end_offset == 24
    try:
        plog.restart_at(10)
        raise AssertionError("restarting below the end must be refused")
    except Exception as exc:  # StorageError: offsets would be reused
        assert "below the end offset 24" in str(exc)
    assert plog.restart_at(500) == 500
    assert (plog.start_offset, plog.end_offset, plog.segment_count, plog.size_bytes) == (500, 500, 1, 0)
    leader_copy = bytearray(one())
    batch.stamp_batch(leader_copy, 0, 500, leader_epoch=4)
    assert plog.append(leader_copy, leader_epoch=None).base_offset == 500
    assert headers(plog) == [(500, 4)] and plog.epoch_starts() == [(4, 500)]
    plog.close(clean=False)  # a crash: the restart was durable
    reopened = PartitionLog.open(tmp_path, config())
    assert (reopened.start_offset, reopened.end_offset) == (500, 501)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".log") == ["00000000000000000500.log"]
    reopened.close()


def test_restart_at_zero_discards_a_replica_that_moved_away(tmp_path: Path) -> None:
    plog = PartitionLog.open(tmp_path, config())
    for _ in range(3):  # all in the first segment
        plog.append(one(bytes(100)), leader_epoch=1)
    assert plog.segment_count == 1 and plog.end_offset == 3
    assert plog.restart_at(0, reuse_offsets=True) == 0
    assert (plog.end_offset, plog.size_bytes, headers(plog)) == (0, 0, [])
    plog.close(clean=False)
    reopened = PartitionLog.open(tmp_path, config())
    assert (reopened.start_offset, reopened.end_offset, reopened.size_bytes) == (0, 0, 0)
    reopened.close()


def test_a_truncation_off_the_owner_thread_fences_the_partition_until_it_is_adopted(tmp_path: Path) -> None:
    plog = PartitionLog.open(tmp_path, config())
    for i in range(30):
        plog.append(one(bytes(1000), count=2), leader_epoch=1 if i < 20 else 2)
    plog.flush()
    before_start, before_end = plog.start_offset, plog.end_offset
    rebuild = plog.begin_truncate(41)
    assert rebuild is not None and plog.busy
    worker = threading.Thread(target=rebuild.run)
    worker.start()
    worker.join()
    # Run, not adopted yet: the files are cut, the object still describes the old log, and
    # nothing may read or append it; the numbers readers see are the old ones, whole.
    assert rebuild.finished and rebuild.error is None
    assert (plog.start_offset, plog.end_offset) == (before_start, before_end)
    for call in (lambda: plog.append(one()), lambda: plog.read(0, 100), plog.epoch_starts, plog.roll,
                 lambda: plog.begin_truncate(0), lambda: plog.begin_restart(100), lambda: plog.offset_for_timestamp(0)):
        with pytest.raises(errors.PartitionBusyError):
            call()
    assert plog.enforce_retention(1 << 62) == 0 and plog.delete_before(1 << 62) == 0
    assert plog.sealed_segments() == [] and not plog.flush_due(1e12)
    plog.flush()  # syncs nothing, fails nothing
    assert plog.finish_rebuild(rebuild) == 40 and not plog.busy
    assert plog.epoch_starts() == [(1, 0)]
    assert plog.append(one(), leader_epoch=3).base_offset == 40
    assert plog.finish_rebuild(rebuild) == 41  # a second finish is a no-op
    plog.close()
    reopened = PartitionLog.open(tmp_path, config())
    assert reopened.end_offset == 41 and reopened.epoch_starts() == [(1, 0), (3, 40)]
    reopened.close()


def test_close_during_a_rebuild_waits_for_it_and_keeps_its_result(tmp_path: Path) -> None:
    plog = PartitionLog.open(tmp_path, config())
    for _ in range(10):
        plog.append(one(bytes(1000)), leader_epoch=1)
    rebuild = plog.begin_restart(50)
    worker = threading.Thread(target=rebuild.run)
    worker.start()
    plog.close()  # waits for the worker, adopts, closes
    worker.join()
    assert plog.finish_rebuild(rebuild) == 50  # the owner's late finish changes nothing
    reopened = PartitionLog.open(tmp_path, config())
    assert (reopened.start_offset, reopened.end_offset) == (50, 50)
    reopened.close()


def test_a_failed_rebuild_leaves_the_partition_refusing_writes(tmp_path: Path) -> None:
    plog = PartitionLog.open(tmp_path, config())
    for _ in range(10):
        plog.append(one(bytes(1000)), leader_epoch=1)
    rebuild = plog.begin_truncate(3)
    assert rebuild is not None

    def broken() -> None:
        raise OSError(5, "Input/output error")

    rebuild.work = broken
    rebuild.run()
    with pytest.raises(errors.StorageIOError):
        plog.finish_rebuild(rebuild)
    assert not plog.busy
    with pytest.raises(errors.LogClosedError):
        plog.append(one())
    plog.close(clean=False)


async def test_a_follower_truncation_keeps_the_event_loop_running(tmp_path: Path) -> None:
    plog = PartitionLog.open(tmp_path, LogConfig().merged({"segment_bytes": 256 << 20}))
    chunk = one(bytes(1 << 20))
    for _ in range(96):  # 96 MiB in one segment: zeroing it and fsyncing takes a while
        plog.append(chunk, leader_epoch=1)
    ticks = 0
    running = True

    async def ticker() -> None:
        nonlocal ticks
        while running:
            await asyncio.sleep(0.001)
            ticks += 1

    task = asyncio.get_running_loop().create_task(ticker())
    await asyncio.sleep(0.01)
    rebuild = plog.begin_truncate(1)
    at_start = ticks
    end = await rebuild_off_loop(plog, rebuild)
    during = ticks - at_start
    running = False
    await task
    assert end == 1 and plog.end_offset == 1 and not plog.busy
    assert during >= 3, f"the loop ran {during} times while the partition was truncated"
    plog.close()
