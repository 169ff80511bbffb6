"""How long a new coordinator holds the event loop per replay step of its internal partition.

    python benchmarks/coordination_replay.py [--large-commits 600] [--small-commits 20000] [--step-bytes 131072]

Writes a coordination partition (rustmq.coordination.journal.LogJournal on a real PartitionLog,
no compaction) the way commits do: first large commits (4 KB of metadata on each of 8
partitions, ~32 KB per batch), then many small ones (one partition each, ~130 bytes per batch,
the costly case per byte: one batch and one entry to decode per 130 bytes), then replays it
into fresh stores with `LogReplay.step(step_bytes)` as rustmq.server.group_stores does, one
step per loop pass. Prints JSON: the partition's bytes, the number of steps, the total replay
time and the loop thread's CPU time per step (median, max); CPU time, not wall time, so that
other processes on a busy machine do not count as the broker's own stall.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rustmq.coordination.journal import LogJournal, LogReplay
from rustmq.server.group_stores import PartitionStores
from rustmq.storage.config import LogConfig
from rustmq.storage.partition import PartitionLog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--large-commits", type=int, default=600)
    parser.add_argument("--small-commits", type=int, default=20_000)
    parser.add_argument("--step-bytes", type=int, default=None, help="default: the broker's REPLAY_STEP_BYTES")
    args = parser.parse_args()
    from rustmq.server.group_stores import REPLAY_STEP_BYTES

    step_bytes = args.step_bytes or REPLAY_STEP_BYTES
    with tempfile.TemporaryDirectory() as directory:
        plog = PartitionLog.open(Path(directory) / "p", LogConfig(segment_bytes=64 << 20, retention_ms=None))
        try:
            journal = LogJournal(plog, 1, compact_bytes=1 << 30)
            stores = PartitionStores(journal)
            journal.live = stores.live_entries
            for r in range(args.large_commits):
                stores.offsets.commit(r, "large", {("t", p): r + p for p in range(8)}, "m" * 4000)
            for r in range(args.small_commits):
                stores.offsets.commit(r, f"g{r % 500}", {("t", r % 8): r})
            fresh = PartitionStores(LogJournal(plog, 1))
            replay = LogReplay(plog, fresh.apply, fresh.reset)
            cpu: list[float] = []
            started = time.perf_counter()
            while True:
                before = time.thread_time()
                done = replay.step(step_bytes)
                cpu.append(time.thread_time() - before)
                if done:
                    break
            total = time.perf_counter() - started
            assert fresh.offsets.fetch("large") == stores.offsets.fetch("large")
            print(json.dumps({
                "partition_bytes": plog.size_bytes, "step_bytes": step_bytes, "steps": len(cpu),
                "replay_s": round(total, 3), "replay_mb_per_s": round(plog.size_bytes / total / 1e6, 1),
                "step_cpu_ms_median": round(sorted(cpu)[len(cpu) // 2] * 1000, 2),
                "step_cpu_ms_max": round(max(cpu) * 1000, 2),
            }))
        finally:
            plog.close()


if __name__ == "__main__":
    main()
