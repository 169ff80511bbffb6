"""Disk full surfaces as StorageFullError at roll time, never as SIGBUS, and loses nothing.

The first test fills a real 2 MiB tmpfs (needs root to mount, which the project's machines give;
elsewhere it is skipped with the reason). The second needs no privilege: RLIMIT_FSIZE makes
posix_fallocate fail with EFBIG in a subprocess, which the engine reports the same way.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rustmq.storage import config, errors
from rustmq.storage.log import Log
from rustmq.storage.partition import PartitionLog
from storage_testlib import make_batch, read_all


@pytest.fixture
def tiny_filesystem(tmp_path):  # type: ignore[no-untyped-def]
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs here ({result.stderr.strip()}); "
                    "test_file_size_limit_is_reported_as_storage_full covers the error path")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_full_disk_fails_the_roll_cleanly_and_recovers_after_retention(tiny_filesystem) -> None:
    log_config = config.LogConfig(segment_bytes=512 * 1024, segment_ms=None, retention_ms=None,
                                  retention_messages=30, flush=config.FlushPolicy("none"))
    partition = PartitionLog.open(tiny_filesystem / "p", log_config)
    appended = bytearray()
    with pytest.raises(errors.StorageFullError, match="No space left|no space left"):
        for i in range(10_000):
            raw = make_batch(i, records=1, body_size=20_000)
            partition.append(raw)
            appended += raw
    end, size = partition.end_offset, partition.size_bytes
    assert end == i and size == len(appended)  # the failed append left nothing behind
    assert len(read_all(partition)) == size  # everything before still reads
    assert not [p for p in tiny_filesystem.glob("p/*.log") if p.stat().st_size == 0]
    assert partition.flush() == end
    assert partition.enforce_retention(now_ms=0) > 0  # frees whole segments ...
    partition.append(make_batch(1, records=1, body_size=20_000))  # ... so rolling works again
    assert partition.end_offset == end + 1
    partition.close()
    reopened = PartitionLog.open(tiny_filesystem / "p", log_config)
    assert reopened.end_offset == end + 1
    reopened.close()


def test_topics_reserve_no_segment_space_and_a_full_disk_leaves_no_half_topic(
        tiny_filesystem) -> None:
    log = Log.open(tiny_filesystem / "data", config.LogConfig(segment_bytes=512 * 1024))
    # 24 partitions of 512 KiB segments on a 2 MiB file system: nothing is reserved up front
    log.create_topic("wide", partitions=12)
    log.create_topic("wider", partitions=12)
    filler = tiny_filesystem / "filler"
    with open(filler, "wb") as file, pytest.raises(OSError):
        while True:
            file.write(bytes(64 * 1024))
            file.flush()
    with pytest.raises(errors.StorageFullError):
        log.create_topic("big", partitions=12)
    assert sorted(topic.name for topic in log.topics()) == ["wide", "wider"]
    assert sorted(p.name for p in (tiny_filesystem / "data" / "topics").iterdir()) == [
        "wide", "wider"]
    with pytest.raises(errors.StorageFullError):  # an append that finds no blocks ...
        log.topic("wide").partitions[0].append(make_batch(0, records=1, body_size=20_000))
    filler.unlink()
    log.topic("wide").partitions[0].append(make_batch(0, records=1, body_size=20_000))  # ... retries
    log.create_topic("small", partitions=2)  # the space was given back
    log.close()


def test_file_size_limit_is_reported_as_storage_full(tmp_path) -> None:
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(Path(__file__).parents[1] / 'support')!r})
        from storage_testlib import make_batch
        from rustmq.storage import config, errors
        from rustmq.storage.partition import PartitionLog
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
        cfg = config.LogConfig(segment_bytes=200_000, segment_ms=None, retention_ms=None)
        log = PartitionLog.open({str(tmp_path)!r}, cfg)
        for i in range(10):
            log.append(make_batch(i, records=1, body_size=50_000))  # rolls: each file < limit
        try:
            log.append(make_batch(10, records=1, body_size=350_000))  # needs a 350 KB segment
        except errors.StorageFullError as error:
            print("full", log.end_offset, error)
        log.append(make_batch(11, records=1, body_size=50_000))  # still serving
        assert log.end_offset == 11
        log.close()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    word, end_offset, message = result.stdout.split(" ", 2)
    assert word == "full" and int(end_offset) == 10
    assert "File too large" in message
