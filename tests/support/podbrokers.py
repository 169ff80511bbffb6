"""Real broker processes carrying the identities of a StatefulSet's kwok pods.

kwok nodes run no containers: a broker pod there is an API object only. ``PodBrokers`` watches
the RustMQCluster's broker pods in the API server and keeps exactly one real broker host process
(``python -m rustmq broker``, see brokerproc.py) per pod that exists and is not being deleted,
as a kubelet would run its container: RUSTMQ_CLUSTER_MODE=kubernetes, RUSTMQ_BROKER_ID = the
pod's ordinal, a data directory per claim (``data-<cluster>-<n>``, wiped once the operator
deleted that claim, as the volume would be), and RUSTMQ_KUBECONFIG of the test's control plane.
A pod that is deleted (a roll, a shrink) gets its process stopped with SIGTERM, as the kubelet
does; a pod re-created under the same name gets a new process on the same ports and data.

What differs from a real node, and what the tests therefore must not rely on: kwok marks a pod
Ready without asking the broker (the operator's health gates, not readiness, carry the truth
here), and the brokers listen on 127.0.0.1 with their own ports (advertised through their Leases)
instead of the pod's DNS name.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes import client

from brokerproc import BrokerProcess


class PodBrokers:
    def __init__(self, api_client: client.ApiClient, kubeconfig: Path, namespace: str, root: Path,
                 cluster: str = "rustmq", env: dict[str, str] | None = None) -> None:
        self.core = client.CoreV1Api(api_client)
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.root = root
        self.cluster = cluster
        self.env = dict(env or {})
        self.processes: dict[int, tuple[str, BrokerProcess]] = {}  # ordinal -> (pod uid, process)
        self.ports: dict[int, tuple[int, int]] = {}  # ordinal -> (producer, consumer): a pod keeps its address
        self.started: list[tuple[float, int, str]] = []  # (when, ordinal, pod uid)
        self.stopped: list[tuple[float, int, int]] = []  # (when, ordinal, exit code)
        self.wiped: list[str] = []  # claims whose data directory was removed
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pod-brokers", daemon=True)

    def __enter__(self) -> PodBrokers:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        with self._lock:
            for ordinal in list(self.processes):
                self._stop_broker(ordinal)

    def broker_env(self, ordinal: int) -> dict[str, str]:
        return {
            "RUSTMQ_CLUSTER_MODE": "kubernetes", "RUSTMQ_CLUSTER_NAME": self.cluster,
            "RUSTMQ_CLUSTER_NAMESPACE": self.namespace, "RUSTMQ_BROKER_ID": str(ordinal),
            "RUSTMQ_INTERNAL_HOST": "127.0.0.1", "RUSTMQ_KUBECONFIG": str(self.kubeconfig),
            "RUSTMQ_UVLOOP": "true", **self.env,
        }

    def running(self) -> dict[int, BrokerProcess]:
        with self._lock:
            return {ordinal: process for ordinal, (_, process) in self.processes.items() if process.alive()}

    @property
    def bootstrap(self) -> str:
        return ",".join(p.bootstrap for p in self.running().values())

    def logs(self, lines: int = 30) -> str:
        out = []
        for path in sorted(self.root.glob("*-broker.log")):
            text = path.read_text(errors="replace").splitlines()
            out.append(f"--- {path.name} ---\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._sync()
                self._stop.wait(0.2)
        except BaseException as error:  # surfaced through .error
            self.error = error
            raise

    def _sync(self) -> None:
        selector = f"rustmq.io/cluster={self.cluster},app.kubernetes.io/component=broker"
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        live: dict[int, str] = {}
        for pod in pods:
            suffix = pod.metadata.name.rsplit("-", 1)[-1]
            if suffix.isdigit() and pod.metadata.deletion_timestamp is None:
                live[int(suffix)] = pod.metadata.uid
        claims = {c.metadata.name for c in self.core.list_namespaced_persistent_volume_claim(self.namespace).items}
        with self._lock:
            for ordinal, (uid, process) in list(self.processes.items()):
                if live.get(ordinal) != uid or not process.alive():
                    self._stop_broker(ordinal)
            for data_dir in self.root.glob(f"data-{self.cluster}-*"):
                if data_dir.is_dir() and data_dir.name not in claims:
                    ordinal = int(data_dir.name.rsplit("-", 1)[-1])
                    if ordinal not in self.processes:
                        shutil.rmtree(data_dir)
                        self.wiped.append(data_dir.name)
            for ordinal, uid in sorted(live.items()):
                if ordinal not in self.processes:
                    self._start_broker(ordinal, uid)

    def _start_broker(self, ordinal: int, uid: str) -> None:
        data_dir = self.root / f"data-{self.cluster}-{ordinal}"
        data_dir.mkdir(parents=True, exist_ok=True)
        ports: tuple[str, ...] = ()
        if ordinal in self.ports:
            producer, consumer = self.ports[ordinal]
            ports = ("--producer-port", str(producer), "--consumer-port", str(consumer))
        process = BrokerProcess(data_dir, "--log", '{"segment_bytes": 1048576}', *ports, env=self.broker_env(ordinal))
        process.start()
        self.ports[ordinal] = (process.producer_port, process.consumer_port)
        self.processes[ordinal] = (uid, process)
        self.started.append((time.monotonic(), ordinal, uid))

    def _stop_broker(self, ordinal: int) -> None:
        _, process = self.processes.pop(ordinal)
        code = process.stop(timeout=30) if process.alive() else (process.proc.returncode if process.proc else -1)
        if not process._log.closed:
            process._log.close()
        self.stopped.append((time.monotonic(), ordinal, code))
