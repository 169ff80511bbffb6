"""Scaling with real brokers on the real API server: the controller reconciles placement to the
membership ConfigMap (the operator's side of the contract is written here by hand), reports in
the health ConfigMap, and a stopping broker hands its leaderships over first. Every scenario
runs under a steady acks=all load checked by the history checker (tests/support/checker.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from clusterproc import BrokerCluster, read_health, read_placement, write_membership
from rustmq.client import Admin, Producer
from workload import AcksAllLoad

pytestmark = [pytest.mark.slow]


async def wait_health(cluster: BrokerCluster, condition: Callable[[dict[str, Any]], bool], what: str,
                      timeout: float = 90.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    report: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        report = await asyncio.to_thread(read_health, cluster)
        if report is not None and condition(report):
            return report
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last health: {report}\n{cluster.logs()}")


def placement(cluster: BrokerCluster, topic: str) -> list[dict[str, Any]]:
    return read_placement(cluster, topic)


async def under_load(cluster: BrokerCluster, topic: str, writers: int, nemesis: Callable[[], Awaitable[None]],
                     settle_s: float = 3.0) -> dict[str, Any]:
    """acks=all writers (one key each) and a consumer reading everything while nemesis runs;
    a send that raised after the producer's retries counts in ``failed_sends``."""
    return await AcksAllLoad(cluster.bootstrap, topic, writers).run(nemesis, settle_s=settle_s)


def assert_no_loss(report: dict[str, Any]) -> None:
    assert report["acknowledged"] > 50, report
    assert report["lost"] == 0 and report["inconsistent"] == 0 and report["wrong_offset"] == 0, report
    assert report["duplicated"] == 0 and report["reordered"] == 0, report


def spread(health: dict[str, Any], field: str, brokers: range = range(4)) -> int:
    counts = [health["brokers"].get(str(b), {}).get(field, 0) for b in brokers]
    return max(counts) - min(counts)


def scrape(cluster: BrokerCluster, broker_id: int) -> dict[str, float | None]:
    """The broker's /metrics as {'name{labels}': value} (missing series: None)."""
    from collections import defaultdict
    from urllib.request import urlopen

    with urlopen(f"http://127.0.0.1:{cluster.brokers[broker_id].metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    out: dict[str, float | None] = defaultdict(lambda: None)
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def full(parts: list[dict[str, Any]], rf: int = 3) -> bool:
    return bool(parts) and all(len(p["isr"]) == rf and len(p["replicas"]) == rf and p["leader"] >= 0
                               and "target" not in p for p in parts)


@pytest.mark.timeout(300)
async def test_scale_up_rebalances_replicas_and_leaders_under_acks_all_load(three_brokers: BrokerCluster) -> None:
    cluster = three_brokers
    async with Admin(cluster.bootstrap) as admin:
        await admin.create_topic("grow", 4)
    await asyncio.to_thread(cluster.wait_for, lambda m: full(m["topics"][0]["partitions"]), "ISR", 30, ["grow"])
    seen: dict[str, Any] = {}

    async def add_broker() -> None:
        cluster.size = 4
        await asyncio.to_thread(cluster.start, 3)
        await asyncio.to_thread(cluster.wait_until_sees_all, 3)
        write_membership(cluster, [0, 1, 2, 3], generation=1)
        started = time.monotonic()
        seen["health"] = await wait_health(
            cluster, lambda h: h["observedMembershipGeneration"] == 1 and h["reassigning"] == 0 and spread(h, "replicas") <= 1
            and h["underReplicated"] == 0, "the rebalance")
        seen["rebalance_s"] = time.monotonic() - started

    report = await under_load(cluster, "grow", writers=3, nemesis=add_broker)
    print(json.dumps({**report, "rebalance_s": round(seen["rebalance_s"], 1)}))
    assert_no_loss(report)
    parts = placement(cluster, "grow")
    assert full(parts), parts
    # Every topic (the default and internal ones included) spread evenly; leaders follow the
    # preferred replicas once broker 3 is stable.
    # Each topic's leaders spread too (the report's topicLeaderSkew), and the preferred replicas lead.
    final = await wait_health(cluster, lambda h: spread(h, "leaders") <= 1 and spread(h, "replicas") <= 1
                              and h["topicLeaderSkew"] <= 1 and h["leaderSkew"] <= 1 and h["leadersNotPreferred"] == 0,
                              "leader balance", 60)
    assert final["offline"] == 0 and final["maxReplicationFactor"] == 3
    assert sorted(Counter(p["leader"] for p in placement(cluster, "grow")).values()) == [1, 1, 1, 1]
    assert Counter(b for p in placement(cluster, "grow") for b in p["replicas"])[3] >= 2
    # A broker that lost a replica deleted its files (it holds other partitions of the topic).
    from brokerproc import RawClient

    def local_sizes(broker_id: int) -> list[int]:
        client = RawClient(cluster.brokers[broker_id].producer_port, timeout=10)
        try:
            header, _ = client.call({"api": 6, "topic": "grow"})
        finally:
            client.close()
        return [p["size_bytes"] for p in header.get("partitions", [])]

    parts = placement(cluster, "grow")
    moved_away = [(b, p["partition"]) for p in parts for b in (0, 1, 2) if b not in p["replicas"]]
    assert moved_away
    for _ in range(50):
        sizes = {b: await asyncio.to_thread(local_sizes, b) for b in (0, 1, 2)}
        if all(not sizes[b] or sizes[b][i] == 0 for b, i in moved_away):
            break
        await asyncio.sleep(0.2)
    assert all(not sizes[b] or sizes[b][i] == 0 for b, i in moved_away), (moved_away, sizes)
    kept = [(b, p["partition"]) for p in parts for b in p["replicas"] if b != 3]
    assert all(sizes[b][i] == max(sizes[x][i] for x in (0, 1, 2)) for b, i in kept), sizes  # the others keep theirs


@pytest.mark.timeout(300)
async def test_drain_moves_every_replica_off_a_broker_under_acks_all_load(three_brokers: BrokerCluster) -> None:
    cluster = three_brokers
    async with Admin(cluster.bootstrap) as admin:
        await admin.create_topic("drain", 3)
    await asyncio.to_thread(cluster.wait_for, lambda m: full(m["topics"][0]["partitions"]), "ISR", 30, ["drain"])
    cluster.size = 4
    await asyncio.to_thread(cluster.start, 3)
    await asyncio.to_thread(cluster.wait_until_sees_all, 3)
    drained_dir = cluster.brokers[2].data_dir / "topics"
    assert (drained_dir / "drain").exists()
    seen: dict[str, Any] = {}

    async def drain_broker_2() -> None:
        write_membership(cluster, [0, 1, 3], generation=1)
        started = time.monotonic()
        seen["health"] = await wait_health(
            cluster, lambda h: h["observedMembershipGeneration"] == 1 and h["reassigning"] == 0
            and h["brokers"].get("2", {}).get("replicas", 0) == 0 and h["underReplicated"] == 0, "the drain")
        seen["drain_s"] = time.monotonic() - started

    report = await under_load(cluster, "drain", writers=3, nemesis=drain_broker_2)
    print(json.dumps({**report, "drain_s": round(seen["drain_s"], 1)}))
    assert_no_loss(report)
    parts = placement(cluster, "drain")
    assert full(parts) and all(2 not in p["replicas"] for p in parts), parts
    # The drained broker deleted what it no longer holds (and new topics avoid it).
    for _ in range(100):
        if not (drained_dir / "drain").exists():
            break
        await asyncio.sleep(0.2)
    assert not (drained_dir / "drain").exists()
    async with Admin(cluster.bootstrap) as admin:
        await admin.create_topic("after-drain", 3)
    assert all(2 not in p["replicas"] for p in placement(cluster, "after-drain"))


@pytest.mark.timeout(300)
async def test_sigterm_of_a_leader_hands_leadership_over_without_failing_acks_all(three_brokers: BrokerCluster) -> None:
    cluster = three_brokers
    async with Admin(cluster.bootstrap) as admin:
        await admin.create_topic("roll", 3)
    await asyncio.to_thread(cluster.wait_for, lambda m: full(m["topics"][0]["partitions"]), "ISR", 30, ["roll"])
    before = placement(cluster, "roll")
    victim = before[0]["leader"]
    seen: dict[str, Any] = {}

    async def rolling_restart_of_the_leader() -> None:
        started = time.monotonic()
        code = await asyncio.to_thread(cluster.brokers[victim].stop, 30)
        seen["stop_s"], seen["exit"] = time.monotonic() - started, code
        seen["log"] = cluster.brokers[victim].log()
        await asyncio.to_thread(cluster.start, victim)

    report = await under_load(cluster, "roll", writers=3, nemesis=rolling_restart_of_the_leader, settle_s=4)
    print(json.dumps({**report, "stop_s": round(seen["stop_s"], 1)}))
    assert seen["exit"] == 0
    assert "controlled shutdown: no leadership left to hand over" in seen["log"], seen["log"][-3000:]
    assert report["failed_sends"] == 0, report  # NOT_LEADER answers were retried by the producer
    assert_no_loss(report)
    # The restarted broker catches up and gets its preferred leaderships back.
    preferred = [p["partition"] for p in before if p["replicas"][0] == victim]
    await asyncio.to_thread(
        cluster.wait_for, lambda m: full(m["topics"][0]["partitions"])
        and all(m["topics"][0]["partitions"][i]["leader"] == victim for i in preferred), "preferred leaders back", 60, ["roll"])


@pytest.mark.timeout(180)
async def test_membership_shutdown_moves_leaderships_and_health_reports_it(three_brokers: BrokerCluster) -> None:
    cluster = three_brokers
    async with Admin(cluster.bootstrap) as admin:
        await admin.create_topic("planned", 6)
    await asyncio.to_thread(cluster.wait_for, lambda m: full(m["topics"][0]["partitions"]), "ISR", 30, ["planned"])
    write_membership(cluster, [0, 1, 2], generation=1, shutdown=1)
    report = await wait_health(cluster, lambda h: h["observedMembershipGeneration"] == 1
                               and h["brokers"]["1"]["leaders"] == 0, "broker 1 leading nothing", 30)
    assert report["offline"] == 0 and report["partitions"] >= 6 and report["brokers"]["1"]["alive"]
    assert report["brokers"]["1"]["bytes"] >= 0 and report["controllerEpoch"] >= 1
    # METADATA comes from one broker's copy of the state, which follows the controller's writes.
    await asyncio.to_thread(cluster.wait_for, lambda m: all(p["leader"] != 1 for p in m["topics"][0]["partitions"]),
                            "METADATA without broker 1 leading", 10, ["planned"])
    # The same facts on /metrics: per broker what it leads, cluster-wide on the controller only.
    # Wait until every broker's own count equals the report's (a sum alone can match while one
    # broker has applied the move and another has not).
    for _ in range(100):
        now = await asyncio.to_thread(read_health, cluster)
        assert now is not None
        scraped = {b: await asyncio.to_thread(scrape, cluster, b) for b in (0, 1, 2)}
        if now["brokers"]["1"]["leaders"] == 0 and all(
                (scraped[b]["rustmq_cluster_leader_partitions"], scraped[b]["rustmq_cluster_replica_partitions"])
                == (now["brokers"][str(b)]["leaders"], now["brokers"][str(b)]["replicas"]) for b in (0, 1, 2)):
            break
        await asyncio.sleep(0.2)
    leaders = sum(m["rustmq_cluster_leader_partitions"] or 0 for m in scraped.values())
    hosted = sum(m["rustmq_cluster_replica_partitions"] or 0 for m in scraped.values())
    assert scraped[1]["rustmq_cluster_leader_partitions"] == 0, (now, dict(scraped[1]))
    assert leaders == now["partitions"] - now["offline"], (now, scraped)
    assert hosted == sum(b["replicas"] for b in now["brokers"].values()), (now, scraped)
    assert sum(m["rustmq_under_replicated_partitions"] or 0 for m in scraped.values()) == now["underReplicated"]
    controllers = [m for m in scraped.values() if m["rustmq_cluster_controller"] == 1]
    assert len(controllers) == 1
    assert controllers[0]["rustmq_offline_partitions"] == 0
    assert controllers[0]['rustmq_cluster_broker_leaders{broker="1"}'] == 0
    assert controllers[0]["rustmq_cluster_partitions"] in (now["partitions"], report["partitions"])
    assert scraped[0]['rustmq_cluster_partition_in_sync_replicas{partition="0",topic="planned"}'] in (3, None) or \
        scraped[2]['rustmq_cluster_partition_in_sync_replicas{partition="0",topic="planned"}'] == 3
    # `rustmq cluster describe` on a broker that is not the controller shows the controller's view.
    other = next(b for b in (0, 1, 2) if scraped[b]["rustmq_cluster_controller"] != 1)
    described = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "rustmq", "cluster", "describe", "--bootstrap", cluster.brokers[other].bootstrap],
        capture_output=True, text=True, timeout=60)
    assert described.returncode == 0, described.stderr
    assert "membership: brokers [0, 1, 2] generation 1, controlled shutdown of broker 1" in described.stdout, described.stdout
    assert "0 offline" in described.stdout and "observed membership generation 1" in described.stdout
    assert "  1: 127.0.0.1:" in described.stdout and "0 leaders" in described.stdout, described.stdout
    write_membership(cluster, [0, 1, 2], generation=2)  # the operator clears it: leadership returns
    await wait_health(cluster, lambda h: h["observedMembershipGeneration"] == 2 and h["brokers"]["1"]["leaders"] > 0,
                      "broker 1 leading again", 30)


@pytest.mark.timeout(180)
async def test_a_new_replica_of_a_topic_whose_start_expired_starts_at_the_leaders_log_start(
        tmp_path: Any, kubeconfig: Any) -> None:
    """Retention removed the beginning on the leader: the replica added by a reassignment cannot
    copy those offsets, so it restarts empty at the leader's log start and joins the ISR."""
    import clusterproc

    cluster = clusterproc.BrokerCluster(tmp_path, kubeconfig, clusterproc.create_namespace(kubeconfig), 3,
                                        env={"RUSTMQ_RETENTION_CHECK_S": "0.5"})
    try:
        await asyncio.to_thread(cluster.start_all)
        write_membership(cluster, [0, 1], generation=1)  # the topic lives on 0 and 1 first
        async with Admin(cluster.bootstrap) as admin:
            await admin.create_topic("expiring", 1, {"retention_ms": 1500, "segment_bytes": 4096},
                                     replication_factor=2, min_insync_replicas=1)
        await asyncio.to_thread(cluster.wait_for, lambda m: full(m["topics"][0]["partitions"], rf=2), "ISR", 30, ["expiring"])
        async with Producer(cluster.bootstrap, acks="all") as producer:
            for i in range(60):
                await producer.send_and_wait("expiring", b"%04d" % i + bytes(1000))
        leader = placement(cluster, "expiring")[0]["leader"]

        def leader_start() -> int:
            from brokerproc import RawClient

            client = RawClient(cluster.brokers[leader].producer_port, timeout=10)
            try:
                header, _ = client.call({"api": 6, "topic": "expiring"})
            finally:
                client.close()
            return int(header["partitions"][0]["start_offset"])

        for _ in range(100):  # retention deletes the sealed segments
            if await asyncio.to_thread(leader_start) > 0:
                break
            await asyncio.sleep(0.2)
        start = await asyncio.to_thread(leader_start)
        assert start > 0
        follower = next(b for b in placement(cluster, "expiring")[0]["replicas"] if b != leader)
        write_membership(cluster, [leader, 2], generation=2)  # the follower's replica moves to broker 2
        await asyncio.to_thread(
            cluster.wait_for, lambda m: full(m["topics"][0]["partitions"], rf=2)
            and sorted(m["topics"][0]["partitions"][0]["replicas"]) == sorted([leader, 2]), "the move", 60, ["expiring"])
        assert follower != 2
        assert "restarted empty at offset" in cluster.brokers[2].log()
        async with Producer(cluster.bootstrap, acks="all") as producer:
            meta = await producer.send_and_wait("expiring", b"after")
        assert meta.offset == 60
    finally:
        cluster.stop_all()


@pytest.mark.timeout(240)
async def test_replicas_spread_over_racks_when_placed_and_when_drained(tmp_path: Any, kubeconfig: Any) -> None:
    """Brokers 0, 1 in rack a and 2, 3 in rack b: in id order (0, 1) would share a rack; with
    RUSTMQ_RACK every partition of replication factor 2 spans both, and a drained broker's
    replicas go to the other broker of its rack."""
    import clusterproc

    racks = {0: "a", 1: "a", 2: "b", 3: "b"}
    cluster = clusterproc.BrokerCluster(tmp_path, kubeconfig, clusterproc.create_namespace(kubeconfig), 4, racks=racks)
    try:
        await asyncio.to_thread(cluster.start_all)
        metadata = await asyncio.to_thread(cluster.metadata, [])
        assert {b["id"]: b.get("rack") for b in metadata["brokers"]} == racks
        async with Admin(cluster.bootstrap) as admin:
            await admin.create_topic("racked", 8, replication_factor=2)
        parts = placement(cluster, "racked")
        assert all({racks[b] for b in p["replicas"]} == {"a", "b"} for p in parts), parts
        described = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "rustmq", "cluster", "describe", "--bootstrap", cluster.bootstrap],
            capture_output=True, text=True, timeout=60)
        assert "(consumer port " in described.stdout and ", rack b)" in described.stdout, described.stdout
        assert sorted(Counter(p["leader"] for p in parts).values()) == [2, 2, 2, 2]
        await asyncio.to_thread(cluster.wait_for, lambda m: full(m["topics"][0]["partitions"], rf=2), "ISR", 30, ["racked"])
        write_membership(cluster, [0, 1, 2], generation=1)
        await wait_health(cluster, lambda h: h["observedMembershipGeneration"] == 1 and h["reassigning"] == 0
                          and h["brokers"].get("3", {}).get("replicas", 0) == 0 and h["underReplicated"] == 0,
                          "the drain of broker 3", 90)
        parts = placement(cluster, "racked")
        assert all(3 not in p["replicas"] and {racks[b] for b in p["replicas"]} == {"a", "b"} for p in parts), parts
    finally:
        cluster.stop_all()
