"""``rustmq group|queue|dlq`` and ``rustmq consume --group``: the consumer-coordination commands.

    rustmq group list
    rustmq group describe GROUP                  members, assignments, lag per partition
    rustmq consume TOPIC --group GROUP           join the group, print, commit
    rustmq queue receive TOPIC --subscription S  lease, print, then ack (or --nack / --no-ack)
    rustmq queue configure TOPIC (SUBSCRIPTION | --topic-wide) --max-deliveries N --ttl-ms N ...
    rustmq queue describe TOPIC [SUBSCRIPTION]   effective settings, overrides, partition state
    rustmq dlq list                              dead-letter topics and their sizes
    rustmq dlq show DLQ_TOPIC                    dead letters with origin, attempts, last reason
    rustmq dlq replay DLQ_TOPIC (--all | --partition P --offset O ...)

Kept apart from rustmq.cli (which registers these subcommands) so the issue-4 commands can grow
without touching the core command module. Output: one line per item, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from rustmq import cli_output
from rustmq.client import Admin
from rustmq.client.consumer import Consumer
from rustmq.client.groups import GroupConsumer, describe_group, list_groups
from rustmq.client.queues import QueueConsumer, replay_dead_letters

COMMANDS = ("group", "queue", "dlq")
DLQ_SUFFIX = ".dlq"


def add_arguments(commands: Any, client_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    group = commands.add_parser("group", help="list or describe consumer groups (members, assignments, lag)")
    group_commands = group.add_subparsers(dest="group_command", required=True)
    listing = group_commands.add_parser("list")
    client_flags(listing)
    describe = group_commands.add_parser("describe")
    describe.add_argument("group")
    client_flags(describe)

    queue = commands.add_parser("queue", help="ack-style consumption of a queue subscription")
    queue_commands = queue.add_subparsers(dest="queue_command", required=True)
    receive = queue_commands.add_parser("receive", help="lease messages, print them, then settle them")
    receive.add_argument("topic")
    receive.add_argument("--subscription", default="default")
    settle = receive.add_mutually_exclusive_group()
    settle.add_argument("--nack", action="store_true", help="nack instead of ack (redelivered later)")
    settle.add_argument("--no-ack", action="store_true", help="leave them leased (redelivered after the lease)")
    receive.add_argument("--delay-ms", type=int, default=0, help="with --nack: redeliver no sooner than this")
    receive.add_argument("--ack-wait-ms", type=int, help="lease length (default: the broker's, 30 s)")
    receive.add_argument("--max-messages", type=int)
    receive.add_argument("--timeout", type=float, default=5.0, help="stop after this many seconds without a message")
    client_flags(receive)
    configure = queue_commands.add_parser(
        "configure", help="override queue settings of one subscription, or of every subscription of a topic")
    configure.add_argument("topic")
    configure.add_argument("subscription", nargs="?", help="the subscription (or --topic-wide)")
    configure.add_argument("--topic-wide", action="store_true",
                           help="set the topic layer every subscription of the topic inherits")
    for flag, help_text in _SETTING_FLAGS.items():
        configure.add_argument(f"--{flag}", type=int, help=help_text)
    configure.add_argument("--priority-weights", help="comma-separated weights, one per level (e.g. 8,4,1)")
    configure.add_argument("--no-ttl", action="store_true", help="no TTL here, even if the topic layer sets one")
    configure.add_argument("--reset", action="append", default=[], metavar="SETTING",
                           help="drop an override back to the inherited value (repeatable; e.g. ttl_ms)")
    client_flags(configure)
    queue_describe = queue_commands.add_parser("describe", help="settings and state of a queue subscription")
    queue_describe.add_argument("topic")
    queue_describe.add_argument("subscription", nargs="?", help="omit for the topic layer and subscription names")
    client_flags(queue_describe)

    dlq = commands.add_parser("dlq", help="list, show and replay dead letters")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq_commands.add_parser("list")
    client_flags(dlq_list)
    show = dlq_commands.add_parser("show")
    show.add_argument("topic", help="a dead-letter topic, <topic>.<subscription>.dlq")
    show.add_argument("--max-messages", type=int)
    client_flags(show)
    replay = dlq_commands.add_parser("replay", help="produce dead letters back to their origin topic")
    replay.add_argument("topic")
    replay.add_argument("--all", action="store_true", help="every dead letter of every partition")
    replay.add_argument("--partition", type=int, default=0)
    replay.add_argument("--offset", type=int, action="append", help="a dead letter's offset (repeatable)")
    client_flags(replay)


_SETTING_FLAGS = {
    "ack-wait-ms": "lease length when a consumer does not ask for one",
    "max-deliveries": "failures (nack, lease expiry, disconnect) before a record is dead-lettered",
    "max-in-flight": "leased records per partition at once",
    "max-lookahead": "offsets read ahead of the ack floor per partition",
    "default-priority": "lane of records without a priority header (0 = highest)",
    "ttl-ms": "records older than this (from their batch timestamp) expire undelivered",
    "max-delay-ms": "cap on delays from headers",
}


def add_consume_arguments(consume: argparse.ArgumentParser) -> None:
    consume.add_argument("--group", help="consume as a member of this consumer group (commits its progress)")


async def run(args: argparse.Namespace) -> int:
    if args.command == "group":
        return await (run_group_list(args) if args.group_command == "list" else run_group_describe(args))
    if args.command == "queue":
        if args.queue_command == "configure":
            return await run_queue_configure(args)
        if args.queue_command == "describe":
            return await run_queue_describe(args)
        return await run_queue_receive(args)
    if args.dlq_command == "list":
        return await run_dlq_list(args)
    if args.dlq_command == "show":
        return await run_dlq_show(args)
    return await run_dlq_replay(args)


async def run_group_list(args: argparse.Namespace) -> int:
    groups = await list_groups(args.bootstrap)
    print(json.dumps({"groups": groups}) if args.json else "\n".join(groups))
    return 0


async def run_group_describe(args: argparse.Namespace) -> int:
    described = await describe_group(args.bootstrap, args.group)
    if args.json:
        print(json.dumps(described))
        return 0
    print(f"group {described['group']}  state {described['state']}  generation {described['generation']}")
    owner = {}
    for member in described["members"]:
        print(f"member {member['member_id']}  client {member['client_id']}  topics {','.join(member['topics'])}")
        for topic, partition in member["assignment"]:
            owner[(topic, partition)] = member["member_id"]
    print("TOPIC\tPARTITION\tLAG\tOWNER")
    for topic, partition, lag in described["lag"]:
        print(f"{topic}\t{partition}\t{lag}\t{owner.get((topic, partition), '-')}")
    return 0


def _print_message(args: argparse.Namespace, message: Any, extra: dict[str, Any] | None = None) -> None:
    if args.json:
        print(json.dumps({**cli_output.message_json(message), **(extra or {})}))
    else:
        suffix = "".join(f"\t{k}={v}" for k, v in (extra or {}).items())
        print(f"{message.partition}@{message.offset}\t{cli_output.text_or_base64(message.value)[0]}{suffix}")


async def run_group_consume(args: argparse.Namespace) -> int:
    seen = 0
    wait_ms = 500 if args.timeout is None else max(1, min(500, int(args.timeout * 1000)))
    start = args.start if args.start in ("earliest", "latest") else "earliest"
    async with GroupConsumer(args.bootstrap, args.topic, group=args.group, start=start, max_wait_ms=wait_ms,
                             client_rack=args.client_rack) as consumer:
        last_message = time.monotonic()
        while args.max_messages is None or seen < args.max_messages:
            messages = await consumer.getmany()
            if not messages:
                if args.timeout is not None and time.monotonic() - last_message >= args.timeout:
                    break
                continue
            last_message = time.monotonic()
            if args.max_messages is not None and seen + len(messages) > args.max_messages:
                dropped = messages[args.max_messages - seen :]
                messages = messages[: args.max_messages - seen]
                for message in reversed(dropped):  # commit exactly what was printed
                    consumer.positions[(message.topic, message.partition)] = message.offset
            for message in messages:
                _print_message(args, message)
            sys.stdout.flush()
            seen += len(messages)
    return 0


async def run_queue_receive(args: argparse.Namespace) -> int:
    seen = 0
    async with QueueConsumer(args.bootstrap, args.topic, args.subscription, ack_wait_ms=args.ack_wait_ms,
                             max_wait_ms=max(1, min(500, int(args.timeout * 1000)))) as consumer:
        last_message = time.monotonic()
        while args.max_messages is None or seen < args.max_messages:
            room = 500 if args.max_messages is None else min(500, args.max_messages - seen)
            batch = await consumer.receive_batch(room)
            if not batch:
                if time.monotonic() - last_message >= args.timeout:
                    break
                continue
            last_message = time.monotonic()
            for message in batch:
                _print_message(args, message, {"attempt": message.attempt})
            sys.stdout.flush()
            if args.nack:
                await consumer.nack_many(batch, delay_ms=args.delay_ms, reason="nacked with rustmq queue receive")
            elif not args.no_ack:
                await consumer.ack_many(batch)
            seen += len(batch)
    return 0


async def run_queue_configure(args: argparse.Namespace) -> int:
    if (args.subscription is None) == (not args.topic_wide):
        raise SystemExit("rustmq: queue configure wants a SUBSCRIPTION or --topic-wide (not both)")
    settings: dict[str, Any] = {}
    for flag in _SETTING_FLAGS:
        value = getattr(args, flag.replace("-", "_"))
        if value is not None:
            settings[flag.replace("-", "_")] = value
    if args.no_ttl:
        if "ttl_ms" in settings:
            raise SystemExit("rustmq: --ttl-ms and --no-ttl exclude each other")
        settings["ttl_ms"] = None
    if args.priority_weights is not None:
        try:
            settings["priority_weights"] = [int(w) for w in args.priority_weights.split(",")]
        except ValueError:
            raise SystemExit("rustmq: --priority-weights wants integers separated by commas") from None
    if not settings and not args.reset:
        raise SystemExit("rustmq: nothing to configure (give a setting flag or --reset)")
    async with Admin(args.bootstrap) as admin:
        described = await admin.configure_queue(args.topic, args.subscription, reset=args.reset, **settings)
    _print_queue(args, described)
    return 0


async def run_queue_describe(args: argparse.Namespace) -> int:
    async with Admin(args.bootstrap) as admin:
        described = await admin.describe_queue(args.topic, args.subscription)
    _print_queue(args, described)
    return 0


def _print_queue(args: argparse.Namespace, described: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(described))
        return
    who = described["subscription"] or "(topic-wide)"
    print(f"queue {described['topic']} subscription {who}")
    print("SETTING	EFFECTIVE	SOURCE")
    for name, value in described["effective"].items():
        source = ("subscription" if name in described["overrides"]
                  else "topic" if name in described["topic_overrides"] else "broker")
        shown = ",".join(map(str, value)) if isinstance(value, list) else "none" if value is None else value
        print(f"{name}	{shown}	{source}")
    if "subscriptions" in described:
        print("subscriptions: " + (", ".join(described["subscriptions"]) or "-"))
    for p in described.get("partitions", []):
        print(f"partition {p['partition']}	ack_floor {p['ack_floor']}	in_flight {p['in_flight']}"
              f"	acked {p['acked']}	dead_lettered {p['dead_lettered']}	expired {p['expired']}")


async def run_dlq_list(args: argparse.Namespace) -> int:
    async with Admin(args.bootstrap) as admin:
        rows = []
        for name in await admin.list_topics():
            if name.endswith(DLQ_SUFFIX):
                described = await admin.describe_topic(name)
                count = sum(p["end_offset"] - p["start_offset"] for p in described["partitions"])
                rows.append({"topic": name, "dead_letters": count})
    if args.json:
        print(json.dumps({"dlqs": rows}))
    else:
        for row in rows:
            print(f"{row['topic']}\t{row['dead_letters']}")
    return 0


async def run_dlq_show(args: argparse.Namespace) -> int:
    seen = 0
    async with Consumer(args.bootstrap, args.topic, start="earliest", max_wait_ms=200) as consumer:
        while args.max_messages is None or seen < args.max_messages:
            messages = await consumer.getmany(timeout_s=0.5)
            if not messages:
                break
            for message in messages[: None if args.max_messages is None else args.max_messages - seen]:
                headers = {name: bytes(value).decode(errors="replace") for name, value in message.headers or ()}
                origin = {k[len("rustmq-dlq-"):]: v for k, v in headers.items() if k.startswith("rustmq-dlq-")}
                _print_message(args, message, origin)
                seen += 1
    return 0


async def run_dlq_replay(args: argparse.Namespace) -> int:
    targets: list[tuple[int, list[int]]] = []
    if args.all:
        async with Admin(args.bootstrap) as admin:
            described = await admin.describe_topic(args.topic)
        for p in described["partitions"]:
            offsets = list(range(p["start_offset"], p["end_offset"]))
            for i in range(0, len(offsets), 10_000):
                targets.append((p["partition"], offsets[i : i + 10_000]))
    elif args.offset:
        targets.append((args.partition, args.offset))
    else:
        raise SystemExit("rustmq: dlq replay wants --all or --offset O (with --partition P)")
    total = 0
    destinations = []
    for partition, offsets in targets:
        if not offsets:
            continue
        result = await replay_dead_letters(args.bootstrap, args.topic, partition, offsets)
        total += result["replayed"]
        destinations.extend(result["to"])
    if args.json:
        print(json.dumps({"replayed": total, "to": destinations}))
    else:
        print(f"replayed {total} dead letter(s)")
        for topic, partition, base, last in destinations:
            print(f"  -> {topic}/{partition} offsets {base}..{last}")
    return 0
