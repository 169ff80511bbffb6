"""``rustmq bench``: produce, consume, latency and slow-consumer benchmarks that print JSON.

In the spirit of kafka-producer-perf-test / kafka-consumer-perf-test. Payloads are one random
buffer reused for every record (as those tools do); records are encoded by the real client code
path (one msgpack call and one CRC per batch), so the client cost is included. With ``--json``
one JSON object is printed; on a terminal a progress line is drawn on stderr meanwhile.

* ``produce``: batched PRODUCE requests (``--batch-bytes``), ``--in-flight`` pipelined per
  connection, ``--concurrency`` connections; ``--simple`` sends seed-style single messages
  (one frame per message, ``--in-flight`` pipelined) instead.
* ``consume``: fills ``--messages`` into a fresh topic unless ``--no-fill``, then times one
  consumer reading them from the earliest offset (batches decoded with msgpack).
* ``latency``: a producer at a fixed ``--rate`` (records sent on a 1 ms tick, each carrying its
  intended send time, so a stalled broker cannot hide latency) and a long-polling consumer in
  the same process; end-to-end latency = receive time - intended send time.
* ``stall``: a consumer connection that pipelines fetches and never reads, while a producer
  writes ``--messages``; reports the broker's RSS over time (bounded buffering per consumer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from rustmq import eventloop
from rustmq.client.admin import Admin
from rustmq.client.connection import Connection, check, default_tls, parse_address
from rustmq.client.consumer import decode_batches
from rustmq.client.errors import BrokerError
from rustmq.client.routing import Routes
from rustmq.protocol import batch as record_batch
from rustmq.protocol import records, simple
from rustmq.protocol.api import ApiKey

ACKS = {"none": 0, "leader": 1, "durable": 2, "all": 3}


def add_arguments(commands: Any, client_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """Each subcommand takes only the flags it uses: a flag it would ignore is refused by argparse
    (``unrecognized arguments``) instead of being silently dropped from the figures."""
    for name in ("produce", "consume", "latency", "stall"):
        parser = commands.add_parser(name)
        client_flags(parser)
        parser.add_argument("--topic", default=f"bench-{name}")
        parser.add_argument("--size", type=int, default=1024, help="value bytes per record")
        parser.add_argument("--duration", type=float, help="seconds (instead of --messages)")
        parser.add_argument("--acks", choices=list(ACKS), default="leader")
        parser.add_argument("--keep-topic", action="store_true", help="do not delete and recreate the topic")
        if name == "latency":
            # One producer connection on partition 0, one batch per 1 ms tick: the rate decides
            # batch sizes, and nothing else would change what is measured.
            parser.set_defaults(partitions=1)
            parser.add_argument("--rate", type=int, default=10_000, help="records per second")
            parser.add_argument("--warmup", type=float, default=2.0, help="seconds excluded from the figures")
            continue
        parser.add_argument("--partitions", type=int, default=1, help="partitions of a topic the bench creates")
        parser.add_argument("--messages", type=int, default=1_000_000)
        parser.add_argument("--batch-bytes", type=int, default=1 << 20)
        parser.add_argument("--in-flight", type=int, default=8)
        parser.add_argument("--concurrency", type=int, default=1, help="producer connections")
        parser.add_argument("--codec", choices=list(records.CODEC_NAMES), default="none")
        if name == "produce":
            parser.add_argument("--simple", action="store_true", help="seed-style single-message frames")
        if name == "consume":
            parser.add_argument("--no-fill", action="store_true")
            parser.add_argument("--max-bytes", type=int, default=8 << 20)
            parser.add_argument("--decode", choices=["messages", "bodies", "none"], default="bodies",
                                help="messages: build a Message per record; bodies: unpack batch bodies "
                                     "(default); none: count from batch headers only")


class Progress:
    def __init__(self, label: str, total: int | None) -> None:
        self.enabled = sys.stderr.isatty()
        self.label, self.total = label, total
        self.started = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.last < 0.5:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        of = f"/{self.total}" if self.total else ""
        sys.stderr.write(f"\r{self.label}: {done}{of} messages, {rate:,.0f} msg/s   ")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, int(round(fraction * (len(sorted_values) - 1)))))
    return sorted_values[index]


async def _prepare_topic(admin: Admin, args: argparse.Namespace) -> None:
    if args.keep_topic:
        if args.topic in await admin.list_topics():
            return
    elif args.topic in await admin.list_topics():
        await admin.delete_topic(args.topic)
    await admin.create_topic(args.topic, args.partitions)


def _payload(size: int) -> bytes:
    return os.urandom(size)


def _batch(value: bytes, count: int, codec: int) -> bytes:
    now = int(time.time() * 1000)
    # Every record of the bench is the same [delta, key, value, headers] entry, so one list
    # object is repeated: this measures encoding and the broker, not Python list building.
    body = records.encode_body([[0, None, value, None]] * count, codec)
    return record_batch.build_batch(body, record_count=count, first_timestamp_ms=now, max_timestamp_ms=now,
                                     codec=record_batch.Codec(codec))


async def _rss(admin: Admin) -> dict[str, Any]:
    stats = await admin.broker_stats()
    return {
        "broker_rss_mb": round(stats["rss_bytes"] / 2**20, 1),
        "broker_anon_rss_mb": round(stats.get("anon_rss_bytes", 0) / 2**20, 1),
        "broker_peak_rss_mb": round(stats["peak_rss_bytes"] / 2**20, 1),
        "broker_event_loop": stats.get("event_loop", "?"),
        "client_event_loop": eventloop.name(),
    }


def _result(kind: str, args: argparse.Namespace, messages: int, seconds: float, latencies_s: list[float], extra: dict[str, Any]) -> dict[str, Any]:
    latencies_s.sort()
    out = {
        "bench": kind,
        "messages": messages,
        "seconds": round(seconds, 3),
        "msg_per_s": round(messages / seconds) if seconds else 0,
        "mb_per_s": round(messages * args.size / seconds / 1e6, 1) if seconds else 0,
        "size": args.size,
    }
    if latencies_s:
        out.update(
            p50_ms=round(percentile(latencies_s, 0.50) * 1000, 3),
            p99_ms=round(percentile(latencies_s, 0.99) * 1000, 3),
            p999_ms=round(percentile(latencies_s, 0.999) * 1000, 3),
            max_ms=round(latencies_s[-1] * 1000, 3),
        )
    out.update(extra)
    return out


def _percentile_ms(values: list[float], fraction: float) -> float | None:
    return round(percentile(sorted(values), fraction) * 1000, 3) if values else None


def _print(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>20}: {value}")


async def run(args: argparse.Namespace) -> int:
    async with Admin(args.bootstrap) as admin:
        runner = {"produce": bench_produce, "consume": bench_consume, "latency": bench_latency, "stall": bench_stall}[args.bench_command]
        result = await runner(admin, args)
        result.update(await _rss(admin))
    _print(args, result)
    return 0


async def _produce_batches(connection: Connection, args: argparse.Namespace, payload: bytes, target: int | None,
                           deadline: float | None, counter: list[int], latencies: list[float], progress: Progress,
                           partition: int) -> None:
    per_batch = max(1, args.batch_bytes // max(1, args.size + 8))
    codec = records.CODEC_NAMES[args.codec]
    window = asyncio.Semaphore(args.in_flight)
    tasks: set[asyncio.Task[None]] = set()
    acks = ACKS[args.acks]

    async def one(frame_payload: bytes, count: int) -> None:
        started = time.perf_counter()
        header = {"api": int(ApiKey.PRODUCE), "topic": args.topic, "partition": partition, "acks": acks}
        if acks == 0:
            connection.send(header, frame_payload, expect_response=False)
            await connection.drain()
        else:
            future = connection.send(header, frame_payload)
            assert future is not None
            check(await future)
            latencies.append(time.perf_counter() - started)
        counter[0] += count
        progress.update(counter[0])
        window.release()

    while True:
        if target is not None and counter[1] >= target:
            break
        if deadline is not None and time.perf_counter() >= deadline:
            break
        count = per_batch if target is None else min(per_batch, target - counter[1])
        counter[1] += count
        frame_payload = _batch(payload, count, codec)
        await window.acquire()
        task = asyncio.get_running_loop().create_task(one(frame_payload, count))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


async def _wait_for_leaders(routes: Routes, args: argparse.Namespace) -> None:
    """A new topic's leaders take a poll period to start leading: ask each until it answers."""
    deadline = time.monotonic() + 30
    for partition in range(args.partitions):
        while True:
            connection = await routes.leader_connection(args.topic, partition, "consumer")
            try:
                await connection.request(
                    {"api": int(ApiKey.LIST_OFFSETS), "topic": args.topic, "partition": partition, "at": -1}, timeout=10)
                break
            except BrokerError:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.1)


async def bench_produce(admin: Admin, args: argparse.Namespace) -> dict[str, Any]:
    await _prepare_topic(admin, args)
    if args.simple:
        return await bench_simple(admin, args)
    payload = _payload(args.size)
    addresses = [(admin.host, admin.port)] * args.concurrency
    routes = Routes(args.bootstrap)
    try:
        for _ in range(100):  # a cluster: each connection goes to the leader of its partition
            await routes.metadata([args.topic])
            if not routes.clustered or min(routes.leaders.get(args.topic, [-1])) >= 0:
                break
            await asyncio.sleep(0.1)
        if routes.clustered:
            for index in range(args.concurrency):
                broker = routes.brokers[routes.leader_of(args.topic, index % args.partitions)]
                addresses[index] = (broker["host"], broker["producer_port"])
            await _wait_for_leaders(routes, args)
    finally:
        routes.close()
    connections = [await Connection.open(host, port) for host, port in addresses]
    counter = [0, 0]  # acknowledged, scheduled
    latencies: list[float] = []
    target = None if args.duration else args.messages
    progress = Progress("produce", target)
    started = time.perf_counter()
    deadline = started + args.duration if args.duration else None
    await asyncio.gather(*[
        _produce_batches(conn, args, payload, target, deadline, counter, latencies, progress, index % args.partitions)
        for index, conn in enumerate(connections)
    ])
    elapsed = time.perf_counter() - started
    progress.done()
    for conn in connections:
        conn.close()
    return _result("produce", args, counter[0], elapsed, latencies, {
        "acks": args.acks, "batch_bytes": args.batch_bytes, "in_flight": args.in_flight,
        "concurrency": args.concurrency, "codec": args.codec, "latency_is": "per produce request",
    })


async def bench_simple(admin: Admin, args: argparse.Namespace) -> dict[str, Any]:
    """Seed-style produce: one frame per message, up to --in-flight unanswered, replies u64."""
    context, name = default_tls()  # --tls* flags: seed-style produce over TLS too
    reader, writer = await asyncio.open_connection(admin.host, admin.port, ssl=context, server_hostname=name)
    frame = simple.encode_message(_payload(args.size), None, args.topic)
    target = args.messages if not args.duration else None
    deadline = time.perf_counter() + args.duration if args.duration else None
    progress = Progress("simple produce", target)
    sent_at: list[float] = []
    latencies: list[float] = []
    done = 0
    advanced = asyncio.Event()
    finished = False

    async def read_replies() -> None:
        nonlocal done
        pending = b""
        while not finished or done < len(sent_at):
            chunk = await reader.read(1 << 16)
            if not chunk:
                raise ConnectionError("broker closed the connection")
            pending += chunk
            usable = len(pending) - len(pending) % 8
            now = time.perf_counter()
            for (reply,) in struct.iter_unpack(">Q", pending[:usable]):
                if reply >> 63:
                    raise RuntimeError(f"broker answered error code {reply & 0xFFFF}")
                latencies.append(now - sent_at[done])
                done += 1
            pending = pending[usable:]
            advanced.set()
            progress.update(done)

    started = time.perf_counter()
    reader_task = asyncio.get_running_loop().create_task(read_replies())
    sent = 0
    while (target is None or sent < target) and (deadline is None or time.perf_counter() < deadline):
        room = args.in_flight - (sent - done)
        if room <= 0:
            advanced.clear()
            await advanced.wait()
            continue
        count = min(room, 64) if target is None else min(room, 64, target - sent)
        sent_at.extend([time.perf_counter()] * count)
        writer.write(frame * count)
        sent += count
        await writer.drain()
    finished = True
    while done < sent and not reader_task.done():
        advanced.clear()
        await advanced.wait()
    elapsed = time.perf_counter() - started
    if reader_task.done():
        reader_task.result()
    reader_task.cancel()
    progress.done()
    writer.close()
    return _result("produce-simple", args, done, elapsed, latencies, {"in_flight": args.in_flight, "latency_is": "per message"})


async def bench_consume(admin: Admin, args: argparse.Namespace) -> dict[str, Any]:
    if not args.no_fill:
        await _prepare_topic(admin, args)
        fill = argparse.Namespace(**{**vars(args), "duration": None})
        await _fill(admin, fill)
    from rustmq.client.consumer import Consumer

    total = 0
    for partition in range(args.partitions):
        total += await admin.list_offset(args.topic, partition, "latest") - await admin.list_offset(args.topic, partition, "earliest")
    target = min(total, args.messages)
    progress = Progress("consume", target)
    consumer = Consumer(f"{admin.host}:{admin.port}", args.topic, start="earliest", max_bytes=args.max_bytes, max_wait_ms=100)
    await consumer.start()
    seen = 0
    started = time.perf_counter()
    deadline = started + args.duration if args.duration else None
    while seen < target and (deadline is None or time.perf_counter() < deadline):
        for partition, data, fetched_from in await consumer.fetch_raw():
            if args.decode == "messages":
                messages, _ = decode_batches(args.topic, partition, data, fetched_from)
                seen += len(messages)
            elif args.decode == "bodies":
                seen += _decode_count(data, fetched_from)
            else:
                seen += consumer.positions[partition] - fetched_from
        progress.update(seen)
    elapsed = time.perf_counter() - started
    progress.done()
    await consumer.close()
    return _result("consume", args, seen, elapsed, [], {"max_bytes": args.max_bytes, "decoded": {"messages": "a Message per record", "bodies": "batch bodies unpacked (msgpack), no Message objects",
                "none": "nothing: records counted from batch headers (the broker's fetch rate)"}[args.decode]})


def _decode_count(data: memoryview, position: int) -> int:
    """Decode every batch body at or after position (one msgpack call each); count the records."""
    count = 0
    for pos, header in record_batch.iter_batches(data):
        if header.base_offset + header.record_count > position:
            entries = records.decode_body(data[pos + record_batch.HEADER_SIZE : pos + header.size], header.attributes & records.CODEC_MASK)
            count += len(entries) - max(0, position - header.base_offset)
    return count


async def _fill(admin: Admin, args: argparse.Namespace) -> None:
    """Write args.messages records spread evenly over the topic's partitions (leader acks)."""
    connection = await Connection.open(admin.host, admin.port)
    progress = Progress("fill", args.messages)
    base, extra = divmod(args.messages, args.partitions)
    payload = _payload(args.size)
    await asyncio.gather(*[
        _produce_batches(connection, args, payload, base + (1 if p < extra else 0), None, [0, 0], [], progress, p)
        for p in range(args.partitions)
    ])
    progress.done()
    connection.close()


async def bench_latency(admin: Admin, args: argparse.Namespace) -> dict[str, Any]:
    await _prepare_topic(admin, args)
    duration = args.duration or 10.0
    from rustmq.client.consumer import Consumer

    consumer = Consumer(f"{admin.host}:{admin.port}", args.topic, start="latest", max_wait_ms=500)
    await consumer.start()
    producer_conn = await Connection.open(admin.host, admin.port)
    pad = b"\0" * max(0, args.size - 16)
    latencies: list[float] = []
    from_send: list[float] = []  # the same messages, measured from when their request was written
    received = 0
    sent = 0
    started = time.perf_counter()
    warm_until = started + args.warmup
    end = started + args.warmup + duration
    stop = asyncio.Event()
    errors: list[BaseException] = []
    produced_until = end

    async def consume() -> None:
        nonlocal received
        while not stop.is_set() or received < sent:
            for _partition, data, fetched_from in await consumer.fetch_raw():
                now = time.perf_counter()
                messages, _ = decode_batches(args.topic, _partition, data, fetched_from)
                for message in messages:
                    assert message.value is not None  # the bench producer always sends a value
                    intended, written = struct.unpack_from(">dd", message.value)
                    if intended >= warm_until:
                        latencies.append(now - intended)
                        from_send.append(now - written)
                received += len(messages)

    async def produce() -> None:
        nonlocal sent
        interval = 0.001
        next_tick = started
        window = asyncio.Semaphore(64)
        pending: set[asyncio.Task[None]] = set()

        acks = ACKS[args.acks]

        async def send(payload: bytes) -> None:
            try:
                header = {"api": int(ApiKey.PRODUCE), "topic": args.topic, "partition": 0, "acks": acks}
                # acks=none: the broker never answers, so there is nothing to wait for (the
                # consumer's receive time still measures the latency end to end).
                future = producer_conn.send(header, payload, expect_response=acks != 0)
                if future is not None:
                    check(await future)
            except BaseException as exc:
                errors.append(exc)
            finally:
                window.release()

        while True:
            now = time.perf_counter()
            if now >= end:
                break
            due = int((now - started) * args.rate) - sent
            if due > 0:
                written = time.perf_counter()
                values = [struct.pack(">dd", started + (sent + i) / args.rate, written) + pad for i in range(due)]
                now_ms = int(time.time() * 1000)
                body = records.encode_body([[0, None, value, None] for value in values])
                payload = record_batch.build_batch(body, record_count=due, first_timestamp_ms=now_ms, max_timestamp_ms=now_ms)
                sent += due
                await window.acquire()
                task = asyncio.get_running_loop().create_task(send(payload))
                pending.add(task)
                task.add_done_callback(pending.discard)
            next_tick += interval
            delay = next_tick - time.perf_counter()
            await asyncio.sleep(max(0.0, delay))
        nonlocal produced_until
        produced_until = time.perf_counter()
        if pending:
            await asyncio.gather(*pending)

    consumer_task = asyncio.get_running_loop().create_task(consume())
    await produce()
    stop.set()
    try:
        await asyncio.wait_for(consumer_task, 10)
    except TimeoutError:
        consumer_task.cancel()
    producer_conn.close()
    await consumer.close()
    if errors:
        raise errors[0]
    measured = len(latencies)
    # The window the figures cover: from the end of the warm-up to the last tick produced (a
    # stalled producer loop makes it differ from the requested duration).
    seconds = max(0.0, produced_until - warm_until)
    return _result("latency", args, measured, seconds, latencies, {
        "requested_duration_s": duration,
        "rate": args.rate, "sent": sent, "received": received, "warmup_s": args.warmup,
        "latency_is": "end to end: consumer receive time minus intended send time",
        "from_write_p50_ms": _percentile_ms(from_send, 0.50), "from_write_p99_ms": _percentile_ms(from_send, 0.99),
    })


async def bench_stall(admin: Admin, args: argparse.Namespace) -> dict[str, Any]:
    await _prepare_topic(admin, args)
    metadata = await admin.metadata([args.topic])
    consumer_port = metadata["brokers"][0].get("consumer_port") or admin.port
    host, _ = parse_address(args.bootstrap)
    fill = argparse.Namespace(**{**vars(args), "partitions": 1, "duration": None})
    backlog = args.messages // 2
    await _fill(admin, argparse.Namespace(**{**vars(fill), "messages": backlog}))
    before = await admin.broker_stats()
    # A consumer that asks for the whole backlog 200 times over and never reads: its socket
    # receive buffer fills, then the broker's send buffer, then the broker must stop reading
    # its requests (pause) instead of queueing 200 x 8 MiB of responses.
    context, name = default_tls()
    reader, writer = await asyncio.open_connection(host, consumer_port, ssl=context, server_hostname=name)
    from rustmq.protocol import frames

    for corr in range(1, 201):
        header = {"api": int(ApiKey.FETCH), "corr": corr, "max_wait_ms": 0, "max_bytes": 8 << 20,
                  "partitions": [{"topic": args.topic, "partition": 0, "offset": 0}]}
        writer.write(frames.encode_frame(header))
    await writer.drain()
    samples = []
    started = time.perf_counter()
    step = max(1, (args.messages - backlog) // 10)
    produced = 0
    while produced < args.messages - backlog:
        chunk = argparse.Namespace(**{**vars(fill), "messages": min(step, args.messages - backlog - produced)})
        await _fill(admin, chunk)
        produced += chunk.messages
        stats = await admin.broker_stats()
        samples.append({"produced": backlog + produced, "rss_mb": round(stats["rss_bytes"] / 2**20, 1),
                        "anon_rss_mb": round(stats["anon_rss_bytes"] / 2**20, 1)})
    elapsed = time.perf_counter() - started
    writer.transport.abort()
    del reader
    anon = [sample["anon_rss_mb"] for sample in samples]
    return _result("stall", args, produced, elapsed, [], {
        "stalled_fetches_requested": 200, "stalled_bytes_requested_mb": 200 * 8,
        "backlog_mb": round(backlog * args.size / 2**20, 1),
        "anon_rss_mb_before_stall": round(before["anon_rss_bytes"] / 2**20, 1),
        "anon_rss_mb_max_during_stall": max(anon) if anon else 0,
        "rss_samples": samples,
    })
