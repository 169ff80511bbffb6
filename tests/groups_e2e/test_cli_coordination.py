"""``rustmq group|queue|dlq`` and ``rustmq consume --group`` as subprocesses against a real broker."""

from __future__ import annotations

import json
import subprocess
import sys


def rustmq(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rustmq", *args], input=stdin, capture_output=True, text=True, timeout=timeout)


def test_consume_with_group_commits_and_group_describe_shows_lag(broker) -> None:
    boot = ["--bootstrap", broker.bootstrap]
    produced = rustmq("produce", "logs", *boot, stdin="".join(f"line-{i}\n" for i in range(10)))
    assert produced.returncode == 0, produced.stderr
    first = rustmq("consume", "logs", "--group", "ops", "--max-messages", "4", "--json", *boot)
    assert first.returncode == 0, first.stderr
    assert len(first.stdout.splitlines()) == 4
    described = rustmq("group", "describe", "ops", "--json", *boot)
    assert described.returncode == 0, described.stderr
    data = json.loads(described.stdout)
    assert sum(lag for _, _, lag in data["lag"]) == 6  # exactly what was printed was committed
    rest = rustmq("consume", "logs", "--group", "ops", "--timeout", "1", "--json", *boot)
    assert rest.returncode == 0, rest.stderr
    values = {json.loads(line)["value"] for line in first.stdout.splitlines() + rest.stdout.splitlines()}
    assert values == {f"line-{i}" for i in range(10)}
    listed = rustmq("group", "list", *boot)
    assert listed.stdout.split() == ["ops"]
    text = rustmq("group", "describe", "ops", *boot)
    assert "LAG" in text.stdout and "state empty" in text.stdout


def test_queue_receive_nack_until_dead_letter_then_dlq_list_show_replay(broker) -> None:
    boot = ["--bootstrap", broker.bootstrap]
    assert rustmq("produce", "tasks", "bad-task", *boot).returncode == 0
    for attempt in range(1, 6):
        nacked = rustmq("queue", "receive", "tasks", "--subscription", "w", "--nack", "--max-messages", "1", "--timeout", "2", "--json", *boot)
        assert nacked.returncode == 0, nacked.stderr
        (line,) = nacked.stdout.splitlines()
        assert json.loads(line)["attempt"] == attempt
    empty = rustmq("queue", "receive", "tasks", "--subscription", "w", "--timeout", "0.5", *boot)
    assert empty.stdout == ""
    listed = rustmq("dlq", "list", "--json", *boot)
    assert {"topic": "tasks.w.dlq", "dead_letters": 1} in json.loads(listed.stdout)["dlqs"]
    shown = rustmq("dlq", "show", "tasks.w.dlq", "--json", *boot)
    (dead,) = [json.loads(line) for line in shown.stdout.splitlines()]
    assert dead["value"] == "bad-task" and dead["topic"] == "tasks" == dead["topic"]
    assert dead["attempts"] == "5" and "nacked" in dead["reason"]
    replayed = rustmq("dlq", "replay", "tasks.w.dlq", "--all", "--json", *boot)
    assert json.loads(replayed.stdout)["replayed"] == 1, replayed.stderr
    acked = rustmq("queue", "receive", "tasks", "--subscription", "w", "--timeout", "2", "--json", *boot)
    (line,) = acked.stdout.splitlines()
    assert json.loads(line)["value"] == "bad-task" and json.loads(line)["attempt"] == 1
    after = rustmq("queue", "receive", "tasks", "--subscription", "w", "--timeout", "0.5", *boot)
    assert after.stdout == ""
