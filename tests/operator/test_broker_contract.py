"""The contract between the operator and the broker, checked with a real broker process: the
environment the operator renders (ConfigMap data plus the container's own variables) starts
`rustmq broker` (the broker image's entrypoint), and the probe paths the StatefulSet uses answer.

Only the ports (free ones instead of 9092-9094), the data directory (a tmp dir instead of the
volume) and the bind address (127.0.0.1) are changed, since the test runs outside a pod."""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from rustmq_operator import rendering

ROOT = Path(__file__).resolve().parents[2]
RUSTMQ = Path(sys.executable).with_name("rustmq")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pod_environment(rendered: rendering.Rendered, ordinal: int, namespace: str) -> dict[str, str]:
    """What the kubelet would give the broker container of pod <name>-<ordinal>."""
    (configmap,) = [c for c in rendered.by_kind("ConfigMap") if c["metadata"]["name"].endswith("-config")]
    env = dict(configmap["data"])
    pod_name = f"rustmq-{ordinal}"
    downward = {
        "metadata.name": pod_name,
        "metadata.namespace": namespace,
        "metadata.labels['apps.kubernetes.io/pod-index']": str(ordinal),
        "metadata.labels['topology.kubernetes.io/zone']": "zone-b",  # copied from the node (PodTopologyLabels)
    }
    (container,) = rendered.statefulset()["spec"]["template"]["spec"]["containers"]
    for item in container["env"]:
        if "valueFrom" in item:
            env[item["name"]] = downward[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            value = item["value"]
            for name, known in env.items():
                value = value.replace(f"$({name})", known)
            assert "$(" not in value, f"{item['name']}: unresolved reference in {value!r}"
            env[item["name"]] = value
    return env


@pytest.mark.parametrize("cluster_mode", [False, rendering.CLUSTER_MODE], ids=["standalone", "default"])
def test_every_rendered_variable_is_a_broker_setting(
    cluster_mode: bool, render_cr: Callable[..., rendering.Rendered]
) -> None:
    """The broker ignores RUSTMQ_* variables it does not know, so a misspelt or not yet
    supported one would be lost silently: every one the operator renders must name a field of
    rustmq.config.BrokerConfig (the $(...) helpers of the downward API aside)."""
    import yaml

    from rustmq import config

    cr = yaml.safe_load((ROOT / "examples" / "rustmq-production.yaml").read_text())
    cr["spec"]["tls"] = {"enabled": True, "mutual": True}
    rendered = render_cr(cr, cluster_mode=cluster_mode)
    env = pod_environment(rendered, ordinal=1, namespace="data-pipeline")
    known = {config.ENV_PREFIX + name.upper() for name in config.FIELDS}
    unknown = {name for name in env if name.startswith(config.ENV_PREFIX)} - known - rendering.POD_ENV_HELPERS
    assert unknown == set()


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("case", ["seed-minimal", "production"])
def test_rendered_environment_starts_a_ready_broker(
    case: str, render_cr: Callable[..., rendering.Rendered], tmp_path: Path
) -> None:
    import yaml

    source = {"seed-minimal": "rustmq-minimal.yaml", "production": "rustmq-production.yaml"}[case]
    cr: dict[str, Any] = yaml.safe_load((ROOT / "examples" / source).read_text())
    rendered = render_cr(copy.deepcopy(cr))
    env = pod_environment(rendered, ordinal=2, namespace="data-pipeline")
    assert env["RUSTMQ_BROKER_ID"] == "2"
    assert env["RUSTMQ_ADVERTISED_HOST"] == "rustmq-2.rustmq-headless.data-pipeline.svc"
    metrics_port = free_port()
    assert env["RUSTMQ_CLUSTER_MODE"] == "kubernetes"
    assert env["RUSTMQ_INTERNAL_HOST"] == "rustmq-2.rustmq-headless.data-pipeline.svc"
    env.update(
        # Cluster mode needs an API server (in a pod: the mounted token); this unit test has
        # none, so the broker runs standalone here. Cluster mode on a real API server is tested
        # by the cluster suite (docs/cluster.md).
        RUSTMQ_CLUSTER_MODE="standalone",
        RUSTMQ_PRODUCER_PORT=str(free_port()),
        RUSTMQ_CONSUMER_PORT=str(free_port()),
        RUSTMQ_METRICS_PORT=str(metrics_port),
        RUSTMQ_DATA_DIR=str(tmp_path / "data"),
        RUSTMQ_HOST="127.0.0.1",
    )
    (container,) = rendered.statefulset()["spec"]["template"]["spec"]["containers"]
    readiness = container["readinessProbe"]["httpGet"]["path"]
    liveness = container["livenessProbe"]["httpGet"]["path"]
    log = (tmp_path / "broker.log").open("wb")
    broker = subprocess.Popen(
        [str(RUSTMQ), "broker"], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while http_status(f"http://127.0.0.1:{metrics_port}{readiness}") != 200:
            assert broker.poll() is None, (tmp_path / "broker.log").read_text()
            assert time.monotonic() < deadline, "broker never became ready:\n" + (tmp_path / "broker.log").read_text()
            time.sleep(0.1)
        assert http_status(f"http://127.0.0.1:{metrics_port}{liveness}") == 200
        assert http_status(f"http://127.0.0.1:{metrics_port}/metrics") == 200
    finally:
        broker.send_signal(signal.SIGTERM)
        try:
            assert broker.wait(timeout=20) == 0, (tmp_path / "broker.log").read_text()
        finally:
            if broker.poll() is None:
                broker.kill()
                broker.wait()
            log.close()


# -- the scaling contract: the ConfigMaps both sides read (docs/operator.md, Scaling) ---------------


def test_the_brokers_health_report_parses_as_the_operator_reads_it() -> None:
    """The report the brokers' controller builds (rustmq.cluster.reassign.health), before and
    after it has read a membership, means to the operator what it means to the broker."""
    import datetime
    import json

    from rustmq.cluster import reassign
    from rustmq.cluster.state import PartitionState, TopicState
    from rustmq_operator import health

    topic = TopicState("orders", "id-1", 2, 2, (
        PartitionState((0, 1), 0, 3, (0, 1)),
        PartitionState((1, 2), 1, 3, (1,)),  # under-replicated
        PartitionState((2, 0), -1, 4, (2,)),  # offline
    ))
    now = datetime.datetime(2026, 12, 6, 7, 0, 0, tzinfo=datetime.UTC)
    for members, generation in ((None, None), ([0, 1], 5)):
        report = reassign.health([topic], alive=[0, 1], members=members, log_bytes={0: 10, 1: 20}, bytes_to_move=7,
                                 controller=0, controller_epoch=3, observed_generation=generation,
                                 updated_at="2026-12-06T07:00:00Z")
        parsed = health.parse_health({"data": reassign.encode_health(report)}, now, 18.0)
        assert parsed.problem is None and parsed.health is not None, parsed.problem
        found = parsed.health
        assert (found.partitions, found.offline, found.under_replicated, found.max_replication_factor) == (3, 1, 1, 2)
        assert found.observed_generation == (generation or 0)
        assert found.replicas_of(2) == 2 and found.leaders_of(0) == 1 and found.bytes_to_move == 7
        # Leaders 0: 1, 1: 1 over the live brokers; partition 1 is led by its first replica.
        assert (found.leader_skew, found.topic_leader_skew, found.leaders_not_preferred) == (0, 0, 0)
        assert found.leadership()["perBroker"] == "0=1,1=1"
        assert json.loads(reassign.encode_health(report)["health"])["updatedAt"] == "2026-12-06T07:00:00Z"


def test_the_membership_the_operator_writes_parses_as_the_brokers_read_it() -> None:
    from rustmq.cluster import reassign
    from rustmq_operator import health

    for written in (health.Membership((0, 1, 2), None, 1), health.Membership((0, 1, 3), 3, 12)):
        read = reassign.parse_membership(written.data())
        assert (sorted(read.brokers), read.shutdown, read.generation) == (list(written.brokers), written.shutdown, written.generation)


def test_the_data_alerts_use_metrics_the_brokers_export() -> None:
    """Every rustmq_* series the PrometheusRule's alerts read is a family a broker exports
    (rustmq.admin: the controller's health-derived ones included)."""
    import re
    import types

    from rustmq.admin import cluster_metrics
    from rustmq_operator import spec as specs

    target = rendering.Target(
        name="rustmq", namespace="ns", uid="uid", replicas=3, claim_size="10Gi", prometheus_rule=True,
        spec=specs.with_defaults({"replicas": 3, "monitoring": {"prometheusRule": {"enabled": True}}}),
    )
    (rule,) = rendering.render(target).by_kind("PrometheusRule")
    wanted = {
        name
        for group in rule["spec"]["groups"]
        for alert in group["rules"]
        for name in re.findall(r"\b(rustmq_[a-z_]+)\{", alert["expr"])
    }
    assert {"rustmq_offline_partitions", "rustmq_under_replicated_partitions"} <= wanted
    controller = types.SimpleNamespace(
        broker_id=0, controller=0, roles={}, topics={},
        health={"partitions": 0, "offline": 0, "reassigning": 0, "bytesToMove": 0, "brokers": {},
                "leaderSkew": 0, "topicLeaderSkew": 0, "leadersNotPreferred": 0},
    )
    exported = {family.name for family in cluster_metrics.collect(controller)}
    assert wanted <= exported, wanted - exported
