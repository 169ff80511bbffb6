"""Compaction crash-test child (run as a subprocess by test_compaction_crash.py).

    compaction_writer.py prepare DIR B      append B batches of keyed records, close cleanly
    compaction_writer.py compact DIR N      open DIR, compact it, SIGKILL itself at the N-th
                                            file-system step of the swap (0: never); prints
                                            "steps <count> commit <step>" when it finishes, <step>
                                            being the rename of the commit file
    compaction_writer.py loop DIR           append and compact forever, printing
                                            "durable <end_offset>" after every flush

The kill points: the compaction is run with os.fsync, os.replace, os.unlink, os.rename and
os.posix_fallocate counted, and the N-th call is preceded by a real SIGKILL of this process, so
the crash lands exactly between two of the swap's durable steps (the page cache survives, as in
any process crash).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from rustmq import compaction
from rustmq.protocol import batch, records
from rustmq.storage import config, partition

KEYS = 7
RECORDS_PER_BATCH = 4


def log_config() -> config.LogConfig:
    return config.LogConfig(segment_bytes=4096, index_interval_bytes=256, segment_ms=None,
                            retention_ms=None, flush=config.FlushPolicy("none"),
                            cleanup_policy="compact", delete_retention_ms=0)


def key_of(offset: int) -> bytes | None:
    return None if offset % 3 == 0 else b"k%d" % (offset % KEYS)


def value_of(offset: int) -> bytes | None:
    return None if offset % 11 == 1 else b"value-%d" % offset  # some tombstones


def make_batch(first_offset: int, timestamp_ms: int) -> bytes:
    entries = [(0, key_of(o), value_of(o), None)
               for o in range(first_offset, first_offset + RECORDS_PER_BATCH)]
    return batch.build_batch(records.encode_body(entries), record_count=RECORDS_PER_BATCH,
                             first_timestamp_ms=timestamp_ms, max_timestamp_ms=timestamp_ms)


def append_round(log: partition.PartitionLog, batches: int) -> None:
    now = int(time.time() * 1000) - 10
    for _ in range(batches):
        log.append(make_batch(log.end_offset, now))
    log.flush()


def kill_at(step: int) -> None:
    """Count file-system steps; SIGKILL this process right before the `step`-th one."""
    counter = [0, 0]  # steps so far, the step that renamed the commit file into place

    def wrap(name: str) -> None:
        original = getattr(os, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            counter[0] += 1
            if counter[0] == step:
                os.kill(os.getpid(), signal.SIGKILL)
            if name == "replace" and str(args[1]).endswith(partition.COMPACTION_COMMIT_FILE):
                counter[1] = counter[0]
            return original(*args, **kwargs)

        setattr(os, name, counted)

    for name in ("fsync", "replace", "unlink", "rename", "posix_fallocate"):
        wrap(name)
    kill_at.counter = counter  # type: ignore[attr-defined]


def main() -> None:
    mode, directory = sys.argv[1], Path(sys.argv[2])
    if mode == "prepare":
        log = partition.PartitionLog.open(directory, log_config())
        append_round(log, int(sys.argv[3]))
        log.close()
        return
    if mode == "compact":
        log = partition.PartitionLog.open(directory, log_config())
        step = int(sys.argv[3])
        kill_at(step)
        result = compaction.compact(log, int(time.time() * 1000))
        steps, commit = kill_at.counter  # type: ignore[attr-defined]
        assert result is not None, "nothing was compacted"
        print(f"steps {steps} commit {commit}", flush=True)
        log.close()
        return
    if mode == "loop":
        log = partition.PartitionLog.open(directory, log_config())
        state = compaction.CompactionState()
        while True:
            append_round(log, 12)
            print(f"durable {log.durable_offset}", flush=True)
            compaction.compact(log, int(time.time() * 1000), state)
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
