"""`scripts/run --brokers N`: the local control plane plus N broker processes forming one cluster.

Brings up `scripts/local-cluster` (or uses $KUBECONFIG when it answers), creates the namespace
`rustmq-local`, starts N brokers on 127.0.0.1 as the pods of a StatefulSet `rustmq` would be
(RUSTMQ_BROKER_ID 0..N-1, cluster mode kubernetes, RUSTMQ_KUBECONFIG), the first on the default
ports 9092/9093/9094 (so the CLI's defaults reach the cluster; --once uses free ports), the
others on free ports; prints their addresses; does a round trip (a replicated topic, a produce
with acks=all, a consume) and keeps serving until Ctrl-C (--once: stops after the round trip).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUSTMQ = [str(REPO / ".venv" / "bin" / "python"), "-m", "rustmq"]
NAMESPACE = "rustmq-local"


def kubeconfig() -> Path:
    existing = os.environ.get("KUBECONFIG", "")
    if existing and Path(existing).is_file():
        return Path(existing)
    up = subprocess.run([str(REPO / "scripts" / "local-cluster"), "up"], stdout=subprocess.PIPE, text=True)
    if up.returncode != 0:
        sys.exit("scripts/run: the local control plane did not come up")
    return Path(up.stdout.strip().splitlines()[-1])


def ensure_namespace(config: Path) -> None:
    from kubernetes import client
    from kubernetes import config as kconfig
    from kubernetes.client.exceptions import ApiException

    api = kconfig.new_client_from_config(config_file=str(config))
    try:
        client.CoreV1Api(api).create_namespace({"metadata": {"name": NAMESPACE}})
    except ApiException as exc:
        if exc.status != 409:
            raise
    finally:
        api.close()


def start_broker(index: int, config: Path, data: Path, state: Path, once: bool) -> tuple[subprocess.Popen[bytes], dict]:
    default = index == 0 and not once
    ports = ("9092", "9093", "9094") if default else ("0", "0", "0")
    env = {**os.environ, "RUSTMQ_CLUSTER_MODE": "kubernetes", "RUSTMQ_CLUSTER_NAME": "rustmq",
           "RUSTMQ_CLUSTER_NAMESPACE": NAMESPACE, "RUSTMQ_BROKER_ID": str(index),
           "RUSTMQ_INTERNAL_HOST": "127.0.0.1", "RUSTMQ_KUBECONFIG": str(config)}
    ports_file = state / f"broker-{index}.json"
    ports_file.unlink(missing_ok=True)
    log = open(state / f"broker-{index}.log", "ab")  # noqa: SIM115 - lives as long as the broker
    proc = subprocess.Popen(
        [*RUSTMQ, "broker", "--host", "127.0.0.1", "--producer-port", ports[0], "--consumer-port", ports[1],
         "--metrics-port", ports[2], "--data-dir", str(data / f"broker-{index}"), "--ports-file", str(ports_file)],
        stdout=subprocess.DEVNULL, stderr=log, env=env)
    for _ in range(600):
        if ports_file.exists():
            return proc, json.loads(ports_file.read_text())
        if proc.poll() is not None:
            sys.exit(f"scripts/run: broker {index} exited:\n{(state / f'broker-{index}.log').read_text()[-3000:]}")
        time.sleep(0.1)
    sys.exit(f"scripts/run: broker {index} did not start in 60 s")


def cli(*args: str, check: bool = True) -> str:
    result = subprocess.run([*RUSTMQ, *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise RuntimeError(f"rustmq {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--brokers", type=int, default=3)
    parser.add_argument("--once", action="store_true")
    args = parser.parse_args()
    data = Path(os.environ.get("RUSTMQ_DATA_DIR", REPO / ".data" / "rustmq-cluster"))
    state = data / "run"
    state.mkdir(parents=True, exist_ok=True)
    config = kubeconfig()
    ensure_namespace(config)
    brokers = []
    try:
        for index in range(args.brokers):
            brokers.append(start_broker(index, config, data, state, args.once))
        bootstrap = ",".join(f"127.0.0.1:{ports['producer_port']}" for _, ports in brokers)
        for _ in range(200):
            described = json.loads(cli("cluster", "describe", "--json", "--bootstrap", bootstrap))
            if len(described["brokers"]) == args.brokers:
                break
            time.sleep(0.2)
        run_id = str(time.time_ns())
        print(f"== round trip: topic 'demo-cluster' (replication factor {min(3, args.brokers)}), produce --acks all, consume")
        if "demo-cluster" not in cli("topic", "list", "--bootstrap", bootstrap):
            cli("topic", "create", "demo-cluster", "--partitions", "3", "--bootstrap", bootstrap)
        acked = None
        for _ in range(100):  # the new topic's leaders take a poll period to start
            result = subprocess.run([*RUSTMQ, "produce", "demo-cluster", f"hello {run_id}", "--key", run_id,
                                     "--acks", "all", "--json", "--bootstrap", bootstrap], capture_output=True, text=True)
            if result.returncode == 0:
                acked = json.loads(result.stdout.splitlines()[0])
                break
            time.sleep(0.2)
        if acked is None:
            raise RuntimeError("produce --acks all did not succeed")
        print(json.dumps(acked))
        consumed = cli("consume", "demo-cluster", "--partition", str(acked["partition"]), "--from", str(acked["offset"]),
                       "--max-messages", "1", "--timeout", "10", "--json", "--bootstrap", bootstrap)
        print(consumed.strip())
        if run_id not in consumed:
            raise RuntimeError("round trip FAILED: the message did not come back")
        print("== round trip OK\n")
        print(cli("cluster", "describe", "--bootstrap", bootstrap))
        print(f"RustMQ cluster of {args.brokers} brokers (namespace {NAMESPACE}, kubeconfig {config}), data in {data}")
        for index, (proc, ports) in enumerate(brokers):
            print(f"  broker {index} (pid {proc.pid}): producer 127.0.0.1:{ports['producer_port']}  "
                  f"consumer 127.0.0.1:{ports['consumer_port']}  metrics http://127.0.0.1:{ports['metrics_port']}/metrics")
        print(f"Try:\n  .venv/bin/rustmq cluster describe --bootstrap {bootstrap}\n"
              f"  .venv/bin/rustmq bench produce --acks all --messages 200000 --json --bootstrap {bootstrap}")
        if args.once:
            return 0
        print("Serving until Ctrl-C.")
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        for proc, _ in brokers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in brokers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        print("== brokers stopped")


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
