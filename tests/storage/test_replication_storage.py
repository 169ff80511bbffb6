"""Storage support for replication: leader epochs stamped and kept, epoch walk, truncation."""

from __future__ import annotations

from pathlib import Path

from rustmq.protocol import batch
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
