"""Crash safety with a real process: SIGKILL a writer mid-stream, reopen, check every durable ack.

SIGKILL exercises the process-crash path (torn appends, half-done rolls, a recovery scan of
unflushed data). A power loss, where the page cache itself is lost, cannot be produced on this
machine; that case rests on the fsync ordering argued in PartitionLog.flush.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rustmq.protocol import batch
from rustmq.storage import config
from rustmq.storage.partition import PartitionLog
from storage_testlib import crash_batch, stamped

WRITER = Path(__file__).with_name("crash_writer.py")


def run_writer_until_killed(directory: Path, acks_before_kill: int) -> list[tuple[int, int, int]]:
    """Start the writer, SIGKILL it after `acks_before_kill` durable acks; return every ack."""
    process = subprocess.Popen([sys.executable, str(WRITER), str(directory)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    try:
        start_line = process.stdout.readline()
        assert start_line.startswith("start"), start_line + process.stderr.read()
        acks = []
        deadline = time.monotonic() + 60
        while len(acks) < acks_before_kill and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, "writer died: " + process.stderr.read()
            acks.append(tuple(map(int, line.split())))
        os.kill(process.pid, signal.SIGKILL)  # mid-stream: appends, rolls and fsyncs in flight
        rest, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    # Lines already written were acknowledged durable before the kill: they count too.
    acks += [tuple(map(int, line.split())) for line in rest.splitlines() if line.count(" ") == 2]
    return acks  # type: ignore[return-value]


@pytest.mark.slow
@pytest.mark.timeout(100)
def test_every_append_reported_durable_survives_sigkill(tmp_path) -> None:
    rng = random.Random(20261123)
    directory = tmp_path / "partition"
    all_acks: list[tuple[int, int, int]] = []
    for round_number in range(4):
        acks = run_writer_until_killed(directory, rng.randint(100, 1500))
        assert len(acks) >= 100
        all_acks += [(round_number, *ack) for ack in acks]  # type: ignore[misc]
        log = PartitionLog.open(directory, config.LogConfig(segment_bytes=256 * 1024,
                                                            segment_ms=None, retention_ms=None))
        try:
            assert not log.recovery.clean_shutdown
            for _, index, base_offset, last_offset in all_acks:
                assert log.end_offset > last_offset
                fetched = log.read(base_offset, 1)
                first = bytes(fetched.views[0][: batch.read_header(fetched.views[0]).size])
                del fetched
                assert first == stamped(crash_batch(index), base_offset), (index, base_offset)
            whole = log.read(log.start_offset, 1 << 30)
            scan = sum(batch.scan_batches(view).record_count for view in whole.views)
            assert scan == log.end_offset - log.start_offset  # contiguous and all valid
            del whole
            assert log.segment_count > 1
        finally:
            log.close(clean=False)  # the next round starts from an unclean state again
