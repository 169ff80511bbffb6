"""Client throughput before, during and after the drain of a broker holding a backlog (issue 14).

    python benchmarks/drain_throughput.py [--backlog-mib 1024] [--rate 10000] [--phase-s 15]
                                          [--throttles default,0] [--segment-bytes N] [--keep-logs DIR]

Prints one JSON object. The question: do clients keep their throughput while the controller
copies a leaving broker's replicas elsewhere, with the catch-up throttle
(`RUSTMQ_REASSIGN_BYTES_PER_S`, default 50 MiB/s) and without it (0)?

For each throttle setting, a fresh cluster on the local control plane (`scripts/local-cluster
up`, or $KUBECONFIG when it names a file) with the brokers' DEFAULT timing:

1. three brokers; topic `live` (3 partitions, replication factor 3) for the clients, then
   `--backlog-mib` MiB written with acks=all to topic `backlog` (3 partitions, RF 3), so
   broker 2 holds the whole backlog; a fourth broker starts (no membership yet: it gets nothing);
2. the client process starts: one producer with acks=all offering `--rate` 1 KiB records per
   second to `live` (a batch per partition every 0.1 s, each tick waiting for its acks, so a slow
   cluster shows as lower throughput and longer tick latency, not as an unbounded queue) and one
   consumer reading `live` from the end (raw batches, bytes counted). It logs every tick and
   every fetch with the machine's monotonic clock;
3. `--phase-s` seconds of load ("before"); then the membership drops broker 2, as the operator
   does for a scale-down, and "during" lasts until the controller's report says broker 2 holds
   nothing and nothing moves; then `--phase-s` seconds "after".

The brokers run with their default segment size (64 MiB) unless `--segment-bytes` says otherwise
(the test harness' own default is 1 MiB, many more files per GiB to create and delete).
`--keep-logs DIR` keeps the client's and the brokers' logs with the phase times.

Per phase: produced and consumed MB/s (1 MB = 10^6 bytes; consumed counts record-batch bytes,
about 3 % over the payload) and the ticks' acknowledgement latency p50/p99/max; and the CPU each broker and the client used
(in cores) with the share of the whole machine's CPU that was busy (other work included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))

import clusterproc  # noqa: E402

RUSTMQ = [sys.executable, "-m", "rustmq"]
DEFAULT_TIMING = {"RUSTMQ_LEASE_DURATION_S": "6", "RUSTMQ_LEASE_RENEW_S": "1", "RUSTMQ_API_TIMEOUT_S": "2",
                  "RUSTMQ_REPLICA_LAG_S": "5", "RUSTMQ_CLUSTER_POLL_S": "0.5"}
VALUE = 1024
TICK_S = 0.1


# -- the client process ----------------------------------------------------------------------


async def client(bootstrap: str, rate: int, log: Path) -> None:
    """Producer and consumer of `live` until SIGTERM; one JSON line per tick / fetch."""
    from rustmq.client.consumer import Consumer
    from rustmq.client.producer import Producer

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    out = log.open("w", buffering=1)
    per_partition = max(1, round(rate * TICK_S / 3))
    values = [b"x" * VALUE] * per_partition

    async def produce() -> None:
        async with Producer(bootstrap, acks="all", linger_ms=0, request_timeout_s=10, delivery_timeout_s=60) as producer:
            next_tick = time.monotonic()
            while not stop.is_set():
                started = time.monotonic()
                for partition in range(3):
                    await producer.send_batch("live", values, partition=partition)
                try:
                    await producer.flush()
                    sent = 3 * per_partition
                except Exception as exc:  # counted as nothing delivered in this tick
                    out.write(json.dumps({"error": repr(exc)[:200], "t": started}) + "\n")
                    sent = 0
                out.write(json.dumps({"p": sent, "t": started, "lat": round(time.monotonic() - started, 4)}) + "\n")
                next_tick = max(next_tick + TICK_S, time.monotonic())
                await asyncio.sleep(max(0.0, next_tick - time.monotonic()))

    async def consume() -> None:
        consumer = await Consumer(bootstrap, "live", start="latest", max_wait_ms=100, timeout_s=10).start()
        try:
            while not stop.is_set():
                got = await consumer.fetch_raw()
                size = sum(len(data) for _, data, _ in got)
                if size:
                    out.write(json.dumps({"c": size, "t": time.monotonic()}) + "\n")
        finally:
            await consumer.close()

    tasks = [asyncio.create_task(produce()), asyncio.create_task(consume())]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    out.close()


# -- the orchestration -----------------------------------------------------------------------


def create(cluster: clusterproc.BrokerCluster, topic: str) -> None:
    subprocess.run([*RUSTMQ, "topic", "create", topic, "--partitions", "3", "--replication-factor", "3",
                    "--bootstrap", cluster.bootstrap], check=True, capture_output=True, timeout=60)
    cluster.wait_for(lambda m: all(len(p["isr"]) == 3 and p["leader"] >= 0 for p in m["topics"][0]["partitions"]),
                     "full ISR", 60, [topic])


def phases(log: Path, bounds: dict[str, tuple[float, float]]) -> dict[str, Any]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    out: dict[str, Any] = {}
    for name, (start, end) in bounds.items():
        ticks = [x for x in lines if "p" in x and start <= x["t"] < end]
        fetched = sum(x["c"] for x in lines if "c" in x and start <= x["t"] < end)
        errors = sum(1 for x in lines if "error" in x and start <= x["t"] < end)
        latencies = sorted(x["lat"] for x in ticks)
        span = end - start
        out[name] = {
            "seconds": round(span, 1),
            "produced_mb_per_s": round(sum(x["p"] for x in ticks) * VALUE / span / 1e6, 2),
            "consumed_mb_per_s": round(fetched / span / 1e6, 2),
            "tick_latency_ms": {
                "p50": round(1000 * statistics.median(latencies), 1) if latencies else None,
                "p99": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1) if latencies else None,
                "max": round(1000 * latencies[-1], 1) if latencies else None,
            },
            "failed_ticks": errors,
        }
    return out


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, every core (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / os.sysconf("SC_CLK_TCK"), total / os.sysconf("SC_CLK_TCK")


def cpu_sample(pids: dict[str, int]) -> dict[str, Any]:
    return {"processes": {name: process_cpu_s(pid) for name, pid in pids.items()}, "machine": machine_cpu()}


def cpu_between(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """CPU used between two samples: cores' worth per process and for the machine."""
    (busy0, total0), (busy1, total1) = first["machine"], second["machine"]
    cores = len(os.sched_getaffinity(0))
    wall = (total1 - total0) / cores
    return {
        "cores_used": {name: round((second["processes"][name] - used) / wall, 2) for name, used in first["processes"].items()},
        "machine_busy_share": round((busy1 - busy0) / (total1 - total0), 2),
    }


def run_once(kubeconfig: Path, root: Path, args: argparse.Namespace, throttle: str) -> dict[str, Any]:
    env = dict(DEFAULT_TIMING)
    if throttle != "default":
        env["RUSTMQ_REASSIGN_BYTES_PER_S"] = throttle
    namespace = clusterproc.create_namespace(kubeconfig)
    # The test harness gives brokers 1 MiB segments (many files from little data); "{}" restores
    # the brokers' default segment size, as a production broker runs.
    log_config = {} if args.segment_bytes is None else {"segment_bytes": args.segment_bytes}
    cluster = clusterproc.BrokerCluster(root, kubeconfig, namespace, 3, env=env,
                                        extra_args=("--log", json.dumps(log_config))).start_all()
    client_process = None
    try:
        create(cluster, "live")
        create(cluster, "backlog")
        started = time.monotonic()
        subprocess.run([*RUSTMQ, "bench", "produce", "--acks", "all", "--messages", str(args.backlog_mib * 1024),
                        "--size", "1024", "--partitions", "3", "--concurrency", "3", "--topic", "backlog",
                        "--keep-topic", "--bootstrap", cluster.bootstrap, "--json"],
                       check=True, capture_output=True, timeout=1800)
        backlog_s = time.monotonic() - started
        cluster.size = 4
        cluster.start(3)
        cluster.wait_until_sees_all(3, timeout=60)
        deadline = time.monotonic() + 120
        while True:  # the controller's report of broker 2's bytes (from its Lease)
            health = clusterproc.read_health(cluster)
            if health is not None and health["brokers"].get("2", {}).get("bytes", 0) >= args.backlog_mib << 20:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no health report with broker 2's bytes: {health}")
            time.sleep(0.5)
        held = health["brokers"]["2"]["bytes"]

        log = root / "client.jsonl"
        client_process = subprocess.Popen(
            [sys.executable, __file__, "--client", cluster.bootstrap, "--rate", str(args.rate), "--log", str(log)],
            env=dict(os.environ))
        time.sleep(3)  # connected and running
        pids = {f"broker_{i}": process.proc.pid for i, process in sorted(cluster.brokers.items()) if process.proc is not None}
        pids["client"] = client_process.pid
        samples = [cpu_sample(pids)]
        before_start = time.monotonic()
        time.sleep(args.phase_s)
        samples.append(cpu_sample(pids))
        drain_start = time.monotonic()
        clusterproc.write_membership(cluster, [0, 1, 3], generation=1)
        while True:
            health = clusterproc.read_health(cluster)
            assert health is not None
            if (health["observedMembershipGeneration"] == 1 and health["reassigning"] == 0
                    and health["brokers"].get("2", {}).get("replicas", 0) == 0):
                break
            if time.monotonic() - drain_start > 1800:
                raise RuntimeError(f"drain not done in 1800 s: {health}")
            if client_process.poll() is not None:
                raise RuntimeError(f"the client process exited with {client_process.returncode}")
            time.sleep(0.25)
        drain_end = time.monotonic()
        samples.append(cpu_sample(pids))
        time.sleep(args.phase_s)
        after_end = time.monotonic()
        samples.append(cpu_sample(pids))
        client_process.send_signal(signal.SIGTERM)
        client_process.wait(60)
        if args.keep_logs is not None:  # the client's log and the brokers' logs, for a closer look
            kept = args.keep_logs / f"{throttle}-{int(time.time())}"
            kept.mkdir(parents=True)
            shutil.copy(log, kept / "client.jsonl")
            for broker_log in root.glob("*-broker.log"):
                shutil.copy(broker_log, kept / broker_log.name)
            (kept / "phases.json").write_text(json.dumps({"before": before_start, "drain": drain_start,
                                                          "drained": drain_end, "end": after_end}))
        cpu = {name: cpu_between(samples[i], samples[i + 1]) for i, name in enumerate(("before", "during", "after"))}
        return {
            "reassign_bytes_per_s": throttle, "segment_bytes": args.segment_bytes or "default", "backlog_mib": args.backlog_mib, "backlog_write_s": round(backlog_s, 1),
            "broker_2_log_bytes": held, "drain_s": round(drain_end - drain_start, 1),
            "drain_mb_per_s": round(held / (drain_end - drain_start) / 1e6, 1),
            "offered_mb_per_s": round(3 * max(1, round(args.rate * TICK_S / 3)) * VALUE / TICK_S / 1e6, 2),
            "phases": phases(log, {"before": (before_start, drain_start), "during": (drain_start, drain_end),
                                   "after": (drain_end, after_end)}),
            "cpu": cpu,
        }
    finally:
        if client_process is not None and client_process.poll() is None:
            client_process.kill()
            client_process.wait(10)
        cluster.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backlog-mib", type=int, default=1024)
    parser.add_argument("--rate", type=int, default=10_000, help="records of 1 KiB per second offered by the producer")
    parser.add_argument("--phase-s", type=float, default=15.0, help="seconds of load before and after the drain")
    parser.add_argument("--throttles", default="default,0",
                        help="comma-separated RUSTMQ_REASSIGN_BYTES_PER_S values, 'default' for the brokers' own")
    parser.add_argument("--segment-bytes", type=int, help="the brokers' segment size (default: theirs, 64 MiB)")
    parser.add_argument("--keep-logs", type=Path, help="copy the client's and the brokers' logs (and the phase times) here")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # internal: run the client process
    parser.add_argument("--log", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(client(args.client, args.rate, args.log))
        return
    report: dict[str, Any] = {"machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                                          "load_average": os.getloadavg()},
                              "timing": DEFAULT_TIMING, "runs": []}
    with clusterproc.control_plane() as kubeconfig, tempfile.TemporaryDirectory() as tmp:
        for index, throttle in enumerate(args.throttles.split(",")):
            root = Path(tmp) / f"run{index}"
            root.mkdir()
            result = run_once(kubeconfig, root, args, throttle.strip())
            print(json.dumps(result), file=sys.stderr, flush=True)
            report["runs"].append(result)
    report["machine"]["load_average_after"] = os.getloadavg()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
