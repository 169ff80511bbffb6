"""Storage engine benchmark: append, read and recovery throughput of one PartitionLog.

    python benchmarks/storage.py --json

Prints one JSON object. Workload (the issue's): 1 KiB records in 1 MiB batches (1,024 records
per batch; the body is opaque to storage, so it is random bytes), appended one batch per call
into preallocated, memory-mapped segments (default 64 MiB, flush policy "none").

* raw_mmap_copy_gb_s / raw_pwrite_gb_s: the physical references, measured in the same run: the
  same batches memcpy'd into (or pwrite'd to) fresh posix_fallocate'd, mmapped files of the
  segment size, nothing else. On this VM both are bounded by the cost of fresh page cache.
* append_gb_s: PartitionLog.append alone (framing walk, one pwritev with stamped prefixes,
  sparse indexes, segment rolls with posix_fallocate); produce_gb_s adds batch.scan_batches
  (the per-produce CRC32C validation the server runs first).
* read_gb_s: PartitionLog.read(offset, 1 MiB) over the whole log, every returned view consumed
  by copying it into one reusable bytearray (a memoryview copy, so the pages are really touched).
* append_resident_gb_s: append into one large segment whose page cache was made resident
  first: the engine's own cost, without the cost of obtaining fresh page cache.
* durable_append_gb_s / flush_p50_ms: append then flush() (fdatasync) after every 1 MiB batch,
  the "always" policy without any grouping; median flush latency.
* group_commit_records_s: 1 KiB records acknowledged durable per second when 16 KiB batches
  are appended and each is acknowledged through the GroupCommitter (max_wait_ms 0.5, up to 64
  awaiting), with the appends shared per fsync.
* recovery_s: PartitionLog.open of a partition holding 1,000,000 records of 1 KiB (~1 GiB) left
  without a clean-shutdown marker and without a recovery point, so every segment is scanned and
  every batch CRC-checked; the page cache is warm (the data was just written), as after a broker
  crash; a cold cache after a reboot adds the disk read time.

Best of --repeat runs (the machine is shared); 1 GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from rustmq.protocol import batch
from rustmq.storage import config, durability
from rustmq.storage.partition import PartitionLog

RECORD = 1024
BATCH_RECORDS = 1024


def make_batch() -> bytes:
    body = os.urandom(RECORD * BATCH_RECORDS - batch.HEADER_SIZE)
    now = int(time.time() * 1000)
    return batch.build_batch(body, record_count=BATCH_RECORDS, first_timestamp_ms=now,
                             max_timestamp_ms=now)


def log_config(segment_bytes: int) -> config.LogConfig:
    return config.LogConfig(segment_bytes=segment_bytes, segment_ms=None, retention_ms=None,
                            flush=config.FlushPolicy("none"))


def bench_append(directory: Path, payload: bytes, total_bytes: int, segment_bytes: int,
                 validate: bool) -> float:
    partition = PartitionLog.open(directory, log_config(segment_bytes))
    count = total_bytes // len(payload)
    started = time.perf_counter()
    if validate:
        for _ in range(count):
            batch.scan_batches(payload)
            partition.append(payload)
    else:
        for _ in range(count):
            partition.append(payload)
    elapsed = time.perf_counter() - started
    partition.close(clean=False)
    return count * len(payload) / elapsed / 1e9


def bench_raw_copy(directory: Path, payload: bytes, total_bytes: int, segment_bytes: int,
                   use_write: bool) -> float:
    """Physical references: the same bytes memcpy'd into fresh fallocated files mapped
    read-write, or pwrite'd to them mapped read-only (as the engine does), nothing else."""
    directory.mkdir(parents=True)
    count = total_bytes // len(payload)
    size = len(payload)
    per_file = segment_bytes // size
    started = time.perf_counter()
    written = 0
    file_number = 0
    while written < count:
        fd = os.open(directory / f"{file_number}.raw", os.O_RDWR | os.O_CREAT, 0o644)
        os.posix_fallocate(fd, 0, segment_bytes)
        mm = mmap.mmap(fd, segment_bytes, access=mmap.ACCESS_READ if use_write else mmap.ACCESS_WRITE)
        for position in range(0, min(per_file, count - written) * size, size):
            if use_write:
                os.pwrite(fd, payload, position)
            else:
                mm[position : position + size] = payload
        written += min(per_file, count - written)
        mm.close()
        os.close(fd)
        file_number += 1
    elapsed = time.perf_counter() - started
    shutil.rmtree(directory)
    return count * size / elapsed / 1e9


def bench_append_resident(directory: Path, payload: bytes, total_bytes: int) -> float:
    """Append into one segment whose page cache was made resident first (zeros written through
    the fd), so the figure shows the engine's own cost without the VM's fresh-page cost."""
    count = total_bytes // len(payload)
    partition = PartitionLog.open(directory, log_config(min(count * len(payload) + 4096,
                                                            config.MAX_SEGMENT_BYTES)))
    zeros = bytes(len(payload))
    fd = partition._active.fd  # noqa: SLF001 - benchmark-only access to pre-touch the file
    for position in range(0, count * len(payload), len(payload)):
        os.pwrite(fd, zeros, position)
    started = time.perf_counter()
    for _ in range(count):
        partition.append(payload)
    elapsed = time.perf_counter() - started
    partition.close(clean=False)
    return count * len(payload) / elapsed / 1e9


def bench_durable(directory: Path, payload: bytes, total_bytes: int, segment_bytes: int
                  ) -> tuple[float, float]:
    """append + flush (fdatasync) per batch: throughput and median flush latency in ms."""
    partition = PartitionLog.open(directory, log_config(segment_bytes))
    count = total_bytes // len(payload)
    latencies = []
    started = time.perf_counter()
    for _ in range(count):
        partition.append(payload)
        flush_started = time.perf_counter()
        partition.flush()
        latencies.append(time.perf_counter() - flush_started)
    elapsed = time.perf_counter() - started
    partition.close(clean=False)
    latencies.sort()
    return count * len(payload) / elapsed / 1e9, latencies[len(latencies) // 2] * 1000


def bench_group_commit(directory: Path, total_bytes: int, segment_bytes: int) -> dict[str, float]:
    """Durable appends of 16 KiB batches (16 records of 1 KiB) through the GroupCommitter with up
    to 64 appends awaiting their fsync, as a server with many producers on the "always" policy."""
    body = os.urandom(16 * RECORD - batch.HEADER_SIZE)
    small = batch.build_batch(body, record_count=16, first_timestamp_ms=0, max_timestamp_ms=0)
    partition = PartitionLog.open(directory, log_config(segment_bytes))
    committer = durability.GroupCommitter(max_wait_ms=0.5)
    in_flight = threading.Semaphore(64)
    count = total_bytes // len(small)
    acked = threading.Semaphore(0)
    started = time.perf_counter()
    for _ in range(count):
        in_flight.acquire()
        result = partition.append(small)

        def done(error: BaseException | None) -> None:
            assert error is None, error
            in_flight.release()
            acked.release()

        committer.request(partition, result.last_offset, done)
    for _ in range(count):
        acked.acquire()
    elapsed = time.perf_counter() - started
    committer.close()
    partition.close(clean=False)
    return {"group_commit_records_s": count * 16 / elapsed,
            "group_commit_gb_s": count * len(small) / elapsed / 1e9,
            "group_commit_appends_per_fsync": count / max(1, committer.flush_count)}


def bench_read(directory: Path, segment_bytes: int) -> tuple[float, int]:
    partition = PartitionLog.open(directory, log_config(segment_bytes))
    sink = bytearray(2 * RECORD * BATCH_RECORDS)
    offset, end, total = partition.start_offset, partition.end_offset, 0
    started = time.perf_counter()
    while offset < end:
        fetched = partition.read(offset, RECORD * BATCH_RECORDS)
        for view in fetched.views:
            size = len(view)
            sink[:size] = view
            total += size
            view.release()
        offset = fetched.next_offset
    elapsed = time.perf_counter() - started
    partition.close(clean=False)
    return total / elapsed / 1e9, total


def bench_recovery(directory: Path, payload: bytes, records: int, segment_bytes: int
                   ) -> dict[str, float | int]:
    partition = PartitionLog.open(directory, log_config(segment_bytes))
    for _ in range(-(-records // BATCH_RECORDS)):
        partition.append(payload)
    end_offset = partition.end_offset
    partition.close(clean=False)  # an unclean stop: no marker, no flush, no recovery point
    (directory / "recovery-point").unlink(missing_ok=True)
    started = time.perf_counter()
    reopened = PartitionLog.open(directory, log_config(segment_bytes))
    elapsed = time.perf_counter() - started
    report = reopened.recovery
    assert report is not None and not report.clean_shutdown and report.reason is None
    assert reopened.end_offset == end_offset
    reopened.close(clean=False)
    return {"recovery_s": elapsed, "recovery_records": end_offset,
            "recovery_scanned_bytes": report.scanned_bytes,
            "recovery_scanned_segments": report.scanned_segments}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--total-mib", type=int, default=2048, help="bytes appended per run")
    parser.add_argument("--segment-mib", type=int, default=64)
    parser.add_argument("--durable-mib", type=int, default=256, help="bytes appended+flushed")
    parser.add_argument("--recovery-records", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a tmp dir)")
    args = parser.parse_args()
    segment_bytes = args.segment_mib << 20
    payload = make_batch()
    root = Path(tempfile.mkdtemp(prefix="rustmq-bench-", dir=args.dir))
    results: dict[str, list[float]] = {"raw_copy": [], "raw_pwrite": [], "append": [],
                                       "produce": [], "read": [], "recovery": [], "durable": [],
                                       "flush_ms": [], "append_resident": [],
                                       "group_commit": []}
    group_extra: list[dict[str, float]] = []
    extra: dict[str, float | int] = {}
    try:
        for run in range(args.repeat):
            results["raw_copy"].append(bench_raw_copy(
                root / f"raw-{run}", payload, args.total_mib << 20, segment_bytes, False))
            results["raw_pwrite"].append(bench_raw_copy(
                root / f"rawp-{run}", payload, args.total_mib << 20, segment_bytes, True))
            directory = root / f"append-{run}"
            results["append"].append(
                bench_append(directory, payload, args.total_mib << 20, segment_bytes, False))
            read_gb_s, read_bytes = bench_read(directory, segment_bytes)
            results["read"].append(read_gb_s)
            shutil.rmtree(directory)
            directory = root / f"produce-{run}"
            results["produce"].append(
                bench_append(directory, payload, args.total_mib << 20, segment_bytes, True))
            shutil.rmtree(directory)
            results["append_resident"].append(bench_append_resident(
                root / f"resident-{run}", payload, min(args.total_mib, 1024) << 20))
            shutil.rmtree(root / f"resident-{run}")
            durable_gb_s, flush_ms = bench_durable(root / f"durable-{run}", payload,
                                                   args.durable_mib << 20, segment_bytes)
            results["durable"].append(durable_gb_s)
            results["flush_ms"].append(flush_ms)
            shutil.rmtree(root / f"durable-{run}")
            group = bench_group_commit(root / f"group-{run}", args.durable_mib << 20,
                                       segment_bytes)
            results["group_commit"].append(group["group_commit_records_s"])
            group_extra.append(group)
            shutil.rmtree(root / f"group-{run}")
            directory = root / f"recovery-{run}"
            recovery = bench_recovery(directory, payload, args.recovery_records, segment_bytes)
            results["recovery"].append(float(recovery["recovery_s"]))
            extra.update({k: v for k, v in recovery.items() if k != "recovery_s"})
            shutil.rmtree(directory)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    output = {
        "append_gb_s": round(max(results["append"]), 3),
        "raw_mmap_copy_gb_s": round(max(results["raw_copy"]), 3),
        "raw_pwrite_gb_s": round(max(results["raw_pwrite"]), 3),
        "produce_gb_s": round(max(results["produce"]), 3),
        "append_resident_gb_s": round(max(results["append_resident"]), 3),
        "read_gb_s": round(max(results["read"]), 3),
        "durable_append_gb_s": round(max(results["durable"]), 3),
        "flush_p50_ms": round(min(results["flush_ms"]), 2),
        "group_commit_records_s": round(max(results["group_commit"])),
        "group_commit_appends_per_fsync": round(
            max(group_extra, key=lambda g: g["group_commit_records_s"])
            ["group_commit_appends_per_fsync"], 1),
        "recovery_s": round(min(results["recovery"]), 4),
        "runs": {k: [round(v, 4) for v in values] for k, values in results.items()},
        "read_bytes": read_bytes,
        **extra,
        "record_bytes": RECORD,
        "batch_bytes": len(payload),
        "segment_bytes": segment_bytes,
        "appended_bytes_per_run": (args.total_mib << 20) // len(payload) * len(payload),
        "read_consumed_by": "memoryview copy into a reusable bytearray",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(output))
    else:
        for key, value in output.items():
            print(f"{key:>28}: {value}")


if __name__ == "__main__":
    sys.exit(main())
