"""An outage of the Kubernetes API server under acks=all load: three real brokers, the real API
server of the local control plane, frozen with SIGSTOP for longer than a Lease. Leaders must stop
acknowledging acks=all within lease_renew_s + 2 * api_timeout_s of the outage (they cannot
renew, so they cannot know they still lead), nothing may change leadership, and once the API
server runs again the cluster serves with nothing acknowledged lost (tests/support/checker.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import pytest

from clusterproc import FAST_TIMING, BrokerCluster, api_server_pid
from rustmq.client import Admin
from workload import AcksAllLoad

pytestmark = [pytest.mark.slow]

HOLDER_VALIDITY_S = float(FAST_TIMING["RUSTMQ_LEASE_RENEW_S"]) + 2 * float(FAST_TIMING["RUSTMQ_API_TIMEOUT_S"])
LEASE_S = float(FAST_TIMING["RUSTMQ_LEASE_DURATION_S"])
SLACK_S = 0.5  # an answer decided by the broker just in time still has to reach the client


def full_isr(metadata: dict[str, Any]) -> bool:
    parts = metadata["topics"][0]["partitions"]
    return bool(parts) and all(len(p["isr"]) == 3 and p["leader"] >= 0 for p in parts)


def leadership(metadata: dict[str, Any]) -> list[tuple[int, int]]:
    return [(p["leader"], p["leader_epoch"]) for p in metadata["topics"][0]["partitions"]]


@pytest.mark.timeout(240)
async def test_an_api_server_outage_stops_acks_all_and_changes_no_leader(three_brokers: BrokerCluster) -> None:
    cluster = three_brokers
    api_pid = api_server_pid(cluster.kubeconfig)
    async with Admin(cluster.brokers[0].bootstrap) as admin:
        await admin.create_topic("outage", 3)
    before = await asyncio.to_thread(cluster.wait_for, full_isr, "ISR", 30, ["outage"])
    load = AcksAllLoad(cluster.bootstrap, "outage", 3, request_timeout_s=3, delivery_timeout_s=8)
    acked_at = load.acked_at
    timeline: dict[str, float] = {}

    async def outage() -> None:
        await asyncio.sleep(1)  # 3 s of load before the outage in all
        timeline["acked_before"] = len(acked_at)
        timeline["paused_at"] = time.monotonic()
        os.kill(api_pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(2.5 * LEASE_S)  # well past every Lease
        finally:
            os.kill(api_pid, signal.SIGCONT)
            timeline["resumed_at"] = time.monotonic()
        deadline = time.monotonic() + 30
        while not any(t > timeline["resumed_at"] for t in acked_at):
            assert time.monotonic() < deadline, "no acks=all write acknowledged within 30 s after the API server came back"
            await asyncio.sleep(0.1)

    report = await load.run(outage, settle_s=3)
    paused_at, resumed_at, acked_before = timeline["paused_at"], timeline["resumed_at"], timeline["acked_before"]
    first_after = min(t for t in acked_at if t > resumed_at)
    after = await asyncio.to_thread(cluster.wait_for, full_isr, "ISR", 30, ["outage"])
    during = [t - paused_at for t in acked_at if paused_at < t < resumed_at]
    print(json.dumps({**report, "last_ack_after_pause_s": round(max(during, default=0.0), 3),
                      "holder_validity_s": HOLDER_VALIDITY_S, "outage_s": round(resumed_at - paused_at, 2),
                      "first_ack_after_resume_s": round(first_after - resumed_at, 3),
                      "leaders_before": leadership(before), "leaders_after": leadership(after),
                      "controller": [before["controller"], after["controller"]]}))
    assert acked_before > 20, report  # the load ran before the outage
    assert max(during, default=0.0) <= HOLDER_VALIDITY_S + SLACK_S, during[-5:]
    assert leadership(after) == leadership(before)  # nobody took over anything
    assert after["controller"] == before["controller"]
    assert report["lost"] == 0 and report["inconsistent"] == 0 and report["wrong_offset"] == 0, report
    assert report["duplicated"] == 0 and report["reordered"] == 0, report
