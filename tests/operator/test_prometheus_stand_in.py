"""The Prometheus Operator stand-in (tests/support/prometheus_support.py) run by the real
Prometheus against a real broker process, without a cluster: the operator's rendered
ServiceMonitor, metrics Service and PrometheusRule, and EndpointSlices and Pods written as the
control plane would report them for brokers at 127.0.0.x. Shows in seconds, and without root,
what the real-pod tier then shows on real pods: the relabelling keeps exactly the selected
Service's named port of running pods and labels the target as the Prometheus Operator does
(job = Service, pod, namespace, container, endpoint), the rules load, and a broker that does not
answer puts RustMQBrokerDown in pending for that pod alone.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import brokerproc
import operator_e2e as ops
import prometheus_support as prom
from rustmq_operator import rendering

from .test_rendering import CASES


def pod(statefulset: dict[str, Any], index: int, ip: str, metrics_port: int, phase: str = "Running") -> dict[str, Any]:
    """A broker pod as the API server would show it: the StatefulSet's template, the kubelet's
    status, and the port the test's broker process really listens on for metrics."""
    template = copy.deepcopy(statefulset["spec"]["template"])
    for container in template["spec"]["containers"]:
        for port in container.get("ports") or []:
            if port["name"] == "metrics":
                port["containerPort"] = metrics_port
    name = f"{statefulset['metadata']['name']}-{index}"
    metadata = {**template["metadata"], "name": name, "namespace": statefulset["metadata"]["namespace"]}
    return {"metadata": metadata, "spec": template["spec"], "status": {"phase": phase, "podIP": ip}}


def endpoint_slice(service: dict[str, Any], ports: list[dict[str, Any]], endpoints: list[tuple[str, str, bool]]) -> dict[str, Any]:
    meta = service["metadata"]
    return {
        "metadata": {"name": f"{meta['name']}-abcde", "namespace": meta["namespace"],
                     "labels": {"kubernetes.io/service-name": meta["name"]}},
        "ports": ports,
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}, "targetRef": {"kind": "Pod", "name": name}}
                      for name, ip, ready in endpoints],
    }


def test_the_stand_in_and_a_real_prometheus_scrape_a_real_broker_as_the_operator_would(
    render_cr: Callable[..., rendering.Rendered], tmp_path: Path,
) -> None:
    rendered = render_cr(CASES["production"])
    (monitor,) = rendered.by_kind("ServiceMonitor")
    (rule,) = rendered.by_kind("PrometheusRule")
    (statefulset,) = rendered.by_kind("StatefulSet")
    selector = monitor["spec"]["selector"]["matchLabels"]
    (metrics_service,) = [s for s in rendered.by_kind("Service") if selector.items() <= s["metadata"]["labels"].items()]
    others = [s for s in rendered.by_kind("Service") if s is not metrics_service]
    job = metrics_service["metadata"]["name"]
    namespace = monitor["metadata"]["namespace"]
    (data_dir := tmp_path / "broker").mkdir()
    broker = brokerproc.BrokerProcess(data_dir).start()
    try:
        port = broker.metrics_port
        pods = {
            (namespace, p["metadata"]["name"]): p for p in (
                pod(statefulset, 0, "127.0.0.1", port),
                pod(statefulset, 1, "127.0.0.2", port),  # nothing listens there: a broker down
                pod(statefulset, 2, "127.0.0.3", port, phase="Failed"),  # dropped, as the operator drops it
            )
        }
        slices = [
            endpoint_slice(metrics_service, [{"name": "metrics", "port": port}, {"name": "other", "port": port}],
                           [("rustmq-0", "127.0.0.1", True), ("rustmq-1", "127.0.0.2", False), ("rustmq-2", "127.0.0.3", False)]),
            # A Service the selector does not pick, with a port of the same name: dropped.
            endpoint_slice(others[0], [{"name": "metrics", "port": port}], [("rustmq-0", "127.0.0.1", True)]),
        ]
        groups = prom.target_groups([metrics_service, others[0]], slices, pods)
        targets_file = tmp_path / "targets.json"
        targets_file.write_text(json.dumps(groups))
        jobs = [prom.scrape_config({**monitor, "spec": {**monitor["spec"], "endpoints": [
            {**monitor["spec"]["endpoints"][0], "interval": "1s", "scrapeTimeout": "500ms"}]}}, 0, targets_file)]
        with prom.running(tmp_path / "prometheus", jobs, {prom.rule_file_name(rule): prom.rule_file_text(rule)},
                          evaluation_interval="1s") as prometheus:

            def scraped() -> list[dict[str, Any]] | None:
                active = prometheus.api("targets", state="active")["activeTargets"]
                return active if len(active) == 2 and all(t["health"] != "unknown" for t in active) else None

            active = ops.wait_for("both targets scraped", scraped, timeout=60)
            labels = sorted(({**t["labels"], "health": t["health"]} for t in active), key=lambda d: d["pod"])
            common = {"job": job, "namespace": namespace, "service": job, "container": "broker", "endpoint": "metrics"}
            assert labels == sorted([
                {**common, "pod": "rustmq-0", "instance": f"127.0.0.1:{port}", "health": "up"},
                {**common, "pod": "rustmq-1", "instance": f"127.0.0.2:{port}", "health": "down"},
            ], key=lambda d: d["pod"]), active
            dropped = prometheus.api("targets", state="dropped")["droppedTargets"]
            assert len(dropped) == len(groups) - 2, dropped  # the other port, the Failed pod, the other Service

            ready = ops.wait_for("rustmq_ready of broker 0", lambda: prometheus.query(f'rustmq_ready{{job="{job}"}}'), timeout=30)
            assert [(s["metric"]["pod"], s["value"][1]) for s in ready] == [("rustmq-0", "1")], ready

            def pending() -> list[dict[str, Any]] | None:
                rules = [r for g in prometheus.api("rules", type="alert")["groups"] for r in g["rules"]]
                down = next(r for r in rules if r["name"] == "RustMQBrokerDown")
                return down["alerts"] if down["state"] == "pending" else None

            alerts = ops.wait_for("RustMQBrokerDown pending", pending, timeout=30)
            assert [(a["labels"]["pod"], a["state"]) for a in alerts] == [("rustmq-1", "pending")], alerts
    finally:
        broker.stop()
