"""PartitionLog on real files: append/read across segments, rolling, retention, view lifetime."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rustmq.protocol import batch
from rustmq.storage import errors
from rustmq.storage.partition import PartitionLog
from storage_testlib import make_batch, read_all, small_config, stamped


def fill(partition: PartitionLog, count: int, records: int = 3, body_size: int = 100) -> list[bytes]:
    """Append `count` batches one by one; return them as they must read back (stamped)."""
    expected = []
    for i in range(count):
        raw = make_batch(i, records, body_size)
        result = partition.append(raw)
        assert result.last_offset - result.base_offset + 1 == records
        expected.append(stamped(raw, result.base_offset))
    return expected


def test_appends_assign_consecutive_offsets_and_read_back_byte_for_byte(tmp_path, small) -> None:
    partition = PartitionLog.open(tmp_path, small)
    first = partition.append(make_batch(0, records=5))
    second = partition.append(make_batch(1, records=2) + make_batch(2, records=4))
    assert (first.base_offset, first.last_offset) == (0, 4)
    assert (second.base_offset, second.last_offset) == (5, 10)
    assert partition.end_offset == 11
    data = read_all(partition)
    scan = batch.scan_batches(data)
    assert scan.batch_count == 3 and scan.record_count == 11
    assert [batch.read_header(data, p).base_offset for p in scan.positions] == [0, 5, 7]
    partition.close()


def test_reads_cross_segment_boundaries_with_one_view_per_segment(tmp_path, small) -> None:
    partition = PartitionLog.open(tmp_path, small)
    expected = fill(partition, 100)
    assert partition.segment_count > 3
    fetched = partition.read(0, 1 << 20)
    assert len(fetched.views) == partition.segment_count
    assert b"".join(fetched.views) == b"".join(expected)
    assert fetched.next_offset == partition.end_offset
    assert all(isinstance(v, memoryview) for v in fetched.views)
    del fetched
    partition.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, 179), max_bytes=st.integers(1, 20_000))
def test_read_starts_at_the_batch_holding_the_offset_and_respects_max_bytes(
        tmp_path_factory, offset, max_bytes) -> None:
    directory = tmp_path_factory.mktemp("p")
    partition = PartitionLog.open(directory, small_config())
    expected = fill(partition, 60)  # 3 records per batch: offsets 0..179
    fetched = partition.read(offset, max_bytes)
    first = offset // 3
    data = b"".join(fetched.views)
    assert data.startswith(expected[first])
    assert len(data) == fetched.size_bytes
    assert len(data) <= max(max_bytes, len(expected[first]))
    taken = batch.scan_batches(data).batch_count
    assert data == b"".join(expected[first : first + taken])
    assert fetched.next_offset == (first + taken) * 3
    if first + taken < len(expected):  # stopped because the next batch would not fit
        assert len(data) + len(expected[first + taken]) > max_bytes
    del fetched, data
    partition.close()


def test_read_at_end_is_empty_and_outside_the_log_is_out_of_range(tmp_path, small) -> None:
    partition = PartitionLog.open(tmp_path, small)
    fill(partition, 3)
    assert partition.read(9, 100) == ([], 9, 0)
    with pytest.raises(errors.OffsetOutOfRangeError, match=r"\[0, 9\)"):
        partition.read(10, 100)
    with pytest.raises(errors.OffsetOutOfRangeError):
        partition.read(-1, 100)
    partition.close()


def test_segments_roll_by_size_and_are_named_by_base_offset(tmp_path, small) -> None:
    partition = PartitionLog.open(tmp_path, small)
    fill(partition, 100)
    logs = sorted(p.name for p in tmp_path.glob("*.log"))
    assert len(logs) == partition.segment_count > 1
    assert logs[0] == "00000000000000000000.log"
    bases = [int(name[:20]) for name in logs]
    assert bases == sorted(bases) and all(b % 3 == 0 for b in bases)
    sealed = [tmp_path / name for name in logs[:-1]]
    assert all(p.stat().st_size <= small.segment_bytes for p in sealed)  # trimmed on seal
    assert (tmp_path / logs[-1]).stat().st_size == small.segment_bytes  # active: sized, sparse
    partition.close()


def test_segments_roll_by_age(tmp_path) -> None:
    partition = PartitionLog.open(tmp_path, small_config(segment_ms=50))
    fill(partition, 2)
    assert partition.segment_count == 1
    time.sleep(0.08)
    fill(partition, 1)
    assert partition.segment_count == 2
    partition.close()


def test_an_append_larger_than_a_segment_gets_a_segment_of_its_own(tmp_path, small) -> None:
    partition = PartitionLog.open(tmp_path, small)
    fill(partition, 2)
    huge = make_batch(7, records=10, body_size=3 * small.segment_bytes)
    result = partition.append(huge)
    assert read_all(partition, result.base_offset) == stamped(huge, result.base_offset)
    after = partition.append(make_batch(8))
    assert after.base_offset == result.last_offset + 1
    partition.close()


def test_broken_framing_is_refused_and_nothing_is_appended(tmp_path, small) -> None:
    partition = PartitionLog.open(tmp_path, small)
    fill(partition, 1)
    good = make_batch(1)
    with pytest.raises(errors.CorruptBatchError):
        partition.append(good + good[:20])
    with pytest.raises(errors.CorruptBatchError):
        partition.append(b"")
    assert partition.end_offset == 3 and partition.size_bytes == len(good)
    partition.close()


def test_offset_for_timestamp_finds_the_first_batch_reaching_it(tmp_path, small) -> None:
    partition = PartitionLog.open(tmp_path, small)
    timestamps = [5, 5, 7, 20, 20, 21, 40, 35, 41, 90] * 8  # not monotonic on purpose
    for i, ts in enumerate(timestamps):
        partition.append(make_batch(i, records=2, timestamp_ms=ts))  # max ts = ts + 1
    assert partition.segment_count > 1
    for target in range(0, 95):
        expected = next((2 * i for i, ts in enumerate(timestamps) if ts + 1 >= target), None)
        assert partition.offset_for_timestamp(target) == expected, target
    partition.close()


def test_retention_by_count_size_and_time_deletes_whole_sealed_segments(tmp_path) -> None:
    partition = PartitionLog.open(tmp_path / "count", small_config(retention_messages=60))
    fill(partition, 100)
    deleted = partition.enforce_retention(now_ms=0)
    assert deleted > 0
    assert partition.end_offset - partition.start_offset >= 60
    assert read_all(partition)  # what is left still reads
    partition.close()

    partition = PartitionLog.open(tmp_path / "size", small_config(retention_bytes=20_000))
    fill(partition, 200)
    assert partition.enforce_retention(now_ms=0) > 0
    assert 20_000 <= partition.size_bytes <= 20_000 + small_config().segment_bytes
    assert partition.size_bytes == len(read_all(partition))
    partition.close()

    partition = PartitionLog.open(tmp_path / "time", small_config(retention_ms=1000))
    for i in range(50):
        partition.append(make_batch(i, timestamp_ms=10_000 + i * 100))
    segments_before = partition.segment_count
    assert partition.enforce_retention(now_ms=10_500) == 0  # everything younger than 1 s
    deleted = partition.enforce_retention(now_ms=10_000 + 50 * 100 + 5_000)
    assert deleted == segments_before - 1 and partition.segment_count == 1  # active is kept
    assert partition.start_offset == partition.read(partition.start_offset, 1).next_offset - 3
    partition.close()


def test_views_stay_valid_across_roll_retention_and_close(tmp_path) -> None:
    partition = PartitionLog.open(tmp_path, small_config(retention_messages=1))
    expected = fill(partition, 2)
    held = partition.read(0, 1 << 20)  # views into the active segment's full-size map
    fill(partition, 200)  # rolls: the held segment is sealed, its full-size map retired
    assert partition.enforce_retention(0) > 0  # ... and deleted
    assert not (tmp_path / "00000000000000000000.log").exists()
    partition.close()  # no BufferError although views are exported
    assert b"".join(held.views) == b"".join(expected)
    for view in held.views:
        view.release()


def test_flush_makes_everything_appended_durable(tmp_path, small) -> None:
    partition = PartitionLog.open(tmp_path, small)
    fill(partition, 30)
    assert partition.durable_offset < partition.end_offset
    assert partition.flush() == partition.end_offset == partition.durable_offset
    recovery_point = int((tmp_path / "recovery-point").read_text())
    assert recovery_point == int(sorted(tmp_path.glob("*.log"))[-1].name[:20])
    assert all((tmp_path / (p.stem + ".index")).exists() for p in sorted(tmp_path.glob("*.log"))[:-1])
    partition.close()


def test_closed_partition_refuses_operations(tmp_path, small) -> None:
    partition = PartitionLog.open(tmp_path, small)
    partition.close()
    for call in (lambda: partition.append(make_batch(0)), lambda: partition.read(0, 1),
                 partition.flush, lambda: partition.enforce_retention(0)):
        with pytest.raises(errors.LogClosedError):
            call()
    partition.close()  # idempotent


def test_a_failed_fsync_stops_writes_until_restart(tmp_path, small, monkeypatch) -> None:
    """fdatasync failing is simulated (EIO cannot be provoked on this machine's disk)."""
    partition = PartitionLog.open(tmp_path, small)
    fill(partition, 2)

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(errors.StorageIOError, match="Input/output error"):
        partition.flush()
    with pytest.raises(errors.LogClosedError, match="after"):
        partition.append(make_batch(3))
    monkeypatch.undo()
    partition.close()


def test_clean_close_trims_the_active_segment_and_reopens_without_scanning(tmp_path, small) -> None:
    partition = PartitionLog.open(tmp_path, small)
    expected = fill(partition, 40)
    partition.close()
    assert sum(p.stat().st_size for p in tmp_path.glob("*.log")) == len(b"".join(expected))
    reopened = PartitionLog.open(tmp_path, small)
    assert reopened.recovery.clean_shutdown and reopened.recovery.scanned_segments == 0
    assert not (tmp_path / "clean-shutdown").exists()  # removed until the next clean close
    assert read_all(reopened) == b"".join(expected)
    assert reopened.durable_offset == reopened.end_offset
    more = fill(reopened, 5)
    assert reopened.end_offset == 135
    assert read_all(reopened, 120) == b"".join(more)
    reopened.close()


def test_directory_path_is_accepted_as_str(tmp_path, small) -> None:
    partition = PartitionLog.open(Path(str(tmp_path / "x")), small)
    assert partition.start_offset == partition.end_offset == 0
    partition.close()


def test_a_failed_write_refuses_further_writes_and_a_restart_recovers(tmp_path, small, monkeypatch
                                                                       ) -> None:
    """The write failure is simulated (EIO cannot be provoked on this machine's disk)."""
    partition = PartitionLog.open(tmp_path, small)
    expected = fill(partition, 3)

    def failing(fd, buffers, position):  # type: ignore[no-untyped-def]
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "pwritev", failing)
    with pytest.raises(errors.StorageIOError, match="Input/output error"):
        partition.append(make_batch(9))
    monkeypatch.undo()
    assert partition.end_offset == 9 and read_all(partition) == b"".join(expected)
    with pytest.raises(errors.LogClosedError, match="after"):
        partition.append(make_batch(10))
    partition.close(clean=False)
    reopened = PartitionLog.open(tmp_path, small)
    assert read_all(reopened) == b"".join(expected)
    reopened.append(make_batch(11))
    reopened.close()


def test_time_and_offset_lookups_agree_after_clean_and_unclean_reopen(tmp_path, small) -> None:
    partition = PartitionLog.open(tmp_path, small)
    timestamps = [(i * 37) % 100 for i in range(120)]
    for i, ts in enumerate(timestamps):
        partition.append(make_batch(i, records=2, timestamp_ms=ts))
    answers = [partition.offset_for_timestamp(t) for t in range(0, 105, 3)]
    reads = [bytes(partition.read(o, 1).views[0]) for o in range(0, 240, 7)]
    for clean in (True, False):
        partition.close(clean=clean)
        partition = PartitionLog.open(tmp_path, small)
        assert partition.recovery.clean_shutdown is clean
        assert [partition.offset_for_timestamp(t) for t in range(0, 105, 3)] == answers
        assert [bytes(partition.read(o, 1).views[0]) for o in range(0, 240, 7)] == reads
    partition.close()


def test_flush_on_another_thread_while_appending(tmp_path, small) -> None:
    partition = PartitionLog.open(tmp_path, small)
    stop = threading.Event()
    seen: list[int] = []
    failures: list[BaseException] = []

    def flusher() -> None:
        try:
            while not stop.is_set():
                seen.append(partition.flush())
        except BaseException as error:  # reported below
            failures.append(error)

    thread = threading.Thread(target=flusher)
    thread.start()
    expected = fill(partition, 300)  # many rolls while flushes run
    stop.set()
    thread.join()
    assert not failures
    assert seen == sorted(seen) and seen[-1] <= partition.end_offset
    assert partition.flush() == partition.end_offset
    partition.close(clean=False)
    reopened = PartitionLog.open(tmp_path, small)
    assert read_all(reopened) == b"".join(expected)
    assert reopened.recovery.scanned_segments <= 2  # the recovery point kept up with the rolls
    reopened.close()
