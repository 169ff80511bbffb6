"""Helpers for the operator's e2e tests (tests/e2e/test_operator_*.py).

The control-plane fixtures (`cluster`, `api_client`, `namespace`, `lb_ipam`) come from
tests/e2e/conftest.py. This module adds what the operator's tests share: installing crds/,
running the real `rustmq-operator` console script as a subprocess against the cluster's
kubeconfig (started and stopped per test module, restartable within a test), and small
polling helpers over kubectl JSON. Test modules load it with ``load()`` and re-export the
fixtures they use, since --import-mode=importlib keeps tests/e2e off sys.path.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "rustmq.io_rustmqclusters.yaml"
OPERATOR = Path(sys.executable).with_name("rustmq-operator")
T = TypeVar("T")
RUNNING: list[OperatorProcess] = []  # the operator of the current module, for failure messages

# The Prometheus Operator's own ServiceMonitor and PrometheusRule CRDs (its full schemas, which
# prune or refuse what a hand-written subset would let through), copied from its Go module by
# tools/controlplane/fetch-monitoring-crds at the version pinned in tools/controlplane/versions.env.
CRDS = Path(__file__).resolve().parent / "crds"
SERVICE_MONITOR_CRD = (CRDS / "monitoring.coreos.com_servicemonitors.yaml").read_text()
PROMETHEUS_RULE_CRD = (CRDS / "monitoring.coreos.com_prometheusrules.yaml").read_text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60.0, interval: float = 0.5) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    log = RUNNING[-1].log_tail(40) if RUNNING else "(no operator running)"
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})\noperator log:\n{log}")


class OperatorProcess:
    """The real `rustmq-operator` console script, run against the test cluster."""

    def __init__(self, kubeconfig: Path, log_path: Path, namespaces: tuple[str, ...] = ()) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.namespaces = namespaces
        self.process: subprocess.Popen[bytes] | None = None
        self.liveness_port = 0
        self.metrics_port = 0

    def start(self) -> OperatorProcess:
        assert self.process is None, "already running"
        self.liveness_port, self.metrics_port = free_port(), free_port()
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                str(OPERATOR),
                *([f"--namespace={ns}" for ns in self.namespaces] or ["--all-namespaces"]),
                f"--liveness=http://127.0.0.1:{self.liveness_port}/healthz",
                f"--metrics-port={self.metrics_port}",
                "--verbose",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        RUNNING.append(self)
        wait_for("the operator's liveness endpoint", self.alive, timeout=60)
        return self

    def alive(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"rustmq-operator exited with {self.process.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        if self in RUNNING:
            RUNNING.remove(self)

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="module")
def crd_installed(cluster: Any) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    # A CRD created a moment ago may have no status yet, and `kubectl wait` then fails at once
    # (".status.conditions accessor error: <nil>") instead of waiting: ask again.
    for attempt in range(5):
        waited = cluster.kubectl("wait", "--for=condition=Established", "crd/rustmqclusters.rustmq.io",
                                 "--timeout=60s", check=attempt == 4, timeout=75)
        if waited.returncode == 0:
            return
        time.sleep(1)


@pytest.fixture(scope="module")
def operator(cluster: Any, crd_installed: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    log_path = tmp_path_factory.mktemp("operator") / "rustmq-operator.log"
    process = OperatorProcess(cluster.kubeconfig, log_path).start()
    try:
        yield process
    finally:
        process.stop()


class Kubectl:
    """JSON reads and small writes through the cluster's kubectl, scoped to one namespace."""

    def __init__(self, cluster: Any, namespace: str) -> None:
        self.cluster = cluster
        self.namespace = namespace

    def run(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl("-n", self.namespace, *args, input=input, check=check)

    def get(self, kind: str, name: str, managed_fields: bool = False) -> dict[str, Any] | None:
        extra = ["--show-managed-fields"] if managed_fields else []
        result = self.run("get", kind, name, "-o", "json", *extra, check=False)
        if result.returncode != 0:
            if "NotFound" in result.stderr or "not found" in result.stderr:
                return None
            raise AssertionError(result.stderr)
        return dict(json.loads(result.stdout))

    def list(self, kind: str, selector: str | None = None) -> list[dict[str, Any]]:
        args = ["get", kind, "-o", "json"]
        if selector:
            args += ["-l", selector]
        return list(json.loads(self.run(*args).stdout)["items"])

    def apply(self, obj: dict[str, Any] | str, check: bool = True) -> subprocess.CompletedProcess[str]:
        text = obj if isinstance(obj, str) else yaml.safe_dump(obj)
        return self.run("apply", "-f", "-", input=text, check=check)

    def patch(self, kind: str, name: str, patch: dict[str, Any], check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("patch", kind, name, "--type=merge", "-p", json.dumps(patch), check=check)

    def cluster_status(self, name: str = "rustmq") -> dict[str, Any]:
        found = self.get("rustmqcluster", name) or {}
        return dict(found.get("status") or {})

    def condition(self, kind: str, name: str = "rustmq") -> dict[str, Any]:
        for found in self.cluster_status(name).get("conditions", []):
            if found["type"] == kind:
                return dict(found)
        return {}

    def wait_condition(self, kind: str, status: str, reason: str | None = None, name: str = "rustmq", timeout: float = 120) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            cr = self.get("rustmqcluster", name) or {}
            found = self.condition(kind, name)
            fresh = (cr.get("status") or {}).get("observedGeneration") == cr.get("metadata", {}).get("generation")
            if fresh and found.get("status") == status and (reason is None or found.get("reason") == reason):
                return found
            return None

        return wait_for(f"{kind}={status} ({reason or 'any reason'}) on {name}", probe, timeout=timeout)

    def pods(self, cluster: str = "rustmq") -> list[dict[str, Any]]:
        pods = self.list("pods", f"rustmq.io/cluster={cluster},app.kubernetes.io/component=broker")
        return sorted(pods, key=lambda p: p["metadata"]["name"])


def cluster_cr(namespace: str, name: str = "rustmq", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "rustmq.io/v1alpha1",
        "kind": "RustMQCluster",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def example(name: str, namespace: str) -> dict[str, Any]:
    cr = dict(yaml.safe_load((REPO / "examples" / name).read_text()))
    cr["metadata"]["namespace"] = namespace
    return cr


def pod_ready(pod: dict[str, Any]) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", [])
    )


@contextlib.contextmanager
def installed_crd(cluster: Any, manifest: str) -> Iterator[None]:
    """A CRD installed for the duration of the block (cluster-scoped: removed afterwards)."""
    name = yaml.safe_load(manifest)["metadata"]["name"]
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=manifest)
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    try:
        yield
    finally:
        cluster.kubectl("delete", "crd", name, "--wait=true", "--timeout=60s", check=False)


def service_monitor_crd(cluster: Any) -> contextlib.AbstractContextManager[None]:
    return installed_crd(cluster, SERVICE_MONITOR_CRD)
