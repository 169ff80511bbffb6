"""The ``rustmq`` command: run a broker, manage topics, produce, consume and benchmark.

    rustmq broker [--data-dir DIR] [--producer-port N] ... [--config FILE]
    rustmq topic create|list|describe|delete|alter [NAME] [--partitions N] [--config KEY=VALUE] [--reset KEY]
    rustmq produce TOPIC [VALUE ...]      (values from stdin lines when none are given)
    rustmq consume TOPIC [--from earliest|latest|OFFSET|@TIMESTAMP_MS] [--max-messages N] [--timeout S]
    rustmq bench produce|consume|latency [...]
    rustmq token create PRINCIPAL         (a token and its hashed line for the token file)
    rustmq group list|describe, rustmq consume TOPIC --group G, rustmq queue receive, rustmq dlq list|show|replay
        (rustmq.cli_coordination)

Every client command takes ``--bootstrap host:port`` (default localhost:9092) and ``--json``.
Broker settings follow rustmq.config: flags override RUSTMQ_* variables, which override the
config file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from rustmq import __version__, cli_coordination, config, eventloop
from rustmq.cli_output import message_json, text_or_base64
from rustmq.client import Admin, Consumer, Producer
from rustmq.client.errors import ClientError

DEFAULT_BOOTSTRAP = os.environ.get("RUSTMQ_BOOTSTRAP", "localhost:9092")


def _broker_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML or JSON file with broker settings")
    for name, field in config.FIELDS.items():
        flag = "--" + name.replace("_", "-")
        if name == "log":
            parser.add_argument(flag, help="default topic LogConfig overrides as JSON")
        elif field.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, metavar=name.upper())


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", default=DEFAULT_BOOTSTRAP, help="broker host:port (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")
    tls = parser.add_argument_group("TLS (docs/security.md)")
    tls.add_argument("--tls", action="store_true", help="speak TLS (implied by the other --tls-* flags)")
    tls.add_argument("--tls-ca", metavar="FILE", help="CA file the broker's certificate must chain to (default: the system's CAs)")
    tls.add_argument("--tls-cert", metavar="FILE", help="client certificate to present (mutual TLS)")
    tls.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert")
    tls.add_argument("--tls-server-name", metavar="NAME",
                     help="check the broker's certificate for NAME instead of the --bootstrap host")
    auth = parser.add_argument_group("authentication (docs/security.md)")
    auth.add_argument("--token", metavar="TOKEN",
                      help="authenticate with this token, <principal>:<secret> (default: $RUSTMQ_TOKEN)")
    auth.add_argument("--token-file", metavar="FILE", help="read the token from FILE (default: $RUSTMQ_TOKEN_FILE)")


def _configure_token(args: argparse.Namespace) -> None:
    """Make every connection of this command authenticate when --token or --token-file is given
    (else the library falls back to $RUSTMQ_TOKEN / $RUSTMQ_TOKEN_FILE)."""
    from rustmq.client.connection import use_token

    token, token_file = getattr(args, "token", None), getattr(args, "token_file", None)
    if token and token_file:
        raise config.ConfigError("--token and --token-file: give one")
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise config.ConfigError(f"cannot read --token-file: {exc}") from None
    if token:
        use_token(token)


def _configure_tls(args: argparse.Namespace) -> None:
    """Make every connection of this command speak TLS when a --tls* flag asks for it."""
    from rustmq.client.connection import tls_context, use_tls

    if not any(getattr(args, name, None) for name in ("tls", "tls_ca", "tls_cert", "tls_key", "tls_server_name")):
        return
    if (args.tls_cert is None) != (args.tls_key is None):
        raise config.ConfigError("--tls-cert and --tls-key go together")
    try:
        context = tls_context(args.tls_ca, args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise config.ConfigError(f"cannot load the TLS files: {exc}") from None
    use_tls(context, server_hostname=args.tls_server_name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rustmq", description="RustMQ message broker and tools")
    parser.add_argument("--version", action="version", version=f"rustmq {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    broker = commands.add_parser("broker", help="run a broker")
    _broker_flags(broker)

    topic = commands.add_parser("topic", help="create, list, describe or delete topics")
    topic_commands = topic.add_subparsers(dest="topic_command", required=True)
    create = topic_commands.add_parser("create")
    create.add_argument("name")
    create.add_argument("--partitions", type=int)
    create.add_argument("--replication-factor", type=int, help="cluster mode: copies of each partition (default min(3, brokers))")
    create.add_argument("--min-insync-replicas", type=int, help="cluster mode: acks=all needs this many in sync (default min(2, RF))")
    create.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                        help="topic LogConfig override; VALUE is JSON (e.g. retention_ms=60000)")
    for sub in ("list", "describe", "delete"):
        command = topic_commands.add_parser(sub)
        if sub != "list":
            command.add_argument("name")
    alter = topic_commands.add_parser("alter", help="change a topic's config overrides")
    alter.add_argument("name")
    alter.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                       help="set an override; VALUE is JSON (e.g. retain_until_consumed_by=[])")
    alter.add_argument("--reset", action="append", default=[], metavar="KEY",
                       help="drop an override (back to the broker default)")
    for command in (create, alter, *[topic_commands.choices[sub] for sub in ("list", "describe", "delete")]):
        _client_flags(command)

    produce = commands.add_parser("produce", help="produce values from arguments or stdin lines")
    produce.add_argument("topic")
    produce.add_argument("values", nargs="*")
    produce.add_argument("--key")
    produce.add_argument("--partition", type=int)
    produce.add_argument("--header", action="append", default=[], metavar="NAME=VALUE")
    produce.add_argument("--acks", choices=["none", "leader", "durable", "all"], default="leader",
                         help="all: every in-sync replica has it (cluster mode; standalone: as leader)")
    produce.add_argument("--codec", choices=["none", "gzip", "zstd", "lz4"], default="none")
    _client_flags(produce)

    consume = commands.add_parser("consume", help="print messages of a topic")
    consume.add_argument("topic")
    consume.add_argument("--from", dest="start", default="earliest",
                         help="earliest, latest, an OFFSET, or @TIMESTAMP_MS (default earliest)")
    consume.add_argument("--partition", type=int, action="append", help="only these partitions (repeatable)")
    consume.add_argument("--max-messages", type=int)
    consume.add_argument("--timeout", type=float, help="stop after this many seconds without a message")
    consume.add_argument("--client-rack", help="read from an in-sync replica in this rack (zone) when there is one")
    cli_coordination.add_consume_arguments(consume)
    _client_flags(consume)
    cli_coordination.add_arguments(commands, _client_flags)

    cluster = commands.add_parser("cluster", help="the brokers, the controller and every partition's leader and ISR")
    cluster_commands = cluster.add_subparsers(dest="cluster_command", required=True)
    _client_flags(cluster_commands.add_parser("describe"))

    bench = commands.add_parser("bench", help="benchmarks in the spirit of kafka-*-perf-test")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    from rustmq.client import bench as bench_module

    bench_module.add_arguments(bench_commands, _client_flags)

    token = commands.add_parser("token", help="make a token for a principal (docs/security.md)")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    token_create = token_commands.add_parser(
        "create", help="print a new token (for the client) and its hashed line (for the broker's token file)")
    token_create.add_argument("principal")
    token_create.add_argument("--json", action="store_true", help="machine-readable JSON output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Client commands share the broker's choice of loop: uvloop when installed, unless
    # RUSTMQ_UVLOOP=false (the same variable the broker reads).
    use_uvloop = os.environ.get(config.ENV_PREFIX + "UVLOOP", "true").strip().lower() not in ("0", "false", "no", "off")

    def run(main: Coroutine[Any, Any, int]) -> int:
        return eventloop.run(main, uvloop_wanted=use_uvloop)

    try:
        if args.command == "token":
            return run_token(args)
        if args.command != "broker":
            _configure_tls(args)
            _configure_token(args)
        if args.command == "broker":
            return run_broker(args)
        if args.command == "topic":
            return run(run_topic(args))
        if args.command == "produce":
            return run(run_produce(args))
        if args.command == "cluster":
            return run(run_cluster(args))
        if args.command == "consume":
            return run(cli_coordination.run_group_consume(args) if args.group else run_consume(args))
        if args.command in cli_coordination.COMMANDS:
            return run(cli_coordination.run(args))
        if args.command == "bench":
            from rustmq.client import bench as bench_module

            return run(bench_module.run(args))
    except config.ConfigError as exc:
        print(f"rustmq: configuration error: {exc}", file=sys.stderr)
        return 2
    except (TimeoutError, ClientError, OSError) as exc:
        print(f"rustmq: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def run_broker(args: argparse.Namespace) -> int:
    from rustmq import app
    from rustmq.server.authz import AuthError
    from rustmq.server.tls import TlsError
    from rustmq.storage.errors import CorruptBatchError, StorageError

    flags = {name: getattr(args, name) for name in config.FIELDS}
    settings = config.load(flags, os.environ, args.config)
    try:
        app.run(settings)
    except (StorageError, CorruptBatchError) as exc:
        print(f"rustmq: cannot open the log in {settings.data_dir}: {exc}", file=sys.stderr)
        return 1
    except (TlsError, AuthError) as exc:
        print(f"rustmq: {exc}", file=sys.stderr)
        return 2
    return 0


def run_token(args: argparse.Namespace) -> int:
    from rustmq.auth import tokens

    try:
        token, line = tokens.new_token(args.principal)
    except ValueError as exc:
        raise config.ConfigError(str(exc)) from None
    _emit(args, {"principal": args.principal, "token": token, "token_file_line": line},
          f"token (give it to the client; it is shown once): {token}\n"
          f"token file line (append it to the broker's auth_token_file): {line}")
    return 0


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data) if args.json else text)


async def run_topic(args: argparse.Namespace) -> int:
    async with Admin(args.bootstrap) as admin:
        command = args.topic_command
        if command == "create":
            overrides = _config_pairs(args.config)
            created = await admin.create_topic(args.name, args.partitions, overrides or None,
                                               replication_factor=args.replication_factor,
                                               min_insync_replicas=args.min_insync_replicas)
            copies = f", replication factor {created['replication_factor']}" if "replication_factor" in created else ""
            _emit(args, created, f"created topic {created['topic']} with {created['partitions']} partitions{copies}")
        elif command == "list":
            names = await admin.list_topics()
            _emit(args, {"topics": names}, "\n".join(names))
        elif command == "describe":
            described = await admin.describe_topic(args.name)
            lines = [f"topic {described['topic']}"]
            lines += [
                f"  partition {p['partition']}: offsets [{p['start_offset']}, {p['end_offset']}) "
                f"durable<{p['durable_offset']} size {p['size_bytes']} B segments {p['segment_count']}"
                for p in described["partitions"]
            ]
            _emit(args, described, "\n".join(lines))
        elif command == "delete":
            await admin.delete_topic(args.name)
            _emit(args, {"deleted": args.name}, f"deleted topic {args.name}")
        elif command == "alter":
            altered = await admin.alter_topic_config(args.name, _config_pairs(args.config), reset=args.reset)
            lines = [f"topic {altered['topic']} overrides: {json.dumps(altered['overrides'], sort_keys=True)}"]
            _emit(args, altered, "\n".join(lines))
    return 0


async def run_cluster(args: argparse.Namespace) -> int:
    async with Admin(args.bootstrap) as admin:
        metadata = await admin.metadata(None)
    if not metadata.get("cluster"):
        metadata["mode"] = "standalone"
        _emit(args, metadata, f"standalone broker {metadata['brokers'][0]['id']} (no cluster mode)")
        return 0
    if "health" not in metadata:  # the scaling report lives on the controller: ask it
        controller = next((b for b in metadata["brokers"] if b["id"] == metadata["controller"]), None)
        if controller is not None:
            try:
                async with Admin(f"{controller['host']}:{controller['producer_port']}") as admin:
                    answer = await admin.metadata([])
                for key in ("health", "membership"):
                    if key in answer:
                        metadata[key] = answer[key]
            except (ClientError, OSError):
                pass  # shown as unavailable below
    health = metadata.get("health")
    per_broker = (health or {}).get("brokers", {})
    lines = [f"controller: broker {metadata['controller']}"]
    membership = metadata.get("membership")
    if membership is None:
        lines.append("membership: none (no <cluster>-membership ConfigMap: data stays where it is)")
    else:
        shutdown = membership.get("shutdown")
        lines.append(f"membership: brokers {membership['brokers']} generation {membership['generation']}"
                     + (f", controlled shutdown of broker {shutdown}" if shutdown is not None else ""))
    if health is None:
        lines.append("health: unavailable (the controller has not reported yet)")
    else:
        lines.append(f"health: {health['partitions']} partitions, {health['offline']} offline, "
                     f"{health['underReplicated']} under-replicated, {health['underMinIsr']} under min ISR, "
                     f"{health['reassigning']} reassigning ({health['bytesToMove']} bytes left to copy), "
                     f"observed membership generation {health['observedMembershipGeneration']}")
    lines.append("brokers:")
    for b in metadata["brokers"]:
        line = f"  {b['id']}: {b['host']}:{b['producer_port']} (consumer port {b['consumer_port']}"
        line += f", rack {b['rack']})" if b.get("rack") else ")"
        facts = per_broker.get(str(b["id"]))
        if facts is not None:
            line += (f": {facts['replicas']} replicas, {facts['leaders']} leaders, "
                     f"{facts['inSyncReplicas']} in sync, {facts['bytes']} log bytes")
        lines.append(line)
    for broker_id, facts in per_broker.items():
        if int(broker_id) not in {b["id"] for b in metadata["brokers"]}:
            lines.append(f"  {broker_id}: not live: {facts['replicas']} replicas, {facts['inSyncReplicas']} in sync")
    for topic in metadata["topics"]:
        lines.append(f"topic {topic['name']} (replication factor {topic['replication_factor']}, "
                     f"min in-sync {topic['min_insync_replicas']})")
        lines += [f"  partition {p['partition']}: leader {p['leader']} epoch {p['leader_epoch']} "
                  f"replicas {p['replicas']} isr {p['isr']}"
                  + (f" reassigning to {p['target']}" if p.get("target") else "") for p in topic["partitions"]]
    _emit(args, metadata, "\n".join(lines))
    return 0


def _config_pairs(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE flags to a config mapping (VALUE parsed as JSON, else kept as a string)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"rustmq: --config wants KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


async def run_produce(args: argparse.Namespace) -> int:
    headers = []
    for item in args.header:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"rustmq: --header wants NAME=VALUE, got {item!r}")
        headers.append((name, value.encode()))
    key = args.key.encode() if args.key is not None else None
    values = args.values if args.values else (line.rstrip("\n") for line in sys.stdin)
    async with Producer(args.bootstrap, acks=args.acks, codec=args.codec) as producer:
        if args.acks == "none":
            count = 0
            for value in values:
                await producer.send(args.topic, value.encode(), key, partition=args.partition, headers=headers or None)
                count += 1
            await producer.flush()
            if args.json:
                print(json.dumps({"topic": args.topic, "messages": count}))
            return 0
        pending = [
            asyncio.ensure_future(producer.send_and_wait(args.topic, value.encode(), key, partition=args.partition, headers=headers or None))
            for value in values
        ]
        for future in pending:
            meta = await future
            _emit(args, {"topic": meta.topic, "partition": meta.partition, "offset": meta.offset, "timestamp": meta.timestamp_ms},
                  f"{meta.topic}/{meta.partition}@{meta.offset}")
    return 0


def parse_start(text: str) -> str | int | tuple[str, int]:
    if text in ("earliest", "latest"):
        return text
    if text.startswith("@"):
        return ("timestamp", int(text[1:]))
    try:
        return int(text)
    except ValueError:
        raise SystemExit(f"rustmq: --from wants earliest, latest, OFFSET or @TIMESTAMP_MS, got {text!r}") from None


async def run_consume(args: argparse.Namespace) -> int:
    start = parse_start(args.start)
    seen = 0
    wait_ms = 500 if args.timeout is None else max(1, min(500, int(args.timeout * 1000)))
    async with Consumer(args.bootstrap, args.topic, partitions=args.partition, start=start, max_wait_ms=wait_ms,
                        client_rack=args.client_rack) as consumer:
        last_message = time.monotonic()
        while args.max_messages is None or seen < args.max_messages:
            room = 10_000 if args.max_messages is None else args.max_messages - seen
            messages = await consumer.getmany(room, timeout_s=wait_ms / 1000)
            if not messages:
                if args.timeout is not None and time.monotonic() - last_message >= args.timeout:
                    break
                continue
            last_message = time.monotonic()
            for message in messages:
                if args.json:
                    print(json.dumps(message_json(message)))
                else:
                    value = text_or_base64(message.value)[0]
                    print(f"{message.partition}@{message.offset}\t{value}")
            sys.stdout.flush()
            seen += len(messages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
