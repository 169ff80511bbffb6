"""Soak: a normal producer/consumer pair next to clients that misbehave, on one real broker.

    python benchmarks/soak.py [--seconds 20] [--idle 1000] [--slow 100] [--flood-rate 2000]

Prints one JSON object. One broker process on 127.0.0.1 (port 0, temporary data directory).
The normal pair (one producer connection, acks=leader, 1 KiB values in batches of 100, 8
requests in flight; one long-polling Consumer) runs twice for --seconds each: first on a quiet
broker, then while a separate process keeps open

- --idle connections that never send a byte,
- --slow clients that pipeline FETCH requests for 1 MiB each and never read a response
  (the broker must pause them, not buffer for them),
- a flood of malformed frames (--flood-rate per second over short-lived connections: garbage
  bytes, frame lengths above the limit, frames cut off, headers that do not decode).

Reported: the pair's msg/s in both runs and their ratio (goal: soak >= 0.8 x quiet), the
broker's resident memory sampled every half second during the soak (goal: bounded, so the
last samples do not keep climbing), how many of each misbehaving client ran, and a loss check:
every record the producer had acknowledged was consumed, in order, exactly once.
Bounded in time (about 2 x --seconds + set-up) and in count; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))

from brokerproc import BrokerProcess  # noqa: E402
from rustmq.client.admin import Admin  # noqa: E402
from rustmq.client.connection import Connection  # noqa: E402
from rustmq.client.consumer import Consumer  # noqa: E402
from rustmq.protocol import batch as record_batch  # noqa: E402
from rustmq.protocol import frames, records  # noqa: E402
from rustmq.protocol.api import ApiKey  # noqa: E402

VALUE = 1024
PER_BATCH = 100


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def anon_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


async def normal_pair(bootstrap: str, topic: str, seconds: float) -> dict[str, object]:
    """Produce for `seconds`, consume everything acknowledged; msg/s and the loss check."""
    host, port = bootstrap.rsplit(":", 1)
    producer = await Connection.open(host, int(port))
    consumer = Consumer(bootstrap, topic, start="earliest", max_wait_ms=200)
    await consumer.start()
    acked: list[int] = []  # base offsets of acknowledged batches
    window = asyncio.Semaphore(8)
    sequence = 0
    errors: list[str] = []

    async def send(body: bytes) -> None:
        try:
            future = producer.send({"api": int(ApiKey.PRODUCE), "topic": topic, "partition": 0, "acks": 1}, body)
            assert future is not None
            header, _ = await future
            if header.get("error"):
                errors.append(str(header))
            else:
                acked.append(int(header["base_offset"]))
        finally:
            window.release()

    received: list[int] = []  # sequence numbers in the order consumed
    stop = asyncio.Event()

    async def consume() -> None:
        while not stop.is_set() or len(received) < len(acked) * PER_BATCH:
            for _partition, data, _fetched_from in await consumer.fetch_raw():
                pos = 0
                while pos < len(data):
                    header = record_batch.read_header(data, pos)
                    body = data[pos + record_batch.HEADER_SIZE : pos + header.size]
                    received.extend(struct.unpack_from(">Q", record[2])[0] for record in records.decode_body(body, header.codec))
                    pos += header.size

    consuming = asyncio.get_running_loop().create_task(consume())
    started = time.perf_counter()
    tasks: set[asyncio.Task[None]] = set()
    while time.perf_counter() - started < seconds:
        values = [[0, None, struct.pack(">Q", sequence + i) + b"." * (VALUE - 8), None] for i in range(PER_BATCH)]
        sequence += PER_BATCH
        now_ms = int(time.time() * 1000)
        built = record_batch.build_batch(records.encode_body(values), record_count=PER_BATCH,
                                          first_timestamp_ms=now_ms, max_timestamp_ms=now_ms)
        await window.acquire()
        task = asyncio.get_running_loop().create_task(send(built))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    produced_s = time.perf_counter() - started
    stop.set()
    try:
        await asyncio.wait_for(consuming, 60)
    except TimeoutError:
        consuming.cancel()
    consumed_s = time.perf_counter() - started
    producer.close()
    await consumer.close()
    acked_records = len(acked) * PER_BATCH
    first = received[0] if received else 0
    in_order = received == list(range(first, first + len(received)))
    return {
        "acked_records": acked_records,
        "consumed_records": len(received),
        "msg_per_s": round(acked_records / produced_s),
        "produce_s": round(produced_s, 2),
        "consumed_all_s": round(consumed_s, 2),
        "errors": errors[:3],
        "lost": max(0, acked_records - len(received)),
        "in_order_exactly_once": in_order and len(received) == acked_records,
    }


# ------------------------------------------------------------------------------ hostile side

def hostile(producer_port: int, consumer_port: int, topic: str, idle: int, slow: int, flood_rate: int,
            seconds: float) -> None:
    """Runs in its own process (--role hostile); prints one JSON line of counts at the end."""
    raise_nofile()
    idle_socks = [socket.create_connection(("127.0.0.1", producer_port if i % 2 else consumer_port))
                  for i in range(idle)]
    slow_socks = []
    fetch = frames.encode_frame({"api": int(ApiKey.FETCH), "corr": 1, "max_wait_ms": 0, "max_bytes": 1 << 20,
                                 "partitions": [{"topic": topic, "partition": 0, "offset": 0, "max_bytes": 1 << 20}]})
    for _ in range(slow):
        sock = socket.create_connection(("127.0.0.1", consumer_port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        slow_socks.append(sock)
    stop_at = time.monotonic() + seconds
    counts = {"idle_open": 0, "slow": slow, "slow_requests": 0, "malformed_frames": 0, "flood_connections": 0}

    def keep_slow() -> None:
        while time.monotonic() < stop_at:
            for sock in slow_socks:
                try:
                    sock.send(fetch)  # never read: the broker must stop reading this socket
                    counts["slow_requests"] += 1
                except (BlockingIOError, OSError):
                    pass
            time.sleep(0.2)

    malformed = [
        b"\xff\xff\xff\xff",  # a length far above the limit: FRAME_TOO_LARGE, closed
        struct.pack(">I", 12) + b"\x00\x00\x00\x08" + b"\xc1" * 8,  # a header that does not decode
        struct.pack(">I", 5) + b"\x07garbg",  # neither a header nor a simple message
        struct.pack(">I", 1000) + b"\x00" * 10,  # cut off
    ]

    def flood() -> None:
        index = 0
        interval = 1 / max(1, flood_rate / 8)
        while time.monotonic() < stop_at:
            started = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", producer_port), timeout=2) as sock:
                    counts["flood_connections"] += 1
                    for _ in range(8):
                        sock.sendall(malformed[index % 3] if index % 4 else malformed[1])
                        index += 1
                        counts["malformed_frames"] += 1
                    sock.sendall(malformed[3])
            except OSError:
                pass
            time.sleep(max(0.0, interval - (time.monotonic() - started)))

    threads = [threading.Thread(target=keep_slow, daemon=True), threading.Thread(target=flood, daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for sock in idle_socks:
        try:
            sock.setblocking(False)
            if sock.recv(1) == b"":
                continue  # closed by the broker
        except BlockingIOError:
            counts["idle_open"] += 1
        except OSError:
            continue
    print(json.dumps(counts), flush=True)
    for sock in idle_socks + slow_socks:
        sock.close()


# ------------------------------------------------------------------------------ driver

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--slow", type=int, default=100)
    parser.add_argument("--flood-rate", type=int, default=2000, help="malformed frames per second")
    parser.add_argument("--role", choices=["driver", "hostile"], default="driver")
    parser.add_argument("--ports", default="")
    parser.add_argument("--topic", default="soak")
    args = parser.parse_args()
    if args.role == "hostile":
        producer_port, consumer_port = map(int, args.ports.split(","))
        hostile(producer_port, consumer_port, args.topic, args.idle, args.slow, args.flood_rate, args.seconds)
        return 0

    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="rustmq-soak-") as tmp:
        broker = BrokerProcess(Path(tmp) / "data", "--partitions", "1", "--max-connections", str(args.idle + args.slow + 200),
                               preexec_fn=raise_nofile).start()
        try:
            bootstrap = broker.bootstrap

            async def setup() -> None:
                async with Admin(bootstrap) as admin:
                    for name in ("quiet", "soak", "slowread"):
                        await admin.create_topic(name, 1)

            asyncio.run(setup())
            # Data for the slow readers' fetches, so their responses are large and pile up.
            filler = asyncio.run(normal_pair(bootstrap, "slowread", 2.0))
            quiet = asyncio.run(normal_pair(bootstrap, "quiet", args.seconds))
            rss_quiet = anon_rss_mb(broker.pid)
            hostile_proc = subprocess.Popen(
                [sys.executable, __file__, "--role", "hostile", "--ports", f"{broker.producer_port},{broker.consumer_port}",
                 "--topic", "slowread", "--idle", str(args.idle), "--slow", str(args.slow),
                 "--flood-rate", str(args.flood_rate), "--seconds", str(args.seconds + 6)],
                stdout=subprocess.PIPE, text=True)
            time.sleep(4)  # the idle and slow connections are open before the pair starts
            samples: list[tuple[float, float]] = []
            sampling = threading.Event()

            def sample() -> None:
                started = time.monotonic()
                while not sampling.is_set():
                    samples.append((round(time.monotonic() - started, 1), anon_rss_mb(broker.pid)))
                    time.sleep(0.5)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            soak = asyncio.run(normal_pair(bootstrap, "soak", args.seconds))
            out, _ = hostile_proc.communicate(timeout=120)
            sampling.set()
            sampler.join()
            counts = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
            alive = broker.alive()
        finally:
            code = broker.stop()
    rss = [mb for _, mb in samples]
    half = len(rss) // 2
    result = {
        "bench": "soak",
        "seconds_per_run": args.seconds,
        "quiet": quiet,
        "soak": soak,
        "ratio": round(soak["msg_per_s"] / quiet["msg_per_s"], 3) if quiet["msg_per_s"] else None,  # type: ignore[operator]
        "goal_ratio": 0.8,
        "hostile": counts,
        "broker_anon_rss_mb": {"after_quiet": rss_quiet, "min": min(rss, default=None), "max": max(rss, default=None),
                               "first_half_max": max(rss[:half], default=None), "second_half_max": max(rss[half:], default=None),
                               "samples": samples[:: max(1, len(samples) // 20)]},
        "broker_alive_after": alive,
        "broker_exit_code": code,
        "filler_records": filler["acked_records"],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
