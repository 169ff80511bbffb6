"""Queue consumption and group rebalance over the network, against a real broker process.

Prints one JSON object. Starts its own broker (``python -m rustmq broker`` on port 0 with a
temporary data dir) unless ``--bootstrap`` is given. Each figure is the best of ``--repeat`` runs
(the machine is shared: the best run is the least disturbed one). Usage::

    .venv/bin/python benchmarks/queue_network.py [--messages 200000] [--batch 1000] [--repeat 3]

Figures (100-byte records, one topic of 3 partitions, one consumer connection, loopback):
* queue_individual_ack_msg_per_s: ``message = await consumer.receive(); message.ack()`` per
  record (QueueConsumer fetches --batch leased records at a time; each ack() is for its record
  only, and the client sends the acks of one event-loop pass as one QUEUE_ACK per partition;
  the consumer's close() waits until every ack is confirmed durable, inside the timing).
* queue_ack_request_per_message_msg_per_s: the same without client grouping: one QUEUE_ACK
  request per record on the wire (pipelined; each answered after its journal append is
  fsynced; the broker shares appends and fsyncs among the acks of one event-loop pass).
* queue_batched_ack_msg_per_s: QUEUE_FETCH of --batch records, then ``ack_many`` (one QUEUE_ACK
  per partition carrying offset ranges, on the consumer's settle connection); the next fetch is
  sent while the acks wait for their fsync, up to 4 batches of acks outstanding.
* rebalance_after_leave_ms: 4 GroupConsumers share a 12-partition topic; one leaves cleanly;
  time from the LEAVE_GROUP request until every remaining member has adopted the new
  generation and together they own all 12 partitions (held heartbeats, no polling interval).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "broker"))

from rustmq import eventloop  # noqa: E402
from rustmq.client import Admin, Producer  # noqa: E402
from rustmq.client.groups import GroupConsumer  # noqa: E402
from rustmq.client.queues import QueueConsumer  # noqa: E402
from rustmq.protocol.api import ApiKey  # noqa: E402


def start_broker(data_dir: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ports_file = data_dir.parent / "ports.json"
    command = [sys.executable, "-m", "rustmq", "broker", "--host", "127.0.0.1", "--producer-port", "0",
               "--consumer-port", "0", "--metrics-port", "0", "--data-dir", str(data_dir),
               "--ports-file", str(ports_file), "--partitions", "3", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not ports_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("broker did not start")
        time.sleep(0.05)
    return process, json.loads(ports_file.read_text())


async def fill(bootstrap: str, topic: str, messages: int) -> None:
    value = b"x" * 100
    async with Producer(bootstrap, acks="leader") as producer:
        for start in range(0, messages, 1000):
            await producer.send_batch(topic, [value] * min(1000, messages - start), partition=(start // 1000) % 3)


async def individual_acks(bootstrap: str, topic: str, messages: int, batch: int) -> float:
    """The seed course's loop: receive one message, ack it (not awaited one by one)."""
    async with QueueConsumer(bootstrap, topic, "individual", max_messages=batch, max_wait_ms=1000) as consumer:
        done = 0
        started = time.perf_counter()
        while done < messages:
            message = await consumer.receive(timeout_s=5)
            if message is None:
                break
            message.ack()
            done += 1
        await consumer.close()  # waits for the acks still in flight
        assert consumer.ack_failures == 0
        return done / (time.perf_counter() - started)


async def ack_request_per_message(bootstrap: str, topic: str, messages: int, batch: int) -> float:
    """One QUEUE_ACK request per record on the wire (pipelined), no client-side grouping."""
    async with QueueConsumer(bootstrap, topic, "per-request", max_messages=batch, max_wait_ms=1000) as consumer:
        connection = consumer._settle_connection
        assert connection is not None
        done = 0
        started = time.perf_counter()
        while done < messages:
            leased = await consumer.receive_batch()
            if not leased:
                break
            futures = [connection.send({"api": int(ApiKey.QUEUE_ACK), "subscription": "per-request", "topic": topic,
                                        "partition": m.partition, "offsets": [m.offset]}) for m in leased]
            for future in futures:
                response = await future  # type: ignore[misc]
                assert response.header["error"] == 0, response.header
            done += len(leased)
        return done / (time.perf_counter() - started)


async def batched_acks(bootstrap: str, topic: str, messages: int, batch: int, window: int = 4) -> float:
    """receive_batch() then ack_many(batch), up to `window` ack requests awaiting their fsync."""
    async with QueueConsumer(bootstrap, topic, "batched", max_messages=batch, max_wait_ms=1000) as consumer:
        done = 0
        pending: deque[asyncio.Future[int]] = deque()
        started = time.perf_counter()
        while done < messages:
            leased = await consumer.receive_batch()
            if not leased:
                break
            while len(pending) >= window:
                await pending.popleft()
            pending.append(asyncio.ensure_future(consumer.ack_many(leased)))
            done += len(leased)
        for ack in pending:
            await ack
        return done / (time.perf_counter() - started)


async def rebalance(bootstrap: str, topic: str) -> float:
    members = [await GroupConsumer(bootstrap, topic, group=f"bench-{time.monotonic_ns()}", session_timeout_ms=10_000,
                                   heartbeat_wait_ms=3_000).start() for _ in range(1)]
    group = members[0].group
    for _ in range(3):
        members.append(await GroupConsumer(bootstrap, topic, group=group, session_timeout_ms=10_000,
                                           heartbeat_wait_ms=3_000).start())

    async def settled(live: list[GroupConsumer]) -> None:
        while True:
            for m in live:
                await m._maybe_adopt()
            owned = sorted(tp for m in live for tp in m.assignment)
            if len({m.generation for m in live}) == 1 and owned == [(topic, p) for p in range(12)]:
                return
            await asyncio.sleep(0.0005)

    await asyncio.wait_for(settled(members), 10)
    leaving, rest = members[-1], members[:-1]
    started = time.perf_counter()
    await leaving.close()
    await asyncio.wait_for(settled(rest), 10)
    elapsed = time.perf_counter() - started
    for m in rest:
        await m.close()
    return elapsed * 1000


async def run(args: argparse.Namespace, bootstrap: str) -> dict[str, object]:
    results: dict[str, list[float]] = {"queue_individual_ack_msg_per_s": [], "queue_batched_ack_msg_per_s": [],
                                       "queue_ack_request_per_message_msg_per_s": [], "rebalance_after_leave_ms": []}
    async with Admin(bootstrap) as admin:
        await admin.create_topic("bench-rebalance", 12)
    for run_index in range(args.repeat):
        topic = f"bench-queue-{run_index}-{time.monotonic_ns()}"
        await fill(bootstrap, topic, args.messages)
        results["queue_individual_ack_msg_per_s"].append(
            await individual_acks(bootstrap, topic, min(args.messages, args.individual_messages), args.batch))
        results["queue_batched_ack_msg_per_s"].append(await batched_acks(bootstrap, topic, args.messages, args.batch))
        results["queue_ack_request_per_message_msg_per_s"].append(
            await ack_request_per_message(bootstrap, topic, min(args.messages, args.individual_messages), args.batch))
        results["rebalance_after_leave_ms"].append(await rebalance(bootstrap, "bench-rebalance"))
    best = {
        "queue_individual_ack_msg_per_s": round(max(results["queue_individual_ack_msg_per_s"])),
        "queue_batched_ack_msg_per_s": round(max(results["queue_batched_ack_msg_per_s"])),
        "queue_ack_request_per_message_msg_per_s": round(max(results["queue_ack_request_per_message_msg_per_s"])),
        "rebalance_after_leave_ms": round(min(results["rebalance_after_leave_ms"]), 2),
    }
    return {
        **best,
        "runs": {k: [round(v, 2) for v in vs] for k, vs in results.items()},
        "messages": args.messages,
        "individual_messages": min(args.messages, args.individual_messages),
        "batch": args.batch,
        "record_bytes": 100,
        "python": platform.python_version(),
        "client_event_loop": eventloop.name(),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", help="an already running broker (default: start one)")
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--individual-messages", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.bootstrap:
        print(json.dumps(eventloop.run(run(args, args.bootstrap))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        process, ports = start_broker(Path(tmp) / "data")
        try:
            result = eventloop.run(run(args, f"127.0.0.1:{ports['producer_port']}"))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
