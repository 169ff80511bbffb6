"""Compute a RustMQCluster's status from what a reconcile pass decided and observed.

Conditions follow the kstatus conventions that ``kubectl wait``, Flux and the ArgoCD health
check (examples/argocd) read:

* ``Ready`` means converged: the operator has acted on this generation, every broker runs the
  current configuration and is Ready, and nothing is stalled. Its reason is the most useful
  single word for ``kubectl get rmq`` (Reconciled, RollingUpdate, Draining, ...).
* ``Reconciling`` (abnormal-true) while the operator is still converging.
* ``Stalled`` (abnormal-true) when it cannot progress without a person changing something.
* ``Available`` iff the brokers' health report (``<cluster>-health``) is fresh and every
  partition has a leader: Ready pods say nothing about data (one Ready broker of three can
  leave two thirds of the partitions offline). No report, or a stale one, is not Available.
* ``Degraded`` (abnormal-true) when the fresh report shows partitions offline
  (OfflinePartitions) or under-replicated (UnderReplicated); Unknown without a fresh report.
  ``MonitoringReady`` says whether the ServiceMonitor exists (its absence never makes the
  cluster un-Ready); ``Paused`` mirrors the pause annotation.

The status is rebuilt whole on every pass and compared with the stored one; a condition's
``lastTransitionTime`` moves only when its status flips, and every list is sorted, so a pass
that finds nothing new produces an identical status and no write (no hot loop, no ArgoCD
refresh storm). ``merge_patch`` turns old and new into the smallest JSON merge patch. Pure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from rustmq_operator import health, naming, planning
from rustmq_operator import spec as specs


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Everything the status depends on; assembled by the reconciler."""

    name: str
    namespace: str
    generation: int
    spec: Mapping[str, Any]
    replicas: int  # StatefulSet size decided this pass
    config_hash: str
    claim_size: str
    last_non_zero: int | None
    observed: planning.Observed
    paused: bool = False
    stalled: planning.Verdict | None = None
    progressing: planning.Verdict | None = None
    monitoring: planning.Verdict | None = None  # None: ServiceMonitor in place
    report: health.Report = health.Report(None, "no health report from the brokers' controller yet")
    drain: Mapping[str, Any] | None = None
    handover: Mapping[str, Any] | None = None  # a controlled shutdown being waited for
    members: tuple[int, ...] | None = None  # the membership as written after this pass


def endpoints(inputs: Inputs) -> dict[str, Any]:
    spec, name, namespace = inputs.spec, inputs.name, inputs.namespace
    ports = spec["ports"]
    headless = f"{naming.headless_service(name)}.{namespace}.svc"
    client = f"{naming.client_service(name)}.{namespace}.svc"
    found: dict[str, Any] = {
        "headless": headless,
        "producer": f"{client}:{ports['producer']}",
        "consumer": f"{client}:{ports['consumer']}",
        "brokers": [
            f"{naming.pod(name, ordinal)}.{headless}:{ports['producer']}"
            for ordinal in range(inputs.replicas)
        ],
    }
    if spec["services"]["metrics"]["enabled"]:
        found["metrics"] = f"{naming.metrics_service(name)}.{namespace}.svc:{ports['metrics']}"
    external = external_endpoint(inputs)
    if external:
        found["external"] = external
    return found


def external_endpoint(inputs: Inputs) -> dict[str, Any] | None:
    """The load balancer's address once one is assigned (by Cilium LB-IPAM, MetalLB, a cloud)."""
    service = inputs.observed.external_service
    if not inputs.spec["services"]["external"]["enabled"] or service is None:
        return None
    ingress = service.get("status", {}).get("loadBalancer", {}).get("ingress") or []
    if not ingress:
        return None
    first = ingress[0]
    found: dict[str, Any] = {}
    if first.get("ip"):
        found["ip"] = first["ip"]
    if first.get("hostname"):
        found["hostname"] = first["hostname"]
    found["ports"] = sorted(
        int(port["port"]) for port in service.get("spec", {}).get("ports", []) if "port" in port
    )
    return found if ("ip" in found or "hostname" in found) else None


def _condition(
    kind: str, value: bool, reason: str, message: str, generation: int
) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True" if value else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


def conditions(inputs: Inputs, ready: int, updated: int, existing: int) -> list[dict[str, Any]]:
    generation, replicas = inputs.generation, inputs.replicas
    progressing = inputs.progressing
    if progressing is None and not inputs.paused:
        if existing != replicas or ready != replicas:
            verb = "Hibernating" if replicas == 0 else "WaitingForBrokers"
            progressing = planning.Verdict(
                verb, f"{ready}/{replicas} broker(s) Ready, {existing} pod(s) exist"
            )
        elif updated != replicas:
            progressing = planning.Verdict(
                "RollingUpdate", f"{updated}/{replicas} broker(s) run the current configuration"
            )
    stalled = inputs.stalled
    if inputs.paused:
        ready_condition = _condition(
            "Ready",
            False,
            "Paused",
            f"reconciliation paused by the annotation {specs.PAUSE_ANNOTATION}",
            generation,
        )
    elif stalled is not None:
        ready_condition = _condition("Ready", False, stalled.reason, stalled.message, generation)
    elif progressing is not None:
        ready_condition = _condition(
            "Ready", False, progressing.reason, progressing.message, generation
        )
    elif replicas == 0:
        ready_condition = _condition(
            "Ready", True, "Hibernated", "no brokers run; their volumes are kept", generation
        )
    else:
        ready_condition = _condition(
            "Ready", True, "Reconciled", f"{ready}/{replicas} broker(s) Ready", generation
        )
    available, degraded = data_conditions(inputs, ready)
    monitoring = inputs.monitoring
    return [
        ready_condition,
        available,
        degraded,
        _condition(
            "Reconciling",
            progressing is not None and not inputs.paused,
            progressing.reason if progressing is not None else "Reconciled",
            progressing.message if progressing is not None else "",
            generation,
        ),
        _condition(
            "Stalled",
            stalled is not None,
            stalled.reason if stalled is not None else "NotStalled",
            stalled.message if stalled is not None else "",
            generation,
        ),
        _condition(
            "MonitoringReady",
            monitoring is None or monitoring.reason == "Disabled",
            monitoring.reason if monitoring is not None else "ServiceMonitorApplied",
            monitoring.message if monitoring is not None else "",
            generation,
        ),
        _condition(
            "Paused",
            inputs.paused,
            "PausedByAnnotation" if inputs.paused else "NotPaused",
            "",
            generation,
        ),
    ]


def data_conditions(inputs: Inputs, ready: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``Available`` and ``Degraded``, from the health report (what the data looks like)."""
    generation, replicas = inputs.generation, inputs.replicas
    fresh = inputs.report.fresh
    if replicas == 0:
        available = _condition(
            "Available", False, "Hibernated", "replicas is 0; no broker serves clients", generation
        )
    elif fresh is None:
        reason = "HealthReportStale" if inputs.report.health is not None else "NoHealthReport"
        available = _condition(
            "Available",
            False,
            reason,
            f"{inputs.report.problem}; {ready}/{replicas} broker pod(s) Ready",
            generation,
        )
    elif fresh.offline:
        available = _condition(
            "Available",
            False,
            "OfflinePartitions",
            f"{fresh.offline} of {fresh.partitions} partition(s) have no leader",
            generation,
        )
    else:
        available = _condition(
            "Available",
            True,
            "AllPartitionsLed",
            f"each of {fresh.partitions} partition(s) has a leader; {ready}/{replicas} broker(s) Ready",
            generation,
        )
    if fresh is None:
        degraded = _condition("Degraded", False, "HealthUnknown", str(inputs.report.problem), generation)
        degraded["status"] = "Unknown"
    elif fresh.offline:
        degraded = _condition(
            "Degraded",
            True,
            "OfflinePartitions",
            f"{fresh.offline} of {fresh.partitions} partition(s) have no leader: no broker serves them",
            generation,
        )
    elif fresh.under_replicated:
        degraded = _condition(
            "Degraded",
            True,
            "UnderReplicated",
            f"{fresh.under_replicated} of {fresh.partitions} partition(s) have fewer in-sync "
            f"replicas than replicas ({fresh.under_min_isr} below min.insync.replicas)",
            generation,
        )
    else:
        degraded = _condition(
            "Degraded", False, "AllInSync", f"every replica of {fresh.partitions} partition(s) is in sync", generation
        )
    return available, degraded


def compute(
    inputs: Inputs, previous: Mapping[str, Any] | None, now: str
) -> dict[str, Any]:
    """The full status for this pass. ``now`` (RFC 3339) stamps conditions that flipped."""
    pods = planning.live_pods(inputs.observed.pods, inputs.name, inputs.replicas)
    ready = sum(1 for pod in pods if planning.pod_ready(pod))
    updated = sum(1 for pod in pods if planning.pod_hash(pod) == inputs.config_hash)
    new_conditions = conditions(inputs, ready=ready, updated=updated, existing=len(pods))
    old_conditions = {
        condition.get("type"): condition
        for condition in (previous or {}).get("conditions", []) or []
    }
    for condition in new_conditions:
        old = old_conditions.get(condition["type"])
        if old is not None and old.get("status") == condition["status"] and old.get(
            "lastTransitionTime"
        ):
            condition["lastTransitionTime"] = old["lastTransitionTime"]
        else:
            condition["lastTransitionTime"] = now
    status: dict[str, Any] = {
        "observedGeneration": inputs.generation,
        "replicas": len(pods),
        "readyReplicas": ready,
        "updatedReplicas": updated,
        "selector": naming.selector_string(inputs.name),
        "configHash": inputs.config_hash,
        "image": inputs.spec["image"],
        "storageSize": inputs.claim_size,
        "endpoints": endpoints(inputs),
        "conditions": new_conditions,
    }
    if inputs.last_non_zero:
        status["lastNonZeroReplicas"] = inputs.last_non_zero
    fresh = inputs.report.fresh
    if fresh is not None:
        status["partitions"] = fresh.partitions
        status["offlinePartitions"] = fresh.offline
        status["underReplicatedPartitions"] = fresh.under_replicated
        status["leadership"] = fresh.leadership()
    if inputs.members is not None:
        status["members"] = ",".join(str(member) for member in inputs.members)
    if inputs.drain:
        status["drain"] = dict(inputs.drain)
    if inputs.handover:
        status["handover"] = dict(inputs.handover)
    return status


def merge_patch(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new``; empty if they are equal."""
    old = old or {}
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            nested = merge_patch(before, value)
            if nested:
                patch[key] = nested
        elif before != value:
            patch[key] = value
    return patch


def condition(status: Mapping[str, Any] | None, kind: str) -> Mapping[str, Any] | None:
    for found in (status or {}).get("conditions", []) or []:
        if found.get("type") == kind:
            return found
    return None


def stalled_reasons(status: Mapping[str, Any] | None) -> Sequence[str]:
    found = condition(status, "Stalled")
    if found is None or found.get("status") != "True":
        return ()
    return (str(found.get("reason")),)
