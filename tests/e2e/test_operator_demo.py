"""examples/local-cluster-demo.sh (the Kubernetes half of the README's one-machine run) brings
the seed's RustMQCluster to Ready on the test cluster and says where to look."""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
# The pool of the LB-IPAM that `scripts/local-cluster up` runs (tools/controlplane/lbipam.py).
LB_POOL = "10.89.0.0/24"
pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_local_cluster_demo_reaches_ready(cluster: Any, namespace: str) -> None:
    env = {**cluster.env, "RUSTMQ_DEMO_NAMESPACE": namespace}
    result = subprocess.run(
        [str(REPO / "examples" / "local-cluster-demo.sh"), "--once"],
        capture_output=True, text=True, env=env, timeout=280, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    header, row = result.stdout.splitlines()[:2]
    assert header.split()[:3] == ["NAME", "READY", "DESIRED"]
    assert row.split()[:6] == ["rustmq", "True", "1", "1", "12", "Reconciled"]
    assert ipaddress.ip_address(row.split()[6]) in ipaddress.ip_network(LB_POOL)
    assert f"kubectl describe rmq rustmq -n {namespace}" in result.stdout
