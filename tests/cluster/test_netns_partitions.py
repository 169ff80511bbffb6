"""Network partitions: three real brokers, each in a network namespace of its own
(tests/support/netns.py: veth pairs to a bridge, the real API server reached through it), cut
apart with iptables inside one namespace under acks=all load, checked by the history checker
(tests/support/checker.py). Results are in docs/cluster.md ("Failure cases")."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from brokerproc import RawClient
from clusterproc import create_namespace
from netns import NetnsCluster
from rustmq.protocol import batch, records
from rustmq.protocol.api import ErrorCode
from workload import AcksAllLoad

pytestmark = [pytest.mark.slow]


@pytest.fixture
def netns_brokers(tmp_path: Path, kubeconfig: Path) -> Iterator[NetnsCluster]:
    if os.geteuid() != 0:
        raise RuntimeError("network namespaces need root (ip netns, iptables)")
    cluster = NetnsCluster(tmp_path, kubeconfig, create_namespace(kubeconfig), 3)
    try:
        yield cluster.start_all()
    finally:
        cluster.stop_all()
        left = cluster.leftovers()
        assert not left, f"namespaces or links left behind: {left}"


def ask(cluster: NetnsCluster, broker_id: int, header: dict[str, Any], payload: bytes = b"") -> dict[str, Any]:
    process = cluster.brokers[broker_id]
    client = RawClient(process.producer_port, timeout=10, host=process.host)
    try:
        response, _ = client.call(header, payload)
        return response
    finally:
        client.close()


def partition_seen_by(cluster: NetnsCluster, broker_id: int, topic: str) -> dict[str, Any]:
    part: dict[str, Any] = ask(cluster, broker_id, {"api": 3, "topics": [topic]})["topics"][0]["partitions"][0]
    return part


async def until(what: str, condition: Callable[[], bool], timeout: float) -> float:
    """Poll condition (in a thread: it does blocking calls); the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            if await asyncio.to_thread(condition):
                return time.monotonic() - started
        except (OSError, EOFError, KeyError, IndexError):
            pass
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.2)


def full_isr(cluster: NetnsCluster, topic: str, seen_by: int = 0) -> bool:
    part = partition_seen_by(cluster, seen_by, topic)
    return len(part["isr"]) == 3 and part["leader"] >= 0


async def under_load(cluster: NetnsCluster, topic: str, nemesis: Callable[[], Awaitable[None]]) -> dict[str, Any]:
    return await AcksAllLoad(cluster.bootstrap, topic, 2, request_timeout_s=3, delivery_timeout_s=10).run(nemesis)


async def setup_topic(cluster: NetnsCluster, topic: str) -> dict[str, Any]:
    assert ask(cluster, 0, {"api": 4, "topic": topic, "partitions": 1})["error"] == 0
    await until("full ISR", lambda: full_isr(cluster, topic), 30)
    return partition_seen_by(cluster, 0, topic)


@pytest.mark.timeout(240)
async def test_a_leader_cut_off_from_its_followers_but_not_the_api_server(netns_brokers: NetnsCluster) -> None:
    cluster = netns_brokers
    before = await setup_topic(cluster, "cutpeers")
    leader = before["leader"]
    other = next(b for b in (0, 1, 2) if b != leader)
    seen: dict[str, Any] = {}

    async def nemesis() -> None:
        cluster.cut_peers(leader)
        # It keeps its Lease (the API server is reachable), so it stays leader; its followers
        # cannot fetch, so after replica_lag_s it shrinks the ISR to itself and refuses acks=all.
        seen["shrunk_s"] = await until("ISR shrink", lambda: partition_seen_by(cluster, other, "cutpeers")["isr"] == [leader], 30)
        seen["during"] = partition_seen_by(cluster, other, "cutpeers")
        await asyncio.sleep(3)
        cluster.heal(leader)
        seen["rejoined_s"] = await until("rejoin", lambda: full_isr(cluster, "cutpeers", other), 40)

    report = await under_load(cluster, "cutpeers", nemesis)
    after = partition_seen_by(cluster, other, "cutpeers")
    print(json.dumps({"scenario": "leader cut from followers", **report, **{k: v for k, v in seen.items() if k != "during"},
                      "before": before, "during": seen["during"], "after": after}))
    assert report["acknowledged"] > 20, report
    assert report["lost"] == 0 and report["inconsistent"] == 0 and report["wrong_offset"] == 0, report
    assert report["duplicated"] == 0 and report["reordered"] == 0, report
    assert (seen["during"]["leader"], seen["during"]["leader_epoch"]) == (leader, before["leader_epoch"])
    assert (after["leader"], after["leader_epoch"]) == (leader, before["leader_epoch"])  # no failover: it never lost its Lease


@pytest.mark.timeout(240)
async def test_a_leader_cut_off_from_the_api_server_but_not_its_followers(netns_brokers: NetnsCluster) -> None:
    cluster = netns_brokers
    before = await setup_topic(cluster, "cutapi")
    leader = before["leader"]
    other = next(b for b in (0, 1, 2) if b != leader)
    seen: dict[str, Any] = {}

    async def nemesis() -> None:
        cluster.cut_api(leader)
        # It cannot renew: it stops acting as leader on its own clock, its Lease expires for the
        # controller, an in-sync follower is elected with a new epoch.
        seen["failover_s"] = await until(
            "a new leader", lambda: partition_seen_by(cluster, other, "cutapi")["leader"] not in (-1, leader), 30)
        seen["during"] = partition_seen_by(cluster, other, "cutapi")
        # The cut-off broker still believes its last state, but answers acks=all with NOT_LEADER.
        seen["zombie"] = await asyncio.to_thread(
            ask, cluster, leader, {"api": 0, "topic": "cutapi", "partition": 0, "acks": 3},
            batch.build_batch(records.encode_body([[0, None, b"zombie", None]]), record_count=1,
                              first_timestamp_ms=1, max_timestamp_ms=1))
        await asyncio.sleep(3)
        cluster.heal(leader)
        seen["rejoined_s"] = await until("rejoin", lambda: full_isr(cluster, "cutapi", other), 40)

    report = await under_load(cluster, "cutapi", nemesis)
    after = partition_seen_by(cluster, other, "cutapi")
    ends = {b: ask(cluster, b, {"api": 6, "topic": "cutapi"})["partitions"][0]["end_offset"] for b in (0, 1, 2)}
    print(json.dumps({"scenario": "leader cut from the API server", **report,
                      **{k: v for k, v in seen.items() if k not in ("during", "zombie")},
                      "zombie_error": seen["zombie"].get("error"), "before": before, "during": seen["during"],
                      "after": after, "end_offsets": ends}))
    assert report["acknowledged"] > 20, report
    assert report["lost"] == 0 and report["inconsistent"] == 0 and report["wrong_offset"] == 0, report
    assert report["duplicated"] == 0 and report["reordered"] == 0, report
    assert seen["during"]["leader_epoch"] > before["leader_epoch"]
    assert seen["zombie"]["error"] == ErrorCode.NOT_LEADER, seen["zombie"]
    # Healed, it follows the new epoch (preferred-leader rebalancing may later hand it the
    # partition back, always with a newer epoch, never the old one).
    assert after["leader_epoch"] >= seen["during"]["leader_epoch"]
    assert after["leader"] != leader or after["leader_epoch"] > seen["during"]["leader_epoch"], after
    assert len(set(ends.values())) == 1, ends  # one log: the old leader's unacknowledged tail is gone
