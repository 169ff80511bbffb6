"""The admin port's HTTP topic routes in cluster mode, with three real brokers and the real API
server: a topic created, grown, reconfigured or deleted over HTTP on one broker is changed for the
whole cluster (through the cluster state, as the binary protocol's requests are), and GET shows
the cluster's view of each partition."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from brokerproc import RawClient
from clusterproc import BrokerCluster
from rustmq.coordination import internal_topic
from rustmq.protocol.api import ApiKey, ErrorCode

pytestmark = [pytest.mark.slow]


def http(cluster: BrokerCluster, broker_id: int, method: str, path: str, body: dict[str, Any] | None = None,
         ) -> tuple[int, dict[str, Any]]:
    port = cluster.brokers[broker_id].metrics_port
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def local_copy(cluster: BrokerCluster, broker_id: int, topic: str) -> dict[str, Any] | None:
    """DESCRIBE_TOPIC of one broker's own log; None until that broker has applied the change."""
    client = RawClient(cluster.brokers[broker_id].producer_port, timeout=20)
    try:
        response, _ = client.call({"api": ApiKey.DESCRIBE_TOPIC, "topic": topic})
    finally:
        client.close()
    return response if response.get("error", 0) == 0 else None


def wait_on_every_broker(cluster: BrokerCluster, topic: str, condition: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not all(condition(local_copy(cluster, b, topic)) for b in cluster.brokers):
        assert time.monotonic() < deadline, f"not every broker has {what}"
        time.sleep(0.2)


@pytest.mark.timeout(180)
def test_http_topic_routes_act_on_the_whole_cluster(three_brokers: BrokerCluster) -> None:
    cluster = three_brokers
    status, created = http(cluster, 1, "POST", "/v1/topics",
                           {"name": "by-http", "partitions": 3, "replication_factor": 3, "config": {"retention_ms": 600000}})
    assert status == 201, created
    assert created["replication_factor"] == 3 and len(created["partitions"]) == 3
    assert all(sorted(p["replicas"]) == [0, 1, 2] for p in created["partitions"])
    cluster.wait_for(lambda m: all(len(p["isr"]) == 3 and p["leader"] >= 0 for p in m["topics"][0]["partitions"]),
                     "ISR of by-http", topics=["by-http"])
    # Every broker holds its replica, created from the cluster state, not only the one asked.
    wait_on_every_broker(cluster, "by-http", lambda found: found is not None and len(found["partitions"]) == 3,
                         "a replica of by-http")
    assert http(cluster, 0, "POST", "/v1/topics", {"name": "by-http"})[0] == 409

    status, described = http(cluster, 2, "GET", "/v1/topics/by-http")
    assert status == 200 and described["config"]["retention_ms"] == 600000
    assert described["overrides"] == {"retention_ms": 600000} and described["min_insync_replicas"] == 2
    assert all(len(p["isr"]) == 3 and "end_offset" in p["local"] for p in described["partitions"])
    status, listing = http(cluster, 0, "GET", "/v1/topics")
    names = [t["topic"] for t in listing["topics"]]
    assert "by-http" in names and not any(internal_topic.is_internal(n) for n in names)

    status, grown = http(cluster, 2, "POST", "/v1/topics/by-http/partitions", {"partitions": 5})
    assert status == 200 and len(grown["partitions"]) == 5, grown
    wait_on_every_broker(cluster, "by-http", lambda found: found is not None and len(found["partitions"]) == 5,
                         "five partitions")

    status, altered = http(cluster, 0, "PATCH", "/v1/topics/by-http/config", {"set": {"retention_messages": 1000}})
    assert status == 200 and altered["overrides"] == {"retention_ms": 600000, "retention_messages": 1000}, altered
    wait_on_every_broker(cluster, "by-http",
                         lambda found: found is not None and found["config"]["retention_messages"] == 1000,
                         "the new config")
    status, refused = http(cluster, 1, "PATCH", "/v1/topics/by-http/config", {"set": {"cleanup_policy": "compact"}})
    assert status == 400 and refused["error"] == "INVALID_CONFIG" and "cluster mode" in refused["message"]
    status, refused = http(cluster, 1, "POST", "/v1/topics", {"name": "bad-rf", "replication_factor": 0})
    assert status == 400 and refused["error"] == "INVALID_REQUEST"

    assert http(cluster, 1, "DELETE", "/v1/topics/by-http") == (200, {"deleted": "by-http"})
    cluster.wait_for(lambda m: m["topics"][0]["error"] == ErrorCode.UNKNOWN_TOPIC, "by-http gone", topics=["by-http"])
    wait_on_every_broker(cluster, "by-http", lambda found: found is None, "deleted by-http")
    assert http(cluster, 2, "GET", "/v1/topics/by-http")[0] == 404
    assert http(cluster, 0, "DELETE", f"/v1/topics/{internal_topic.TOPIC}")[0] == 400
