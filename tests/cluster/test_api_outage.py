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

from checker import History
from clusterproc import FAST_TIMING, BrokerCluster, api_server_pid
from rustmq.client import Admin, Consumer, Producer

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
    history = History()
    acked_at: list[float] = []
    stop = asyncio.Event()

    async def writer(index: int) -> None:
        async with Producer(cluster.bootstrap, acks="all", linger_ms=0, request_timeout_s=3,
                            delivery_timeout_s=8) as producer:
            seq = 0
            while not stop.is_set():
                value = b"o%d-%d" % (index, seq)
                seq += 1
                try:
                    meta = await producer.send_and_wait("outage", value, key=b"writer-%d" % index)
                except Exception:
                    history.info(value)  # outcome unknown: may or may not be stored
                    producer._errors.clear()
                    continue
                acked_at.append(time.monotonic())
                history.acked(f"w{index}", value, meta.partition, meta.offset)

    async def reader(consumer: Consumer) -> None:
        async for got in consumer.batches():
            for m in got:
                history.read(m.partition, m.offset, m.value)

    consumer = await Consumer(cluster.bootstrap, "outage", start="earliest", max_wait_ms=200, timeout_s=5).start()
    reading = asyncio.get_running_loop().create_task(reader(consumer))
    writers = [asyncio.get_running_loop().create_task(writer(i)) for i in range(3)]
    paused_at = resumed_at = 0.0
    try:
        await asyncio.sleep(3)
        acked_before = len(acked_at)
        paused_at = time.monotonic()
        os.kill(api_pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(2.5 * LEASE_S)  # well past every Lease
        finally:
            os.kill(api_pid, signal.SIGCONT)
            resumed_at = time.monotonic()
        deadline = time.monotonic() + 30
        while not any(t > resumed_at for t in acked_at):
            assert time.monotonic() < deadline, "no acks=all write acknowledged within 30 s after the API server came back"
            await asyncio.sleep(0.1)
        first_after = min(t for t in acked_at if t > resumed_at)
        await asyncio.sleep(3)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*writers), 60)
        drain = time.monotonic() + 40
        while time.monotonic() < drain and any(v not in history.read_at for v in history.ok):
            await asyncio.sleep(0.2)
            if reading.done():
                reading.result()
    finally:
        stop.set()
        reading.cancel()
        await asyncio.gather(reading, *writers, return_exceptions=True)
        await consumer.close()
    after = await asyncio.to_thread(cluster.wait_for, full_isr, "ISR", 30, ["outage"])
    during = [t - paused_at for t in acked_at if paused_at < t < resumed_at]
    report = history.check()
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
