"""The ``rustmq`` command against a real broker process (run as subprocesses, like a user)."""

from __future__ import annotations

import json
import subprocess
import sys


def rustmq(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rustmq", *args], input=stdin, capture_output=True, text=True, timeout=timeout)


def test_topic_commands(broker) -> None:
    created = rustmq("topic", "create", "orders", "--partitions", "2", "--config", "retention_ms=60000", "--bootstrap", broker.bootstrap, "--json")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout) == {"topic": "orders", "partitions": 2}
    listed = rustmq("topic", "list", "--bootstrap", broker.bootstrap, "--json")
    assert json.loads(listed.stdout) == {"topics": ["default", "orders"]}
    described = json.loads(rustmq("topic", "describe", "orders", "--bootstrap", broker.bootstrap, "--json").stdout)
    assert described["config"]["retention_ms"] == 60000 and len(described["partitions"]) == 2
    again = rustmq("topic", "create", "orders", "--bootstrap", broker.bootstrap)
    assert again.returncode == 1 and "TOPIC_EXISTS" in again.stderr
    assert rustmq("topic", "delete", "orders", "--bootstrap", broker.bootstrap).returncode == 0
    missing = rustmq("topic", "describe", "orders", "--bootstrap", broker.bootstrap)
    assert missing.returncode == 1 and "UNKNOWN_TOPIC" in missing.stderr


def test_produce_then_consume_json(broker) -> None:
    produced = rustmq("produce", "events", "first", "second", "--key", "k", "--header", "source=test",
                      "--acks", "durable", "--bootstrap", broker.bootstrap, "--json")
    assert produced.returncode == 0, produced.stderr
    acks = [json.loads(line) for line in produced.stdout.splitlines()]
    assert [(a["topic"], a["offset"]) for a in acks] == [("events", 0), ("events", 1)]
    from_stdin = rustmq("produce", "events", "--partition", acks[0]["partition"].__str__(), "--bootstrap", broker.bootstrap,
                        stdin="third\nfourth\n")
    assert from_stdin.returncode == 0, from_stdin.stderr
    consumed = rustmq("consume", "events", "--from", "earliest", "--max-messages", "4", "--json", "--bootstrap", broker.bootstrap)
    assert consumed.returncode == 0, consumed.stderr
    messages = [json.loads(line) for line in consumed.stdout.splitlines()]
    assert [m["value"] for m in messages] == ["first", "second", "third", "fourth"]
    assert set(messages[0]) == {"topic", "partition", "offset", "timestamp", "key", "value", "headers"}
    assert messages[0]["key"] == "k" and messages[0]["headers"] == {"source": "test"}
    assert messages[2]["key"] is None and [m["offset"] for m in messages] == [0, 1, 2, 3]
    tail = rustmq("consume", "events", "--from", "2", "--partition", str(acks[0]["partition"]), "--timeout", "1", "--bootstrap", broker.bootstrap)
    assert tail.returncode == 0 and tail.stdout.split() == [f"{acks[0]['partition']}@2", "third", f"{acks[0]['partition']}@3", "fourth"]


def test_bench_produce_and_consume_print_json(broker) -> None:
    produced = rustmq("bench", "produce", "--messages", "20000", "--size", "512", "--bootstrap", broker.bootstrap, "--json")
    assert produced.returncode == 0, produced.stderr
    result = json.loads(produced.stdout)
    assert result["messages"] == 20000 and result["msg_per_s"] > 0
    assert {"seconds", "mb_per_s", "p50_ms", "p99_ms", "broker_rss_mb"} <= set(result)
    consumed = json.loads(rustmq("bench", "consume", "--messages", "20000", "--size", "512", "--bootstrap", broker.bootstrap, "--json").stdout)
    assert consumed["messages"] == 20000
    simple = json.loads(rustmq("bench", "produce", "--simple", "--messages", "2000", "--bootstrap", broker.bootstrap, "--json").stdout)
    assert simple["messages"] == 2000 and simple["p99_ms"] > 0
    latency = json.loads(rustmq("bench", "latency", "--rate", "500", "--duration", "1", "--warmup", "0.2", "--bootstrap", broker.bootstrap, "--json").stdout)
    assert latency["messages"] > 300 and latency["p99_ms"] > 0


def test_bench_latency_with_acks_none_finishes_and_refuses_flags_it_does_not_use(broker) -> None:
    common = ("--rate", "500", "--duration", "1", "--warmup", "0.2", "--bootstrap", broker.bootstrap, "--json")
    done = rustmq("bench", "latency", "--acks", "none", *common, timeout=40)  # it waited for answers forever
    assert done.returncode == 0, done.stderr
    latency = json.loads(done.stdout)
    assert latency["messages"] > 300
    assert 0.5 < latency["seconds"] < 5 and latency["requested_duration_s"] == 1
    for flag in (["--in-flight", "4"], ["--batch-bytes", "1000"], ["--codec", "zstd"], ["--concurrency", "2"],
                 ["--partitions", "3"], ["--messages", "10"]):
        refused = rustmq("bench", "latency", *flag, *common)
        assert refused.returncode == 2 and "unrecognized arguments" in refused.stderr, (flag, refused.stderr)


def test_unreachable_broker_is_a_clear_error() -> None:
    result = rustmq("topic", "list", "--bootstrap", "127.0.0.1:1")
    assert result.returncode == 1 and "rustmq:" in result.stderr and "Traceback" not in result.stderr


def test_bad_broker_configuration_is_reported(tmp_path) -> None:
    result = rustmq("broker", "--data-dir", str(tmp_path), "--producer-port", "99999")
    assert result.returncode == 2 and "producer_port must be between 0 and 65535" in result.stderr


def test_an_unusable_data_directory_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "topics").write_text("a file where the topics directory belongs")
    result = rustmq("broker", "--data-dir", str(tmp_path), "--host", "127.0.0.1",
                    "--producer-port", "0", "--consumer-port", "0", "--metrics-port", "0")
    assert result.returncode == 1
    assert f"rustmq: cannot open the log in {tmp_path}" in result.stderr and "Traceback" not in result.stderr
