"""Crash-test writer (run as a subprocess by test_crash.py, then SIGKILLed).

Appends `crash_batch(i)` for i = 0, 1, ... to the partition in argv[1] with durable appends
through the real GroupCommitter and prints "<i> <base_offset> <last_offset>" for every batch
only after its callback reported it durable. Keeps up to 32 appends in flight.
"""

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "support"))

from rustmq.storage import config, durability, partition  # noqa: E402
from storage_testlib import crash_batch  # noqa: E402


def main() -> None:
    log_config = config.LogConfig(segment_bytes=256 * 1024, index_interval_bytes=4096,
                                  segment_ms=None, retention_ms=None,
                                  flush=config.FlushPolicy("always"))
    log = partition.PartitionLog.open(Path(sys.argv[1]), log_config)
    committer = durability.GroupCommitter(max_wait_ms=1.0)
    in_flight = threading.Semaphore(32)
    out_lock = threading.Lock()
    print(f"start {log.end_offset}", flush=True)
    i = 0
    while True:
        in_flight.acquire()
        result = log.append(crash_batch(i))

        def done(error, i=i, result=result):  # type: ignore[no-untyped-def]
            if error is None:
                with out_lock:
                    sys.stdout.write(f"{i} {result.base_offset} {result.last_offset}\n")
                    sys.stdout.flush()
            in_flight.release()

        committer.request(log, result.last_offset, done)
        i += 1


if __name__ == "__main__":
    main()
