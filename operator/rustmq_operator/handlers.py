"""kopf registrations: the only module that uses ``kopf.on``.

kopf is used for what it does well (watching with bounded timeouts, reconnecting, logging, the
liveness endpoint); the reconciling itself is level-based and lives in ``reconciler``. Every
watch event, on a RustMQCluster or on any child carrying ``app.kubernetes.io/managed-by:
rustmq-operator``, only puts the cluster's key on a work queue; workers run one
``reconciler.reconcile`` pass per key, and each pass schedules the next (soon while
converging, every 30 s otherwise to correct drift nobody reported).

No handler here needs a finalizer (no delete handlers, daemons or timers), so deleting a
RustMQCluster, or its whole namespace, never waits for this operator: the garbage collector
removes the children through their owner references and the claims stay.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Final

import kopf

from rustmq_operator import k8s, metrics, naming, reconciler, workqueue
from rustmq_operator import spec as specs

logger = logging.getLogger(__name__)

WORKERS: Final = 4
MANAGED: Final = f"app.kubernetes.io/managed-by={naming.MANAGED_BY}"
_CHILDREN: Final = (
    ("apps", "v1", "statefulsets"),
    ("", "v1", "pods"),
    ("", "v1", "services"),
    ("", "v1", "configmaps"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("rbac.authorization.k8s.io", "v1", "roles"),
    ("rbac.authorization.k8s.io", "v1", "rolebindings"),
    ("networking.k8s.io", "v1", "networkpolicies"),
)

Key = tuple[str, str]


class _State:
    queue: workqueue.WorkQueue[Key]
    known: set[Key]
    kube: k8s.Kube
    workers: list[asyncio.Task[None]]
    last_pass: float = 0.0


STATE = _State()


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, **_: Any) -> None:
    # kopf's own state would live under rustmq.io if any handler needed it; none does.
    settings.persistence.finalizer = "rustmq.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="rustmq.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="rustmq.io", key="last-handled-configuration"
    )
    # Bounded watches: a silently dead connection is replaced within two minutes.
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.watching.connect_timeout = 30
    settings.watching.reconnect_backoff = 1.0
    settings.networking.request_timeout = 60
    # The reconciler posts the Events worth a person's attention; kopf's per-handler log
    # events on every watched pod would drown them.
    settings.posting.enabled = False
    for group, _version, plural in _CHILDREN:
        settings.watching.label_selectors[group, plural] = MANAGED
    STATE.kube = k8s.Kube(k8s.load_client(os.environ.get("KUBECONFIG") or None))
    metrics_port = int(os.environ.get("RUSTMQ_OPERATOR_METRICS_PORT", "0"))
    if metrics_port:
        metrics.serve(metrics_port)
    STATE.queue = workqueue.WorkQueue()
    STATE.known = set()
    STATE.workers = [asyncio.create_task(_work(n), name=f"reconcile-{n}") for n in range(WORKERS)]


@kopf.on.cleanup()
async def stop(**_: Any) -> None:
    for task in STATE.workers:
        task.cancel()
    await asyncio.gather(*STATE.workers, return_exceptions=True)


@kopf.on.probe(id="reconcile_workers")
def probe_workers(**_: Any) -> dict[str, Any]:
    dead = [task.get_name() for task in STATE.workers if task.done()]
    if dead:
        raise kopf.PermanentError(f"reconcile workers stopped: {', '.join(dead)}")
    since = round(time.monotonic() - STATE.last_pass, 1) if STATE.last_pass else None
    return {"queued": len(STATE.queue), "seconds_since_last_pass": since}


@kopf.on.event(specs.GROUP, specs.VERSION, specs.PLURAL)
def cluster_changed(*, event: kopf.RawEvent, name: str, namespace: str | None, **_: Any) -> None:
    if namespace is None:  # the resource is namespaced; kopf types the field for cluster-scoped ones too
        return
    if event["type"] == "DELETED":
        STATE.known.discard((namespace, name))
        STATE.queue.forget((namespace, name))
    else:
        STATE.known.add((namespace, name))
        STATE.queue.add((namespace, name))


OPTIONAL_CRDS: Final = frozenset(
    {
        "servicemonitors.monitoring.coreos.com",
        "prometheusrules.monitoring.coreos.com",
        "certificates.cert-manager.io",
    }
)


@kopf.on.event(
    "apiextensions.k8s.io", "v1", "customresourcedefinitions",
    when=lambda name, **_: name in OPTIONAL_CRDS,
)
def optional_crd_changed(**_: Any) -> None:
    """The Prometheus Operator's or cert-manager's CRDs came or went: every cluster re-checks."""
    for key in STATE.known:
        STATE.queue.add(key)


_OURS: Final = {"app.kubernetes.io/managed-by": naming.MANAGED_BY}


@kopf.on.event("apps", "v1", "statefulsets", labels=_OURS)
@kopf.on.event("", "v1", "pods", labels=_OURS)
@kopf.on.event("", "v1", "services", labels=_OURS)
@kopf.on.event("", "v1", "configmaps", labels=_OURS)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=_OURS)
@kopf.on.event("rbac.authorization.k8s.io", "v1", "roles", labels=_OURS)
@kopf.on.event("rbac.authorization.k8s.io", "v1", "rolebindings", labels=_OURS)
@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels=_OURS)
def child_changed(*, labels: kopf.Labels, namespace: str | None, **_: Any) -> None:
    cluster = labels.get(naming.CLUSTER_LABEL)
    if cluster and namespace is not None:
        STATE.queue.add((namespace, cluster))


async def _work(number: int) -> None:
    while True:
        key = await STATE.queue.get()
        namespace, name = key
        started = time.monotonic()
        try:
            outcome = await asyncio.to_thread(reconciler.reconcile, STATE.kube, namespace, name)
        except Exception:  # one failing cluster must not stop the others; retry it later
            logger.exception("reconcile of %s/%s failed; retrying in 5 s", namespace, name)
            metrics.RECONCILES.labels("error").inc()
            STATE.queue.done(key)
            STATE.queue.add(key, 5.0)
            continue
        STATE.last_pass = time.monotonic()
        metrics.RECONCILES.labels("ok").inc()
        metrics.RECONCILE_SECONDS.observe(STATE.last_pass - started)
        STATE.queue.done(key)
        if outcome.requeue_after is None:
            metrics.CONDITIONS.forget(namespace, name)
        else:
            metrics.CONDITIONS.set(namespace, name, dict(outcome.conditions))
            STATE.queue.add(key, outcome.requeue_after)
