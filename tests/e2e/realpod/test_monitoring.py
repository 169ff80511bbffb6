"""Monitoring proven by the real parts: the Prometheus Operator's own CRDs accept what the operator
writes unchanged; the real promtool accepts the rules the API server holds; and a real Prometheus
(Debian's), configured from the operator's ServiceMonitor and PrometheusRule the way the
Prometheus Operator would configure it, scrapes every real broker pod, sees the messages a round
trip produced, loads the rules, and moves RustMQBrokerDown from inactive to pending for the broker
whose container was killed.

What stands in for what (tests/support/prometheus_support.py): Debian builds Prometheus without
Kubernetes service discovery, so the support module reads the ServiceMonitor's Services,
EndpointSlices and Pods from the API server and writes them as file_sd targets with the meta
labels Kubernetes discovery would give, and writes the scrape job and relabelling the Prometheus
Operator generates; Prometheus does the relabelling and the scraping. Prometheus runs on the test
host, which routes the pod network into the node (scripts/local-cluster), so it reaches the pods'
own addresses as an in-cluster Prometheus does. The alerts' `for` (5 and 15 minutes) is not waited
out here; tests/operator/test_prometheus_rules.py has promtool evaluate them past it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import operator_e2e as ops
import prometheus_support as prom

from .test_real_pods import (
    RESOURCES,
    broker_pod,
    client_pod,
    container_status,
    kill_container,
    messages,
    produce_consume_script,
    wait_ready,
)

# The first test of the tier also waits for its package fixtures: the images, the node, the chart.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def test_a_real_prometheus_configured_from_the_service_monitor_scrapes_the_brokers_and_runs_their_alerts(
    chart_operator: dict[str, Any], cluster: Any, namespace: str, tmp_path: Path
) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    with ops.installed_crd(cluster, ops.SERVICE_MONITOR_CRD), ops.installed_crd(cluster, ops.PROMETHEUS_RULE_CRD):
        cr = ops.example("rustmq-minimal.yaml", namespace)
        cr["spec"].update({
            "replicas": 2, "resources": RESOURCES, "storage": {"size": "1Gi"},
            "monitoring": {
                "serviceMonitor": {"enabled": True, "interval": "2s", "scrapeTimeout": "1s", "labels": {"release": "kps"}},
                "prometheusRule": {"enabled": True},
            },
        })
        kubectl.apply(cr)
        wait_ready(kubectl, timeout=420)
        kubectl.wait_condition("MonitoringReady", "True", timeout=120)

        # The real schemas kept every field the operator wrote (a pruned field would be gone).
        monitor = kubectl.get("servicemonitor", "rustmq")
        endpoint = monitor["spec"]["endpoints"][0]
        assert (endpoint["port"], endpoint["interval"], endpoint["scrapeTimeout"]) == ("metrics", "2s", "1s"), endpoint
        assert monitor["metadata"]["labels"]["release"] == "kps"
        rule = kubectl.get("prometheusrule", "rustmq")

        # The real promtool on the rules as the API server holds them.
        rule_text = prom.rule_file_text(rule)
        (tmp_path / "rules.yaml").write_text(rule_text)
        checked = prom.promtool("check", "rules", str(tmp_path / "rules.yaml"))
        assert checked.returncode == 0, checked.stdout + checked.stderr
        alerts = sorted(r["alert"] for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r)
        assert f"SUCCESS: {len(alerts)} rules found" in checked.stdout, checked.stdout

        # Prometheus, configured as the Prometheus Operator would configure it from these two objects.
        def kubectl_json(*args: str) -> Any:
            return json.loads(cluster.kubectl(*args).stdout)

        targets_file = tmp_path / "targets.json"
        targets_file.write_text(json.dumps(prom.discover(kubectl_json, monitor)))
        jobs = [prom.scrape_config(monitor, 0, targets_file)]
        with prom.running(tmp_path / "prometheus", jobs, {prom.rule_file_name(rule): rule_text},
                          evaluation_interval="1s") as prometheus:
            check_scrapes_rules_and_alerts(kubectl, prometheus, monitor, rule, alerts, namespace)


def check_scrapes_rules_and_alerts(kubectl: ops.Kubectl, prometheus: prom.Prometheus, monitor: dict[str, Any],
                                   rule: dict[str, Any], alerts: list[str], namespace: str) -> None:
    pods = sorted(p["metadata"]["name"] for p in kubectl.pods())
    assert pods == ["rustmq-0", "rustmq-1"], pods
    selector = monitor["spec"]["selector"]["matchLabels"]
    (service,) = kubectl.list("service", ",".join(f"{k}={v}" for k, v in selector.items()))
    job = service["metadata"]["name"]

    # Every broker pod's target is up, labelled the way the Prometheus Operator's relabelling does.
    def targets_up() -> list[dict[str, Any]] | None:
        active = [t for t in prometheus.api("targets", state="active")["activeTargets"]
                  if t["scrapePool"] == prom.job_name(monitor, 0)]
        return active if len(active) == len(pods) and all(t["health"] == "up" for t in active) else None

    active = ops.wait_for("Prometheus to scrape every broker", targets_up, timeout=90, interval=1)
    labels = sorted((t["labels"]["pod"], t["labels"]["job"], t["labels"]["namespace"], t["labels"]["container"],
                     t["labels"]["endpoint"]) for t in active)
    assert labels == [(pod, job, namespace, "broker", "metrics") for pod in pods], active
    pod_ips = sorted(p["status"]["podIP"] for p in kubectl.pods())
    assert sorted(t["labels"]["instance"].rsplit(":", 1)[0] for t in active) == pod_ips, "the pods' own addresses"

    # A round trip through the ClusterIP Service, then the broker's counter as Prometheus stored it.
    values = [f"watched-{i}" for i in range(7)]
    out = client_pod(kubectl, produce_consume_script(f"rustmq.{namespace}.svc:9092", "watched", values))
    assert messages(out) == values, out
    query = f'max(rustmq_messages_in_total{{job="{job}", namespace="{namespace}", topic="watched"}})'
    counted = ops.wait_for(
        "the produced messages in Prometheus",
        lambda: (r := prometheus.query(query)) and float(r[0]["value"][1]) >= len(values) and r, timeout=60, interval=1,
    )
    assert float(counted[0]["value"][1]) == len(values), counted

    # The rules loaded from the rendered PrometheusRule, evaluated without error, nothing alerting.
    def rule_states() -> dict[str, tuple[str, str, list[dict[str, Any]]]]:
        groups = prometheus.api("rules", type="alert")["groups"]
        return {r["name"]: (r["state"], r["health"], r["alerts"]) for g in groups for r in g["rules"]}

    def evaluated() -> dict[str, tuple[str, str, list[dict[str, Any]]]] | None:
        states = rule_states()
        return states if sorted(states) == alerts and all(h == "ok" for _, h, _ in states.values()) else None

    # Inactive once the new cluster has settled (its partitions may be under-replicated for a
    # moment after the start).
    ops.wait_for("the rules to be loaded and evaluated", evaluated, timeout=60, interval=1)
    ops.wait_for("every alert inactive", lambda: (s := evaluated()) and all(state == "inactive" for state, _, _ in s.values()),
                 timeout=90, interval=1)

    # A crashed broker: kill its container twice (the kubelet then backs off, so it stays down for
    # seconds), and RustMQBrokerDown goes pending for that pod alone, as does RustMQBrokersMissing.
    victim = broker_pod(kubectl, 1)
    kill_container(kubectl, victim)
    ops.wait_for("the kubelet to restart broker 1", lambda: container_status(broker_pod(kubectl, 1))["restartCount"] >= 1
                 and container_status(broker_pod(kubectl, 1))["ready"], timeout=120)
    kill_container(kubectl, broker_pod(kubectl, 1))

    def pending() -> dict[str, list[dict[str, Any]]] | None:
        states = rule_states()
        down = states["RustMQBrokerDown"]
        missing = states["RustMQBrokersMissing"]
        if down[0] == "pending" and missing[0] == "pending":
            return {"RustMQBrokerDown": down[2], "RustMQBrokersMissing": missing[2]}
        return None

    seen = ops.wait_for("RustMQBrokerDown to go pending", pending, timeout=90, interval=0.5)
    assert [a["labels"]["pod"] for a in seen["RustMQBrokerDown"]] == ["rustmq-1"], seen
    assert all(a["state"] == "pending" for a in seen["RustMQBrokerDown"]), seen
    assert [a["labels"]["job"] for a in seen["RustMQBrokerDown"]] == [job], seen
    down = prometheus.query(f'up{{job="{job}", namespace="{namespace}"}} == 0')
    assert [s["metric"]["pod"] for s in down] in (["rustmq-1"], []), down

    # Back up: the kubelet restarts it after its back-off, and the alerts go inactive again.
    wait_ready(kubectl, timeout=180)
    ops.wait_for("the alerts to go inactive again",
                 lambda: all(state == "inactive" for state, _, _ in rule_states().values()), timeout=90, interval=1)
