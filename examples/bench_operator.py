"""Operator overhead on a running cluster: N RustMQClusters of 3 brokers created at once.

Prints JSON: time from `kubectl apply` to all Ready, reconcile passes and their mean duration
(from the operator's own metrics) until then and during one idle minute, and how many
RustMQClusters had their status written while idle (should be 0: no hot loop). Runs the real
`rustmq-operator` against $KUBECONFIG (e.g. `eval "$(scripts/local-cluster env)"`), in the
namespace `bench-operator`, which it deletes afterwards. kwok brokers are Ready at once, so the
figures are the operator's, not a broker's start-up.

    .venv/bin/python examples/bench_operator.py [--clusters 10] [--idle 60]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

NAMESPACE = "bench-operator"


def kubectl(*args: str, stdin: str | None = None) -> str:
    return subprocess.run(
        [shutil.which("kubectl") or "kubectl", *args], input=stdin, capture_output=True, text=True, check=True
    ).stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def reconcile_metrics(port: int) -> tuple[float, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = float(re.search(r"rustmq_operator_reconcile_seconds_sum (\S+)", text).group(1))
    count = float(re.search(r"rustmq_operator_reconcile_seconds_count (\S+)", text).group(1))
    return total, count


def versions() -> dict[str, str]:
    items = json.loads(kubectl("get", "rmq", "-n", NAMESPACE, "-o", "json"))["items"]
    return {item["metadata"]["name"]: item["metadata"]["resourceVersion"] for item in items}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, default=10)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds to watch an idle fleet")
    args = parser.parse_args()
    liveness, metrics = free_port(), free_port()
    operator_bin = Path(sys.executable).with_name("rustmq-operator")
    log = open("/tmp/bench-operator.log", "w")  # noqa: SIM115 (closed below)
    operator = subprocess.Popen(
        [str(operator_bin), f"--liveness=http://127.0.0.1:{liveness}/healthz", f"--metrics-port={metrics}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{liveness}/healthz", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        kubectl("create", "namespace", NAMESPACE)
        manifests = "".join(
            f"---\napiVersion: rustmq.io/v1alpha1\nkind: RustMQCluster\n"
            f"metadata: {{name: c{i}, namespace: {NAMESPACE}}}\nspec: {{replicas: 3}}\n"
            for i in range(args.clusters)
        )
        started = time.monotonic()
        kubectl("apply", "-f", "-", stdin=manifests)
        kubectl("wait", "--for=condition=Ready", "rmq", "--all", "-n", NAMESPACE, "--timeout=600s")
        ready_after = time.monotonic() - started
        busy_sum, busy_count = reconcile_metrics(metrics)
        before = versions()
        time.sleep(args.idle)
        idle_sum, idle_count = reconcile_metrics(metrics)
        after = versions()
        print(json.dumps({
            "clusters": args.clusters,
            "brokers": 3 * args.clusters,
            "apply_to_all_ready_s": round(ready_after, 2),
            "passes_until_ready": int(busy_count),
            "mean_pass_ms_until_ready": round(1000 * busy_sum / busy_count, 1),
            "idle_seconds": args.idle,
            "idle_passes": int(idle_count - busy_count),
            "idle_mean_pass_ms": round(1000 * (idle_sum - busy_sum) / max(idle_count - busy_count, 1), 1),
            "status_writes_while_idle": sum(before[name] != after.get(name) for name in before),
        }))
    finally:
        operator.terminate()
        operator.wait(timeout=30)
        log.close()
        subprocess.run([shutil.which("kubectl") or "kubectl", "delete", "namespace", NAMESPACE, "--wait=false"],
                       capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
