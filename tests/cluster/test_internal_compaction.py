"""Compaction of the internal coordination topic with three real brokers on the real API server.

A coordinator appends a snapshot of its partition's live state when the tail since the last one
passes ``coordination_compact_bytes`` and, once every in-sync replica holds it, deletes the
segments below it; followers follow the leader's log start (docs/cluster.md, "Compaction of the
internal topic"). Checked here on the replicas' files, across a kill -9 of the coordinator and
with a follower that was down while its leader compacted past its log end."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import crc32c
import pytest

from brokerproc import RawClient
from clusterproc import BrokerCluster
from rustmq.protocol.api import ApiKey, ErrorCode

pytestmark = [pytest.mark.slow]

INTERNAL = "__rustmq_coordination"
COMPACT_BYTES = 16 << 10
TOPIC = "ledger"
TOPIC_PARTITIONS = 8


@pytest.fixture
def compacting_cluster(tmp_path: Path, kubeconfig: Path) -> Any:
    import clusterproc

    cluster = clusterproc.BrokerCluster(tmp_path, kubeconfig, clusterproc.create_namespace(kubeconfig), 3,
                                        env={"RUSTMQ_COORDINATION_COMPACT_BYTES": str(COMPACT_BYTES)})
    try:
        yield cluster.start_all()
    finally:
        cluster.stop_all()


def call(cluster: BrokerCluster, broker_id: int, header: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """One request; LOAD_IN_PROGRESS (a coordinator replaying its partition) and NOT_COORDINATOR
    (a new coordinator that has not read its leadership from the cluster state yet) are retried."""
    deadline = time.monotonic() + timeout
    while True:
        client = RawClient(cluster.brokers[broker_id].consumer_port, timeout=10)
        try:
            answer = client.call(header)[0]
        finally:
            client.close()
        if answer.get("error") not in (ErrorCode.LOAD_IN_PROGRESS, ErrorCode.NOT_COORDINATOR) or time.monotonic() > deadline:
            return answer
        time.sleep(0.05)


def in_sync(topic: str, replicas: int = 3) -> Any:
    def check(metadata: dict[str, Any]) -> bool:
        (entry,) = metadata["topics"]
        parts = entry["partitions"]
        return entry["error"] == 0 and bool(parts) and all(len(p["isr"]) == replicas and p["leader"] >= 0 for p in parts)
    return check


def segments(cluster: BrokerCluster, broker_id: int, index: int) -> list[int]:
    """Base offsets of the replica's segment files, oldest first."""
    directory = cluster.root / f"broker-{broker_id}" / "topics" / INTERNAL / str(index)
    return sorted(int(name[:-4]) for name in os.listdir(directory) if name.endswith(".log"))


def groups_of(index: int, count: int) -> list[str]:
    found, i = [], 0
    while len(found) < count:
        name = f"team-{i}"
        if crc32c.crc32c(name.encode()) % 8 == index:
            found.append(name)
        i += 1
    return found


def commit_rounds(cluster: BrokerCluster, coordinator: int, groups: list[str], rounds: range,
                  expected: dict[str, dict[tuple[str, int], int]]) -> None:
    client = RawClient(cluster.brokers[coordinator].consumer_port, timeout=10)
    try:
        for r in rounds:
            for g, group in enumerate(groups):
                offsets = [[TOPIC, p, r * 10 + g + p] for p in range(TOPIC_PARTITIONS)]
                answer = client.call({"api": int(ApiKey.COMMIT_OFFSETS), "group": group, "offsets": offsets})[0]
                assert answer["error"] == 0, answer
                expected.setdefault(group, {}).update({(t, p): o for t, p, o in offsets})
    finally:
        client.close()


def served(cluster: BrokerCluster, broker_id: int, group: str) -> dict[tuple[str, int], int]:
    answer = call(cluster, broker_id, {"api": int(ApiKey.FETCH_OFFSETS), "group": group})
    assert answer["error"] == 0, answer
    return {(t, p): o for t, p, o in answer["offsets"]}


def wait_compacted(cluster: BrokerCluster, brokers: list[int], index: int, timeout: float = 30.0) -> dict[int, list[int]]:
    """Until every named replica's log starts above 0 and holds few segments."""
    deadline = time.monotonic() + timeout
    seen: dict[int, list[int]] = {}
    while time.monotonic() < deadline:
        seen = {b: segments(cluster, b, index) for b in brokers}
        if all(bases and bases[0] > 0 and len(bases) <= 4 for bases in seen.values()):
            return seen
        time.sleep(0.2)
    raise AssertionError(f"replicas not compacted: {seen}\n{cluster.logs()}")


@pytest.mark.timeout(300)
def test_the_internal_topic_stays_bounded_and_loses_no_commit(compacting_cluster: BrokerCluster) -> None:
    cluster = compacting_cluster
    cluster.wait_for(in_sync(INTERNAL), "the internal coordination topic", timeout=60, topics=[INTERNAL])
    answer = call(cluster, 0, {"api": int(ApiKey.CREATE_TOPIC), "topic": TOPIC, "partitions": TOPIC_PARTITIONS})
    assert answer["error"] == 0, answer
    cluster.wait_for(in_sync(TOPIC), f"{TOPIC} in sync", topics=[TOPIC])

    found = call(cluster, 0, {"api": int(ApiKey.FIND_COORDINATOR), "group": "team-0"})
    index = found["partition"]
    coordinator = found["coordinator"]
    groups = groups_of(index, 6)
    expected: dict[str, dict[tuple[str, int], int]] = {}

    # ~150 bytes per commit batch: 1,200 commits are ~180 KB, more than ten times the threshold.
    commit_rounds(cluster, coordinator, groups, range(200), expected)
    compacted = wait_compacted(cluster, [0, 1, 2], index)
    total = sum(len(v) for v in compacted.values())
    assert total <= 12, compacted

    offsets = call(cluster, coordinator, {"api": int(ApiKey.LIST_OFFSETS), "topic": INTERNAL, "partition": index, "at": -1})
    assert offsets["error"] == 0, offsets
    assert offsets["start_offset"] == compacted[coordinator][0]  # the leader's log start: its first segment
    end_before = offsets["end_offset"]

    # kill -9 of the coordinator after compaction: the new one replays from the new log start
    # (snapshot + tail) and serves every acknowledged commit.
    cluster.kill(coordinator)
    cluster.wait_for(lambda m: m["topics"][0]["partitions"][index]["leader"] not in (-1, coordinator),
                     "a new coordinator", timeout=40, topics=[INTERNAL])
    new = call(cluster, next(b for b in (0, 1, 2) if b != coordinator),
               {"api": int(ApiKey.FIND_COORDINATOR), "group": groups[0]})["coordinator"]
    assert new != coordinator
    for group in groups:
        assert served(cluster, new, group) == expected[group], group
    assert "snapshot at" in cluster.brokers[new].log()

    # The killed broker stays down while the new coordinator compacts past its log end.
    behind = coordinator
    commit_rounds(cluster, new, groups, range(200, 400), expected)
    alive = [b for b in (0, 1, 2) if b != behind]
    after = wait_compacted(cluster, alive, index)
    assert after[new][0] > end_before, (after, end_before)

    # It comes back: its log ends below the leader's log start, so it restarts there
    # (OFFSET_OUT_OF_RANGE) and catches up, and rejoins the in-sync set.
    cluster.start(behind)
    cluster.wait_for(in_sync(INTERNAL), "the restarted broker back in sync", timeout=90, topics=[INTERNAL])
    assert "restarting there" in cluster.brokers[behind].log()
    assert segments(cluster, behind, index)[0] >= after[new][0]

    # Proof that its copy is whole: the two others die, it becomes the coordinator and serves
    # every commit from what it fetched from the new log start.
    for other in alive:
        cluster.kill(other)
    cluster.wait_for(lambda m: m["topics"][0]["partitions"][index]["leader"] == behind,
                     "the restarted broker leads the partition", timeout=60, topics=[INTERNAL])
    for group in groups:
        assert served(cluster, behind, group) == expected[group], group


@pytest.fixture
def uncompacted_cluster(tmp_path: Path, kubeconfig: Path) -> Any:
    import clusterproc

    # The largest threshold: nothing is compacted, so a new coordinator replays everything.
    cluster = clusterproc.BrokerCluster(tmp_path, kubeconfig, clusterproc.create_namespace(kubeconfig), 3,
                                        env={"RUSTMQ_COORDINATION_COMPACT_BYTES": str(1 << 30)})
    try:
        yield cluster.start_all()
    finally:
        cluster.stop_all()


@pytest.mark.timeout(300)
def test_a_long_replay_runs_in_steps_while_the_broker_serves_others(uncompacted_cluster: BrokerCluster) -> None:
    cluster = uncompacted_cluster
    cluster.wait_for(in_sync(INTERNAL), "the internal coordination topic", timeout=60, topics=[INTERNAL])
    answer = call(cluster, 0, {"api": int(ApiKey.CREATE_TOPIC), "topic": TOPIC, "partitions": TOPIC_PARTITIONS})
    assert answer["error"] == 0, answer
    cluster.wait_for(in_sync(TOPIC), f"{TOPIC} in sync", topics=[TOPIC])
    found = call(cluster, 0, {"api": int(ApiKey.FIND_COORDINATOR), "group": "team-0"})
    index, coordinator = found["partition"], found["coordinator"]
    group = groups_of(index, 1)[0]

    # ~32 KiB per commit (4 KiB of metadata on each of 8 partitions): 600 commits are ~20 MB
    # of internal partition, which the next coordinator reads back in 1 MiB steps.
    metadata = "m" * 4000
    client = RawClient(cluster.brokers[coordinator].consumer_port, timeout=20)
    try:
        for r in range(600):
            offsets = [[TOPIC, p, r + p] for p in range(TOPIC_PARTITIONS)]
            done = client.call({"api": int(ApiKey.COMMIT_OFFSETS), "group": group, "offsets": offsets,
                                "metadata": metadata})[0]
            assert done["error"] == 0, done
    finally:
        client.close()
    expected = {(TOPIC, p): 599 + p for p in range(TOPIC_PARTITIONS)}

    cluster.kill(coordinator)
    cluster.wait_for(lambda m: m["topics"][0]["partitions"][index]["leader"] not in (-1, coordinator),
                     "a new coordinator", timeout=40, topics=[INTERNAL])
    new = cluster.partition(INTERNAL, index)["leader"]
    fetch = RawClient(cluster.brokers[new].consumer_port, timeout=20)
    other = RawClient(cluster.brokers[new].producer_port, timeout=20)
    loading = served_meanwhile = 0
    try:
        deadline = time.monotonic() + 60
        while True:
            answer = fetch.call({"api": int(ApiKey.FETCH_OFFSETS), "group": group})[0]
            if answer["error"] == ErrorCode.NOT_COORDINATOR and time.monotonic() < deadline:
                time.sleep(0.05)  # it has not read its new leadership from the cluster state yet
                continue
            if answer["error"] != ErrorCode.LOAD_IN_PROGRESS:
                break
            loading += 1
            assert time.monotonic() < deadline, "the replay did not finish"
            # The same broker answers other requests while it replays.
            assert other.call({"api": int(ApiKey.METADATA), "topics": [TOPIC]})[0]["error"] == 0
            served_meanwhile += 1
    finally:
        fetch.close()
        other.close()
    assert answer["error"] == 0, answer
    assert {(t, p): o for t, p, o in answer["offsets"]} == expected
    assert loading >= 1 and served_meanwhile >= 1, (loading, served_meanwhile)
    replayed = [line for line in cluster.brokers[new].log().splitlines() if "bytes replayed" in line]
    print(f"LOAD_IN_PROGRESS answers: {loading}, other requests served meanwhile: {served_meanwhile}; {replayed}")
