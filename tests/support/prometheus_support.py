"""Prometheus in the tests: Debian's `prometheus` and `promtool` (fetched by
tools/controlplane/fetch-prometheus, which scripts/setup runs), and a stand-in for the
Prometheus Operator that configures that Prometheus from a ServiceMonitor and a PrometheusRule.

Why a stand-in: the Prometheus Operator turns a ServiceMonitor into a scrape job whose targets
come from Prometheus' Kubernetes service discovery, and Debian builds Prometheus without that
discovery (`kubernetes_sd_configs` is compiled out). So this module plays both missing parts, and
nothing more:

- the discovery: `discover()` reads the ServiceMonitor's Services (its selector, in its
  namespaceSelector's namespaces), their EndpointSlices and the endpoints' Pods from the API
  server and writes one file_sd target per endpoint address and slice port, labelled with the
  `__meta_kubernetes_*` labels the `endpointslice` role would attach (not-ready endpoints
  included, as Kubernetes discovery includes them);
- the operator: `scrape_config()` is the job the Prometheus Operator (v0.85,
  pkg/prometheus/promcfg.go `generateServiceMonitorConfig`, endpointslice role) generates for one
  endpoint of the ServiceMonitor: job name `serviceMonitor/<ns>/<name>/<i>`, interval, timeout,
  path and scheme from the endpoint, and its relabelling (keep the selected Services and the
  named port, copy namespace/service/pod/container, drop Failed or Succeeded pods, job = the
  Service's name, endpoint = the port's name). Prometheus itself applies that relabelling, so the
  labels the alerts match on are made by Prometheus, not by this module. The PrometheusRule's
  `spec` becomes a rule file as the operator writes it (`<namespace>-<name>-<uid>.yaml`).

What it does not do: watch (a later change is seen when `discover()` runs again), matchExpressions,
targetPort/podTargetLabels/jobLabel/TLS/auth, or any other ServiceMonitor field the operator's
ServiceMonitor does not use; `scrape_config()` refuses those rather than ignoring them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
FETCH = REPO / "tools" / "controlplane" / "fetch-prometheus"
HOW_TO_GET_IT = (
    "prometheus and promtool come from Debian's prometheus package: run scripts/setup "
    "(or tools/controlplane/fetch-prometheus) on a Debian machine"
)


def bin_dir() -> Path:
    """Where fetch-prometheus keeps the binaries; AssertionError saying how to get them if absent."""
    found = subprocess.run([str(FETCH), "--print-dir"], capture_output=True, text=True, timeout=30)
    path = Path(found.stdout.strip())
    assert found.returncode == 0 and (path / "promtool").exists(), HOW_TO_GET_IT
    return path


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bin_dir() / "promtool"), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def rule_file_name(rule: dict[str, Any]) -> str:
    meta = rule["metadata"]
    return f"{meta['namespace']}-{meta['name']}-{meta.get('uid', 'rendered')}.yaml"


def rule_file_text(rule: dict[str, Any]) -> str:
    """A PrometheusRule's rule file, as the Prometheus Operator writes it: its spec (the groups)."""
    return yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False)


# --- the Prometheus Operator's scrape job for a ServiceMonitor endpoint (pure) ---

SUPPORTED_MONITOR_FIELDS = {"selector", "namespaceSelector", "endpoints"}
SUPPORTED_ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "scheme"}


def label_name(name: str) -> str:
    """Prometheus' sanitising of a Kubernetes label name into a meta label suffix."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def job_name(monitor: dict[str, Any], index: int) -> str:
    return f"serviceMonitor/{monitor['metadata']['namespace']}/{monitor['metadata']['name']}/{index}"


def scrape_config(monitor: dict[str, Any], index: int, targets_file: Path) -> dict[str, Any]:
    spec = monitor["spec"]
    unsupported = set(spec) - SUPPORTED_MONITOR_FIELDS
    endpoint = spec["endpoints"][index]
    unsupported |= set(endpoint) - SUPPORTED_ENDPOINT_FIELDS
    unsupported |= set(spec["selector"]) - {"matchLabels"}
    if unsupported or "port" not in endpoint:
        raise ValueError(f"the stand-in does not translate {sorted(unsupported) or ['an endpoint without port']}")
    relabel: list[dict[str, Any]] = [{"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"}]
    for key, value in sorted(spec["selector"].get("matchLabels", {}).items()):
        relabel.append({
            "action": "keep",
            "source_labels": [f"__meta_kubernetes_service_label_{label_name(key)}",
                              f"__meta_kubernetes_service_labelpresent_{label_name(key)}"],
            "regex": f"({value});true",
        })
    relabel.append({"action": "keep", "source_labels": ["__meta_kubernetes_endpointslice_port_name"],
                    "regex": endpoint["port"]})
    target = ["__meta_kubernetes_endpointslice_address_target_kind", "__meta_kubernetes_endpointslice_address_target_name"]
    relabel += [
        {"source_labels": target, "separator": ";", "regex": "Node;(.*)", "replacement": "${1}", "target_label": "node"},
        {"source_labels": target, "separator": ";", "regex": "Pod;(.*)", "replacement": "${1}", "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"},
        {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job", "replacement": "${1}"},
        {"target_label": "endpoint", "replacement": endpoint["port"]},
    ]
    config: dict[str, Any] = {
        "job_name": job_name(monitor, index),
        "honor_labels": False,
        "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "5s"}],
    }
    for field, key in (("interval", "scrape_interval"), ("scrapeTimeout", "scrape_timeout"),
                       ("path", "metrics_path"), ("scheme", "scheme")):
        if field in endpoint:
            config[key] = endpoint[field]
    config["relabel_configs"] = relabel
    return config


# --- Kubernetes service discovery, endpointslice role, for the selected Services (pure) ---

def target_groups(services: list[dict[str, Any]], slices: list[dict[str, Any]],
                  pods: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """One file_sd group per endpoint address and slice port, with the endpointslice role's meta
    labels. `slices` are the EndpointSlices of `services` (label kubernetes.io/service-name);
    `pods` maps (namespace, name) to the Pods their endpoints point at."""
    by_name = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in services}
    groups = []
    for endpoint_slice in slices:
        namespace = endpoint_slice["metadata"]["namespace"]
        service = by_name[(namespace, endpoint_slice["metadata"]["labels"]["kubernetes.io/service-name"])]
        common = {"__meta_kubernetes_namespace": namespace,
                  "__meta_kubernetes_endpointslice_name": endpoint_slice["metadata"]["name"],
                  "__meta_kubernetes_service_name": service["metadata"]["name"]}
        for key, value in (service["metadata"].get("labels") or {}).items():
            common[f"__meta_kubernetes_service_label_{label_name(key)}"] = value
            common[f"__meta_kubernetes_service_labelpresent_{label_name(key)}"] = "true"
        for endpoint in endpoint_slice.get("endpoints") or []:
            ref = endpoint.get("targetRef") or {}
            pod = pods.get((namespace, ref.get("name", ""))) if ref.get("kind") == "Pod" else None
            for port in endpoint_slice.get("ports") or []:
                labels = dict(common)
                labels.update({
                    "__meta_kubernetes_endpointslice_port_name": port.get("name", ""),
                    "__meta_kubernetes_endpointslice_port": str(port["port"]),
                    "__meta_kubernetes_endpointslice_port_protocol": port.get("protocol", "TCP"),
                    "__meta_kubernetes_endpointslice_endpoint_conditions_ready":
                        str(bool(endpoint.get("conditions", {}).get("ready"))).lower(),
                    "__meta_kubernetes_endpointslice_address_target_kind": ref.get("kind", ""),
                    "__meta_kubernetes_endpointslice_address_target_name": ref.get("name", ""),
                })
                if pod is not None:
                    labels |= pod_labels(pod, port["port"])
                for address in endpoint.get("addresses") or []:
                    groups.append({"targets": [f"{address}:{port['port']}"], "labels": labels})
    return groups


def pod_labels(pod: dict[str, Any], port: int) -> dict[str, str]:
    labels = {"__meta_kubernetes_pod_name": pod["metadata"]["name"],
              "__meta_kubernetes_pod_phase": (pod.get("status") or {}).get("phase", ""),
              "__meta_kubernetes_pod_ip": (pod.get("status") or {}).get("podIP", "")}
    for key, value in (pod["metadata"].get("labels") or {}).items():
        labels[f"__meta_kubernetes_pod_label_{label_name(key)}"] = value
    for container in pod["spec"]["containers"]:
        if any(p.get("containerPort") == port for p in container.get("ports") or []):
            labels["__meta_kubernetes_pod_container_name"] = container["name"]
    return labels


# --- the I/O: the API server, the files, the process ---

def discover(kubectl: Callable[..., dict[str, Any]], monitor: dict[str, Any]) -> list[dict[str, Any]]:
    """Read what the ServiceMonitor selects through `kubectl(*args) -> parsed JSON` and return
    its target groups. Only matchLabels selectors (the operator's); matchNames namespaces."""
    spec = monitor["spec"]
    namespaces = (spec.get("namespaceSelector") or {}).get("matchNames") or [monitor["metadata"]["namespace"]]
    selector = ",".join(f"{k}={v}" for k, v in spec["selector"].get("matchLabels", {}).items())
    services, slices, pods = [], [], {}
    for namespace in namespaces:
        found = kubectl("get", "services", "-n", namespace, "-l", selector, "-o", "json")["items"]
        services += found
        for service in found:
            name = service["metadata"]["name"]
            slices += kubectl("get", "endpointslices", "-n", namespace, "-l",
                              f"kubernetes.io/service-name={name}", "-o", "json")["items"]
        for pod in kubectl("get", "pods", "-n", namespace, "-o", "json")["items"]:
            pods[(namespace, pod["metadata"]["name"])] = pod
    return target_groups(services, slices, pods)


@dataclass
class Prometheus:
    """A running Prometheus; `url` is its HTTP API's base."""

    url: str
    directory: Path
    process: subprocess.Popen[bytes]

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def log(self) -> str:
        return (self.directory / "prometheus.log").read_text(errors="replace")[-6000:]


def listening_port(pid: int) -> int | None:
    """The TCP port `pid` listens on (its sockets' inodes looked up in /proc/<pid>/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
            return int(fields[1].split(":")[1], 16)
    return None


@contextmanager
def running(directory: Path, scrape_configs: list[dict[str, Any]], rule_files: dict[str, str],
            evaluation_interval: str = "30s") -> Iterator[Prometheus]:
    """Prometheus on 127.0.0.1 (a free port) with these scrape jobs and rule files, its data and
    log under `directory`; stopped (SIGTERM, then SIGKILL) on exit."""
    (directory / "rules").mkdir(parents=True, exist_ok=True)
    for name, text in rule_files.items():
        (directory / "rules" / name).write_text(text)
    config = {
        "global": {"scrape_interval": "30s", "evaluation_interval": evaluation_interval},
        "rule_files": [str(directory / "rules" / "*.yaml")],
        "scrape_configs": scrape_configs,
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    checked = promtool("check", "config", str(directory / "prometheus.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with (directory / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [str(bin_dir() / "prometheus"), f"--config.file={directory / 'prometheus.yml'}",
             f"--storage.tsdb.path={directory / 'data'}", "--web.listen-address=127.0.0.1:0"],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        port = None
        while port is None:
            assert process.poll() is None, (directory / "prometheus.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "Prometheus did not listen within 60 s"
            time.sleep(0.2)
            port = listening_port(process.pid)
        prometheus = Prometheus(f"http://127.0.0.1:{port}", directory, process)
        while True:
            try:
                with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus was not ready within 60 s:\n" + prometheus.log()
            time.sleep(0.3)
        yield prometheus
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
