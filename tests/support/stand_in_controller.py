"""A test stand-in for the brokers' controller, for the operator's e2e tests on kwok nodes.

kwok pods run no broker, so nothing would ever write ``<cluster>-health``. This thread plays the
controller's side of the scaling contract (docs/operator.md, Scaling) against the real API
server: it reads the operator's ``<cluster>-membership`` and writes the health report a
controller would, with knobs for what the test wants to see (a drain that takes a while,
brokers that keep data, offline partitions, a leadership hand-over that lags). It does NOT move
data: tests using it check the operator alone, and say so. The real controller and the
operator together run in tests/e2e/test_operator_brokers.py.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException


class StandInController:
    def __init__(self, api_client: client.ApiClient, namespace: str, cluster: str = "rustmq") -> None:
        self.core = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.cluster = cluster
        self.lock = threading.Lock()
        # Knobs, changed by the test while the thread runs (under ``lock``).
        self.drain_seconds = 0.0  # a broker leaving the membership keeps its replicas this long
        self.holding: set[int] = set()  # brokers that keep their replicas whatever the membership says
        self.offline = 0
        self.under_replicated = 0
        self.max_replication_factor = 1
        self.handover_seconds = 0.0  # the shutdown broker keeps its leaderships this long
        self.replicas_per_member = 6
        self.paused = False  # stop writing (the report turns stale)
        # What it saw, for the test's assertions: (monotonic time, generation, brokers, shutdown).
        self.seen: list[tuple[float, int, tuple[int, ...], int | None]] = []
        self.handed_over: dict[int, float] = {}  # broker -> when it first reported leading nothing for a shutdown
        self._left_at: dict[int, float] = {}
        self._shutdown_at: dict[int, float] = {}
        self.reports = 0  # health reports written so far
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stand-in-controller", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> StandInController:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def membership(self) -> tuple[int, tuple[int, ...], int | None] | None:
        try:
            found = self.core.read_namespaced_config_map(f"{self.cluster}-membership", self.namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        data = found.data or {}
        brokers = tuple(int(b) for b in (data.get("brokers") or "").split(",") if b.strip())
        shutdown = int(data["shutdown"]) if (data.get("shutdown") or "").strip() else None
        return int(data.get("generation") or 0), brokers, shutdown

    def pods(self) -> list[int]:
        pods = self.core.list_namespaced_pod(
            self.namespace, label_selector=f"rustmq.io/cluster={self.cluster},app.kubernetes.io/component=broker"
        )
        return sorted(int(p.metadata.name.rsplit("-", 1)[1]) for p in pods.items)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._round()
                self._stop.wait(0.5)
        except BaseException as error:  # surfaced by the test through .error
            self.error = error
            raise

    def _round(self) -> None:
        now = time.monotonic()
        membership = self.membership()
        with self.lock:
            if self.paused:
                return
            generation, members, shutdown = membership if membership is not None else (0, (), None)
            if membership is not None and (not self.seen or self.seen[-1][1:] != (generation, members, shutdown)):
                self.seen.append((now, generation, members, shutdown))
            brokers: dict[str, Any] = {}
            for broker in sorted(set(self.pods()) | set(members) | self.holding):
                if broker not in members and broker not in self._left_at:
                    self._left_at[broker] = now
                if broker in members:
                    self._left_at.pop(broker, None)
                leaving = broker not in members and (now - self._left_at[broker] < self.drain_seconds)
                holds = broker in members or leaving or broker in self.holding or membership is None
                replicas = self.replicas_per_member if holds else 0
                leaders = 2 if holds else 0
                if shutdown == broker:
                    started = self._shutdown_at.setdefault(broker, now)
                    if now - started >= self.handover_seconds:
                        leaders = 0
                        self.handed_over.setdefault(broker, now)
                brokers[str(broker)] = {
                    "alive": True, "replicas": replicas, "leaders": leaders, "inSyncReplicas": replicas, "bytes": replicas * 1024,
                }
            for broker in list(self._shutdown_at):
                if broker != shutdown:
                    del self._shutdown_at[broker]
            body = {
                "controllerEpoch": 1,
                "controller": 0,
                "updatedAt": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "observedMembershipGeneration": generation,
                "partitions": 12,
                "offline": self.offline,
                "underReplicated": self.under_replicated,
                "underMinIsr": 0,
                "reassigning": 0,
                "bytesToMove": sum(b["bytes"] for k, b in brokers.items() if int(k) not in members),
                "maxReplicationFactor": self.max_replication_factor,
                "brokers": brokers,
            }
        self._write(json.dumps(body, sort_keys=True))
        with self.lock:
            self.reports += 1

    def wait_for_reports(self, count: int = 2, timeout: float = 15.0) -> None:
        """Block until `count` more reports are written, so a change made under the lock is in
        the report the operator reads next (the one before it may be fresh and not have it)."""
        with self.lock:
            target = self.reports + count
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if self.reports >= target:
                    return
            if time.monotonic() > deadline or self.error is not None:
                raise AssertionError(f"the stand-in controller wrote no report in {timeout} s: {self.error!r}")
            time.sleep(0.1)

    def _write(self, text: str) -> None:
        name = f"{self.cluster}-health"
        body = {
            "metadata": {
                "name": name,
                "labels": {"app.kubernetes.io/instance": self.cluster, "app.kubernetes.io/managed-by": "rustmq-broker"},
            },
            "data": {"health": text},
        }
        try:
            self.core.replace_namespaced_config_map(name, self.namespace, body)
        except ApiException as error:
            if error.status != 404:
                raise
            self.core.create_namespaced_config_map(self.namespace, body)
