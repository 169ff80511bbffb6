"""Every count limit a client could otherwise push without end answers with its documented
error on a real broker (docs/protocol.md, Limits), and the broker keeps serving."""

from __future__ import annotations

import resource
import socket
import time
from pathlib import Path

import pytest

from brokerproc import BrokerProcess
from rustmq.protocol.api import ApiKey, ErrorCode
from rustmq.server.resources import ResourceGuard


def test_topic_partition_segment_group_and_subscription_limits(tmp_path: Path, raw) -> None:
    broker = BrokerProcess(tmp_path / "data", "--partitions", "1", "--max-topics", "3", "--max-partitions", "6",
                           "--max-partitions-per-topic", "4", "--max-segment-bytes", str(1 << 20),
                           "--max-groups", "2", "--max-subscriptions", "1").start()
    try:
        client = raw(broker.producer_port)

        def create(name: str, partitions: int, **config: int) -> dict:
            return client.call({"api": ApiKey.CREATE_TOPIC, "topic": name, "partitions": partitions,
                                "config": config})[0]

        too_many = create("wide", 5)
        assert too_many["error"] == ErrorCode.INVALID_CONFIG and "max_partitions_per_topic" in too_many["message"]
        big = create("big", 1, segment_bytes=2 << 20)
        assert big["error"] == ErrorCode.INVALID_CONFIG and "max_segment_bytes" in big["message"]
        assert create("a", 4)["error"] == 0  # with "default": 5 partitions
        over = create("b", 2)
        assert over["error"] == ErrorCode.LIMIT_REACHED and "max_partitions" in over["message"]
        grow = client.call({"api": ApiKey.ADD_PARTITIONS, "topic": "default", "partitions": 3})[0]
        assert grow["error"] == ErrorCode.LIMIT_REACHED
        assert create("b", 1)["error"] == 0
        third = create("c", 1)
        assert third["error"] == ErrorCode.LIMIT_REACHED and "max_topics" in third["message"]
        assert create("a", 1)["error"] == ErrorCode.TOPIC_EXISTS  # exists wins over a limit
        altered = client.call({"api": ApiKey.ALTER_TOPIC_CONFIG, "topic": "a", "set": {"segment_bytes": 4 << 20}})[0]
        assert altered["error"] == ErrorCode.INVALID_CONFIG

        for group in ("g1", "g2"):
            assert client.call({"api": ApiKey.JOIN_GROUP, "group": group, "topics": ["a"]})[0]["error"] == 0
        refused = client.call({"api": ApiKey.JOIN_GROUP, "group": "g3", "topics": ["a"]})[0]
        assert refused["error"] == ErrorCode.LIMIT_REACHED and "max_groups" in refused["message"]
        commit = client.call({"api": ApiKey.COMMIT_OFFSETS, "group": "g4", "offsets": [["a", 0, 0]]})[0]
        assert commit["error"] == ErrorCode.LIMIT_REACHED

        fetch = {"api": ApiKey.QUEUE_FETCH, "topic": "a", "max_wait_ms": 0}
        assert client.call({**fetch, "subscription": "s1"})[0]["error"] == 0
        second = client.call({**fetch, "subscription": "s2"})[0]
        assert second["error"] == ErrorCode.LIMIT_REACHED and "max_subscriptions" in second["message"]
        assert client.call({**fetch, "subscription": "s1"})[0]["error"] == 0  # known ones still work
        assert client.call({"api": ApiKey.LIST_TOPICS})[0]["topics"] == ["a", "b", "default"]
    finally:
        assert broker.stop() == 0


@pytest.mark.timeout(60)
def test_long_polls_beyond_the_per_connection_bound_are_answered_at_once(tmp_path: Path, raw) -> None:
    broker = BrokerProcess(tmp_path / "data", "--partitions", "1", "--max-long-polls-per-connection", "1").start()
    try:
        client = raw(broker.consumer_port)
        fetch = {"api": ApiKey.FETCH, "min_bytes": 1 << 20,
                 "partitions": [{"topic": "default", "partition": 0, "offset": 0}]}
        client.send({**fetch, "max_wait_ms": 1500})
        client.send({**fetch, "max_wait_ms": 600_000})  # over the bound: not held for 10 minutes
        started = time.monotonic()
        assert client.recv()[0]["error"] == 0
        assert client.recv()[0]["error"] == 0
        assert time.monotonic() - started < 10
    finally:
        assert broker.stop() == 0


def test_the_open_files_limit_is_raised_and_connections_stop_before_it(tmp_path: Path, raw) -> None:
    def low_limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 300))

    broker = BrokerProcess(tmp_path / "data", "--partitions", "1", "--fd-headroom", "64",
                           preexec_fn=low_limits).start()
    sockets: list[socket.socket] = []
    try:
        limits = Path(f"/proc/{broker.pid}/limits").read_text()
        assert any(line.startswith("Max open files") and line.split()[3:5] == ["300", "300"]
                   for line in limits.splitlines()), limits
        refused = 0
        for _ in range(320):
            sock = socket.create_connection(("127.0.0.1", broker.producer_port))
            sockets.append(sock)
            time.sleep(0.002)
        for sock in sockets:
            sock.settimeout(0.05)
            try:
                if sock.recv(1 << 16):
                    refused += 1
            except TimeoutError:
                pass
        assert refused >= 40, f"only {refused} of 320 connections were refused with a limit of 300 fds"
        assert broker.alive()
        time.sleep(0.3)  # the fd count is cached briefly
        for sock in sockets:
            sock.close()
        time.sleep(0.5)
        client = raw(broker.producer_port)  # serving again once connections are gone
        assert client.call({"api": ApiKey.LIST_TOPICS})[0]["error"] == 0
    finally:
        for sock in sockets:
            sock.close()
        assert broker.stop() == 0


def test_the_map_guard_refuses_new_segments_before_vm_max_map_count() -> None:
    probe = ResourceGuard(None, None, 64, 1000)
    used = probe.maps_in_use()
    if used is None:
        pytest.skip("no /proc/self/maps here")
    tight = ResourceGuard(None, used + 1200, 64, 1000)
    assert tight.segment_refusal(0) is None
    refusal = tight.segment_refusal(100)
    assert refusal is not None and "vm.max_map_count" in refusal
    assert ResourceGuard(None, used + 500, 64, 1000).segment_refusal() is not None
