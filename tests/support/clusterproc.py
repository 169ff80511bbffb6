"""Real multi-broker clusters for tests: the local control plane's API server plus broker processes.

``control_plane()`` yields a kubeconfig: $KUBECONFIG when it names a file (a cluster already up),
otherwise a fresh ``scripts/local-cluster up --no-build`` in a temp state directory, stopped
afterwards. ``BrokerCluster`` runs N ``python -m rustmq broker`` processes on 127.0.0.1 (port 0)
carrying a StatefulSet pod's identity (RUSTMQ_BROKER_ID, RUSTMQ_CLUSTER_NAME/NAMESPACE,
RUSTMQ_KUBECONFIG), each in its own data directory, coordinating through that API server in a
namespace of their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from brokerproc import BrokerProcess, RawClient

REPO = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER = REPO / "scripts" / "local-cluster"

# Fast failover for tests; the documented defaults are 6 / 1 / 2 s (docs/cluster.md).
FAST_TIMING = {"RUSTMQ_LEASE_DURATION_S": "4", "RUSTMQ_LEASE_RENEW_S": "0.5", "RUSTMQ_API_TIMEOUT_S": "1.5",
               "RUSTMQ_REPLICA_LAG_S": "3", "RUSTMQ_CLUSTER_POLL_S": "0.25",
               "RUSTMQ_CONTROLLED_SHUTDOWN_S": "8", "RUSTMQ_PREFERRED_LEADER_DELAY_S": "3"}


@contextmanager
def control_plane() -> Iterator[Path]:
    existing = os.environ.get("KUBECONFIG", "")
    if existing and Path(existing).is_file():
        yield Path(existing)
        return
    state_dir = Path(tempfile.mkdtemp(prefix="rustmq-cluster-cp-"))
    up = subprocess.run([str(LOCAL_CLUSTER), "up", "--no-build", "--dir", str(state_dir), "--owner-pid", str(os.getpid())],
                        capture_output=True, text=True, timeout=240)
    if up.returncode != 0:
        subprocess.run([str(LOCAL_CLUSTER), "down", "--dir", str(state_dir)], capture_output=True, timeout=60)
        raise RuntimeError(f"scripts/local-cluster up failed (build it with `scripts/local-cluster build`):\n{up.stderr}")
    try:
        yield Path(up.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run([str(LOCAL_CLUSTER), "down", "--dir", str(state_dir)], capture_output=True, timeout=60)


def api_server_pid(kubeconfig: Path) -> int:
    """The kube-apiserver process of the local control plane that wrote this kubeconfig
    (scripts/local-cluster keeps <state dir>/run/kube-apiserver.pid beside it)."""
    pid_file = kubeconfig.parent / "run" / "kube-apiserver.pid"
    if not pid_file.is_file():
        raise RuntimeError(f"{kubeconfig} is not from scripts/local-cluster (no {pid_file}): the test needs "
                           "its own local control plane's API server to pause it (unset KUBECONFIG)")
    pid = int(pid_file.read_text().strip())
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if not cmdline or not cmdline[0].endswith(b"kube-apiserver"):
        raise RuntimeError(f"pid {pid} from {pid_file} is not a kube-apiserver")
    return pid


def create_namespace(kubeconfig: Path) -> str:
    from kubernetes import client, config

    name = f"rmq-{uuid.uuid4().hex[:8]}"
    api = config.new_client_from_config(config_file=str(kubeconfig))
    try:
        client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    finally:
        api.close()
    return name


class BrokerCluster:
    def __init__(self, root: Path, kubeconfig: Path, namespace: str, size: int, *, name: str = "rmq",
                 env: dict[str, str] | None = None, extra_args: tuple[str, ...] = (),
                 racks: dict[int, str] | None = None) -> None:
        self.root = root
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.name = name
        self.size = size
        self.env = {**FAST_TIMING, **(env or {})}
        self.extra_args = extra_args
        self.racks = racks or {}  # broker id -> RUSTMQ_RACK
        self.brokers: dict[int, BrokerProcess] = {}

    def broker_env(self, broker_id: int) -> dict[str, str]:
        return {
            "RUSTMQ_CLUSTER_MODE": "kubernetes", "RUSTMQ_CLUSTER_NAME": self.name,
            "RUSTMQ_CLUSTER_NAMESPACE": self.namespace, "RUSTMQ_BROKER_ID": str(broker_id),
            "RUSTMQ_INTERNAL_HOST": self.broker_host(broker_id), "RUSTMQ_KUBECONFIG": str(self.kubeconfig),
            "RUSTMQ_UVLOOP": "true", **self.env,
            **({"RUSTMQ_RACK": self.racks[broker_id]} if broker_id in self.racks else {}),
        }

    def broker_host(self, broker_id: int) -> str:
        """The address broker_id listens on (tests/support/netns.py gives each its own)."""
        return "127.0.0.1"

    def command_prefix(self, broker_id: int) -> tuple[str, ...]:
        return ()

    def start(self, broker_id: int) -> BrokerProcess:
        old = self.brokers.get(broker_id)
        same_ports: tuple[str, ...] = ()
        if old is not None:  # a restarted pod keeps its address: same ports
            old.kill()
            old._log.close()
            same_ports = ("--producer-port", str(old.producer_port), "--consumer-port", str(old.consumer_port))
        process = BrokerProcess(self.root / f"broker-{broker_id}", "--log", '{"segment_bytes": 1048576}',
                                *same_ports, *self.extra_args, env=self.broker_env(broker_id),
                                host=self.broker_host(broker_id), command_prefix=self.command_prefix(broker_id))
        self.brokers[broker_id] = process.start()
        return process

    def start_all(self) -> BrokerCluster:
        for broker_id in range(self.size):
            self.start(broker_id)
        for broker_id in range(self.size):
            self.wait_until_sees_all(broker_id)
        return self

    def wait_until_sees_all(self, broker_id: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                client = RawClient(self.brokers[broker_id].producer_port, timeout=5, host=self.brokers[broker_id].host)
                try:
                    header, _ = client.call({"api": 3, "topics": []})
                finally:
                    client.close()
            except (OSError, EOFError):  # a loaded machine: ask again
                continue
            if len(header["brokers"]) == self.size:
                return
            time.sleep(0.1)
        raise AssertionError(f"broker {broker_id} did not see {self.size} brokers in {timeout} s\n{self.logs()}")

    @property
    def bootstrap(self) -> str:
        return ",".join(p.bootstrap for p in self.brokers.values() if p.alive())

    def metadata(self, topics: list[str] | None = None) -> dict[str, Any]:
        last: Exception | None = None
        for process in self.brokers.values():
            if not process.alive():
                continue
            try:
                client = RawClient(process.producer_port, timeout=5, host=process.host)
                try:
                    header, _ = client.call({"api": 3, "topics": topics})
                finally:
                    client.close()
                return header
            except OSError as exc:
                last = exc
        raise RuntimeError(f"no broker answered METADATA: {last}")

    def wait_for(self, condition: Any, what: str, timeout: float = 30.0, topics: list[str] | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        metadata: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                metadata = self.metadata(topics)
                if condition(metadata):
                    return metadata
            except (RuntimeError, OSError, EOFError, IndexError, KeyError):  # a broker that has not synced yet
                pass
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; last metadata: {metadata}\n{self.logs()}")

    def partition(self, topic: str, index: int) -> dict[str, Any]:
        return self.metadata([topic])["topics"][0]["partitions"][index]

    def kill(self, broker_id: int) -> None:
        self.brokers[broker_id].kill()

    def pause(self, broker_id: int) -> None:
        os.kill(self.brokers[broker_id].pid, signal.SIGSTOP)

    def resume(self, broker_id: int) -> None:
        os.kill(self.brokers[broker_id].pid, signal.SIGCONT)

    def logs(self) -> str:
        out = []
        for broker_id, process in self.brokers.items():
            text = process.log()
            out.append(f"--- broker {broker_id} ---\n" + "\n".join(text.splitlines()[-25:]))
        return "\n".join(out)

    def stop_all(self) -> None:
        """SIGTERM every broker; one that ignores it is killed, the others are still stopped,
        and the failure is raised at the end."""
        failures = []
        for process in self.brokers.values():
            if process.alive():
                try:
                    os.kill(process.pid, signal.SIGCONT)
                except OSError:
                    pass
                try:
                    process.stop(timeout=30)
                except AssertionError as exc:
                    failures.append(str(exc)[-3000:])
            else:
                process._log.close()
        if failures:
            raise AssertionError("\n".join(failures))


def write_membership(cluster: BrokerCluster, brokers: list[int], generation: int, shutdown: int | None = None) -> None:
    """Write ``<cluster>-membership`` as the operator does (docs/cluster.md, "Scaling")."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    api = client.CoreV1Api(config.new_client_from_config(config_file=str(cluster.kubeconfig)))
    name = f"{cluster.name}-membership"
    body = {"metadata": {"name": name, "labels": {"app.kubernetes.io/instance": cluster.name}},
            "data": {"brokers": ",".join(map(str, sorted(brokers))), "generation": str(generation),
                     "shutdown": "" if shutdown is None else str(shutdown)}}
    try:
        try:
            api.replace_namespaced_config_map(name, cluster.namespace, body)
        except ApiException as exc:
            if exc.status != 404:
                raise
            api.create_namespaced_config_map(cluster.namespace, body)
    finally:
        api.api_client.close()


def read_health(cluster: BrokerCluster) -> dict[str, Any] | None:
    """The controller's ``<cluster>-health`` report, or None before the first one."""
    import json

    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    api = client.CoreV1Api(config.new_client_from_config(config_file=str(cluster.kubeconfig)))
    try:
        found = api.read_namespaced_config_map(f"{cluster.name}-health", cluster.namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    finally:
        api.api_client.close()
    return dict(json.loads(found.data["health"]))


def read_placement(cluster: BrokerCluster, topic: str) -> list[dict[str, Any]]:
    """A topic's partitions as the controller stored them (its ``<cluster>-state-NN`` shard), in
    METADATA's shape: what every broker's METADATA converges to, without the lag of a broker's
    state sync."""
    from kubernetes import client, config

    from rustmq.cluster import state as cstate

    api = client.CoreV1Api(config.new_client_from_config(config_file=str(cluster.kubeconfig)))
    try:
        found = api.read_namespaced_config_map(cstate.shard_name(cluster.name, cstate.shard_of(topic)), cluster.namespace)
    finally:
        api.api_client.close()
    stored = cstate.decode_shard(found.data or {})[topic]
    return [{"partition": index, "leader": p.leader, "leader_epoch": p.leader_epoch, "replicas": list(p.replicas),
             "isr": list(p.isr), **({"target": list(p.target)} if p.target else {})}
            for index, p in enumerate(stored.partitions)]
