"""Monitoring proven by the real parts: the Prometheus Operator's own CRDs accept what the operator
writes unchanged, Prometheus' rule parser (what `promtool check rules` runs) accepts the rules it
renders, and the ServiceMonitor, followed the way
Prometheus follows it (selector -> Service -> named port -> endpoints), leads to real broker pods
that answer with their metrics. Prometheus itself is not run: the scrape is done by a client pod
along the same path."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

import e2e_cluster
import operator_e2e as ops

from .test_real_pods import RESOURCES, client_pod, wait_ready

# The first test of the tier also waits for its package fixtures: the images, the node, the chart.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def rulecheck() -> str:
    """Prometheus' rule-file check (tools/controlplane/prometheus/rulecheck, built by build-node):
    `promtool check rules` without promtool's service-discovery SDKs; promtool on PATH also does."""
    node_bins = e2e_cluster.cached_bin_dir(e2e_cluster.BUILD_NODE)
    if node_bins is not None and (node_bins / "rulecheck").exists():
        return str(node_bins / "rulecheck")
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("rulecheck is built by `scripts/local-cluster build-node`; build it or put promtool on PATH")
    return found


def test_service_monitor_and_rules_pass_the_real_crds_the_rule_parser_and_a_scrape(
    chart_operator: dict[str, Any], cluster: Any, namespace: str, tmp_path: Path
) -> None:
    kubectl = ops.Kubectl(cluster, namespace)
    with ops.installed_crd(cluster, ops.SERVICE_MONITOR_CRD), ops.installed_crd(cluster, ops.PROMETHEUS_RULE_CRD):
        cr = ops.example("rustmq-minimal.yaml", namespace)
        cr["spec"].update({
            "replicas": 2, "resources": RESOURCES, "storage": {"size": "1Gi"},
            "monitoring": {
                "serviceMonitor": {"enabled": True, "interval": "15s", "scrapeTimeout": "5s", "labels": {"release": "kps"}},
                "prometheusRule": {"enabled": True},
            },
        })
        kubectl.apply(cr)
        wait_ready(kubectl, timeout=420)
        kubectl.wait_condition("MonitoringReady", "True", timeout=120)

        # The real schemas kept every field the operator wrote (a pruned field would be gone).
        monitor = kubectl.get("servicemonitor", "rustmq")
        endpoint = monitor["spec"]["endpoints"][0]
        assert (endpoint["port"], endpoint["interval"], endpoint["scrapeTimeout"]) == ("metrics", "15s", "5s"), endpoint
        assert monitor["metadata"]["labels"]["release"] == "kps"
        rule = kubectl.get("prometheusrule", "rustmq")

        # Prometheus' own rule parser, as `promtool check rules` and Prometheus' rule loading run it.
        rules_file = tmp_path / "rustmq-rules.yaml"
        rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
        tool = rulecheck()
        args = [tool, str(rules_file)] if tool.endswith("rulecheck") else [tool, "check", "rules", str(rules_file)]
        checked = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        count = sum(len(group["rules"]) for group in rule["spec"]["groups"])
        assert f"SUCCESS: {count} rules found" in checked.stdout, checked.stdout

        # The scrape path: selector -> Service -> the endpoint's named port -> every ready pod.
        selector = ",".join(f"{k}={v}" for k, v in monitor["spec"]["selector"]["matchLabels"].items())
        (service,) = kubectl.list("service", selector)
        slices = kubectl.list("endpointslice", f"kubernetes.io/service-name={service['metadata']['name']}")
        port = next(p["port"] for s in slices for p in s["ports"] if p["name"] == endpoint["port"])
        addresses = sorted(a for s in slices for e in s["endpoints"] if e["conditions"].get("ready") for a in e["addresses"])
        assert len(addresses) == 2, slices
        path = endpoint.get("path", "/metrics")
        script = "python3 -c " + shlex.quote(
            "import urllib.request, sys\n"
            f"for ip in {addresses!r}:\n"
            f"    body = urllib.request.urlopen(f'http://{{ip}}:{port}{path}', timeout=10).read().decode()\n"
            "    names = {line.split('{')[0].split(' ')[0] for line in body.splitlines() if line.startswith('rustmq_')}\n"
            "    print(ip, len(names))\n"
        )
        out = client_pod(kubectl, script)
        lines = [line.split() for line in out.splitlines() if line.strip()]
        assert [ip for ip, _ in lines] == addresses and all(int(n) > 5 for _, n in lines), out
