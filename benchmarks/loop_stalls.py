"""Where does the broker's event loop stall? `rustmq broker` with a CPU-time stall watchdog.

    python benchmarks/loop_stalls.py --report stalls.json -- broker --data-dir DIR [broker flags]

Runs the broker in this process (everything after ``--`` is `rustmq`'s command line) plus two
threads: a heartbeat task on the loop ticks every 0.5 ms, and a watchdog thread reads the loop
thread's CPU clock (``pthread_getcpuclockid``). A tick during which the loop thread used more
than ``--threshold-ms`` of CPU time is a stall of the broker's own making; the loop thread's
stack at that moment is recorded. Time the thread spends runnable but preempted by other
processes is not counted, which is the point: on a busy machine wall-clock latency tails are
mostly scheduling, and this separates the two. The report (JSON, rewritten every 2 s and at
exit) holds the number of stalls, a histogram of their CPU milliseconds and the most frequent
stacks. It is a diagnostic for benchmarks (docs/benchmarks.md), not part of the broker.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from rustmq import app, cli

TICK_S = 0.0005


class StallWatchdog:
    def __init__(self, threshold_s: float, report: Path) -> None:
        self.threshold_s = threshold_s
        self.report = report
        self.ticks = 0
        self.loop_thread = threading.main_thread().ident or 0
        self.clock = time.pthread_getcpuclockid(self.loop_thread)
        self.stacks: collections.Counter[tuple[str, ...]] = collections.Counter()
        self.cpu_ms: collections.Counter[int] = collections.Counter()

    async def heartbeat(self) -> None:
        while True:
            self.ticks += 1
            await asyncio.sleep(TICK_S)

    def watch(self) -> None:
        seen, cpu_at_tick, flagged = -1, time.clock_gettime(self.clock), False
        while True:
            time.sleep(TICK_S)
            ticks, cpu = self.ticks, time.clock_gettime(self.clock)
            if ticks != seen:
                if flagged:
                    self.cpu_ms[round((cpu - cpu_at_tick) * 1000)] += 1
                seen, cpu_at_tick, flagged = ticks, cpu, False
            elif not flagged and cpu - cpu_at_tick > self.threshold_s:
                frame = sys._current_frames().get(self.loop_thread)
                if frame is not None:
                    self.stacks[tuple(f"{entry.filename}:{entry.lineno}:{entry.name}"
                                      for entry in traceback.extract_stack(frame)[-8:])] += 1
                flagged = True

    def summary(self) -> dict[str, Any]:
        return {
            "threshold_ms": self.threshold_s * 1000,
            "stalls": sum(self.stacks.values()),
            "cpu_ms_histogram": dict(sorted(self.cpu_ms.items())),
            "top_stacks": [{"count": count, "stack": list(stack)}
                           for stack, count in self.stacks.most_common(10)],
        }

    def write_every(self, period_s: float) -> None:
        while True:
            time.sleep(period_s)
            self.write()

    def write(self) -> None:
        self.report.write_text(json.dumps(self.summary(), indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threshold-ms", type=float, default=2.5)
    parser.add_argument("--report", type=Path, default=Path("loop-stalls.json"))
    parser.add_argument("rustmq_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    rustmq_args = args.rustmq_args[1:] if args.rustmq_args[:1] == ["--"] else args.rustmq_args
    watchdog = StallWatchdog(args.threshold_ms / 1000, args.report)
    serve = app.serve

    async def serve_watched(config: Any) -> None:
        heartbeat = asyncio.get_running_loop().create_task(watchdog.heartbeat())
        try:
            await serve(config)
        finally:
            heartbeat.cancel()

    app.serve = serve_watched  # type: ignore[assignment]
    threading.Thread(target=watchdog.watch, daemon=True).start()
    threading.Thread(target=watchdog.write_every, args=(2.0,), daemon=True).start()
    try:
        return cli.main(rustmq_args)
    finally:
        watchdog.write()


if __name__ == "__main__":
    sys.exit(main())
