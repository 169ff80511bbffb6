"""Decide what to change, from the spec and what the cluster looks like right now.

Every reconcile pass observes the real objects (StatefulSet, pods, claims) and calls these pure
functions to decide; nothing is remembered between passes except what the cluster itself shows,
so an operator restarted halfway through a roll or a resize carries on where reality is.

The rules, in the order a pass applies them:

* Scale: scaling up is never gated on health (an unhealthy cluster may need the extra broker).
  Scaling down to fewer brokers would strand the partitions on the removed brokers' volumes,
  since brokers cannot move partitions yet, so it is refused: the StatefulSet keeps its size,
  the spec is left alone (writing it would fight kubectl and ArgoCD) and the cluster reports
  Stalled/ScaleDownBlocked until the spec asks for at least the current size again. Zero is
  allowed: it hibernates the cluster with its claims kept, and waking it needs at least as many
  brokers as it had.
* Storage: a larger ``storage.size`` is written into each smaller claim (the storage driver
  grows the volume online), and since a StatefulSet's claim template is immutable the set is
  deleted with ``propagationPolicy: Orphan`` (its pods keep running) and re-created with the new
  template on the next pass. Sizes are compared with the actual claims, not the template, so a
  resize interrupted at any step completes. A storage class that cannot expand gives
  Stalled/StorageExpansionUnsupported and nothing is touched.
* Roll: the StatefulSet uses ``OnDelete``; a broker whose pod carries an outdated config hash is
  evicted (the Eviction API honours the PodDisruptionBudget) only while every other broker is
  Ready, one per pass. A broker stuck on an outdated revision and not Ready is already down, so
  it is replaced at once: that is how a bad image is recovered from once the spec is fixed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Final

from rustmq_operator import naming
from rustmq_operator import spec as specs


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A condition-worthy finding: why the cluster is progressing or cannot progress."""

    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Observed:
    """What a reconcile pass found in the cluster for one RustMQCluster."""

    statefulset: Mapping[str, Any] | None = None
    pods: Sequence[Mapping[str, Any]] = ()
    claims: Sequence[Mapping[str, Any]] = ()
    external_service: Mapping[str, Any] | None = None
    broker_services: Sequence[Mapping[str, Any]] = ()  # the perBroker LoadBalancer Services
    storage_expandable: bool | None = None  # None: unknown (no claims yet, or class not found)
    storage_class: str | None = None
    service_monitor_crd: bool = False  # the API serves ServiceMonitors
    prometheus_rule_crd: bool = False
    certificate_crd: bool = False  # the API serves cert-manager's Certificates


@dataclasses.dataclass(frozen=True)
class ScalePlan:
    replicas: int
    last_non_zero: int | None
    stalled: Verdict | None = None
    progressing: Verdict | None = None
    events: tuple[Event, ...] = ()


@dataclasses.dataclass(frozen=True)
class StoragePlan:
    claim_size: str
    expand_claims: tuple[str, ...] = ()
    recreate_statefulset: bool = False
    stalled: Verdict | None = None
    progressing: Verdict | None = None
    events: tuple[Event, ...] = ()


@dataclasses.dataclass(frozen=True)
class RollPlan:
    evict: str | None = None  # healthy broker to restart through the Eviction API
    delete: str | None = None  # broken broker on an outdated revision, replaced directly
    progressing: Verdict | None = None
    events: tuple[Event, ...] = ()


def current_replicas(observed: Observed, cluster: str) -> int | None:
    """Brokers the cluster runs now: the StatefulSet's size, or (while it is being re-created)
    one past the highest broker pod still running; None for a cluster that was never created."""
    if observed.statefulset is not None:
        return int(observed.statefulset.get("spec", {}).get("replicas", 1))
    ordinals = [naming.ordinal_of(pod["metadata"]["name"], cluster) for pod in observed.pods]
    found = [ordinal for ordinal in ordinals if ordinal is not None]
    return max(found) + 1 if found else None


def plan_scale(
    cluster: str, desired: int, observed: Observed, last_non_zero: int | None
) -> ScalePlan:
    current = current_replicas(observed, cluster)
    drift: tuple[Event, ...] = ()
    if (
        observed.statefulset is not None
        and last_non_zero
        and current not in (0, last_non_zero)
    ):
        # Someone resized the StatefulSet itself (the seed's README told people to): the size
        # the operator established is what counts, and the hand edit is reverted like any drift.
        drift = (
            Event(
                "Warning",
                "StatefulSetResized",
                f"the StatefulSet was resized outside the operator to {current}; restoring "
                f"{last_non_zero} (scale the RustMQCluster instead, e.g. kubectl scale rmq/{cluster})",
            ),
        )
        current = last_non_zero
    plan = _plan_scale(cluster, desired, current, last_non_zero)
    return dataclasses.replace(plan, events=drift + plan.events) if drift else plan


def _plan_scale(
    cluster: str, desired: int, current: int | None, last_non_zero: int | None
) -> ScalePlan:
    remembered = max(last_non_zero or 0, current or 0) or None
    if current is None:
        return ScalePlan(replicas=desired, last_non_zero=desired or last_non_zero)
    if desired == 0:
        events: tuple[Event, ...] = ()
        if current > 0:
            message = f"Hibernating: stopping {current} broker(s); their volumes are kept"
            events = (Event("Normal", "Hibernating", message),)
        return ScalePlan(replicas=0, last_non_zero=remembered, events=events)
    if current == 0 and last_non_zero and desired < last_non_zero:
        stranded = ", ".join(naming.pod(cluster, i) for i in range(desired, last_non_zero))
        message = (
            f"waking up with {desired} broker(s) refused: the cluster had {last_non_zero} before "
            f"hibernating and the volumes of {stranded} hold partition data; set replicas to at "
            f"least {last_non_zero}"
        )
        return ScalePlan(
            replicas=0,
            last_non_zero=last_non_zero,
            stalled=Verdict("ScaleDownBlocked", message),
        )
    if desired >= current:
        events = ()
        progressing = None
        if desired > current:
            message = f"Scaling up from {current} to {desired} broker(s)"
            events = (Event("Normal", "ScalingUp", message),)
            progressing = Verdict("ScalingUp", message)
        return ScalePlan(
            replicas=desired, last_non_zero=desired, progressing=progressing, events=events
        )
    removed = ", ".join(naming.pod(cluster, i) for i in range(desired, current))
    message = (
        f"scale-down from {current} to {desired} broker(s) refused: {removed} hold partition data "
        f"that RustMQ cannot move to other brokers yet; the cluster keeps {current} broker(s). "
        f"Set replicas back to {current} (or to 0 to hibernate with all volumes kept)"
    )
    return ScalePlan(
        replicas=current, last_non_zero=current, stalled=Verdict("ScaleDownBlocked", message)
    )


def load_balancer_host(service: Mapping[str, Any]) -> str | None:
    """The address a load balancer gave a Service (its first ingress' ip, else hostname)."""
    ingress = service.get("status", {}).get("loadBalancer", {}).get("ingress") or []
    if not ingress:
        return None
    return ingress[0].get("ip") or ingress[0].get("hostname") or None


def listener_hosts(cluster: str, services: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    """broker ordinal -> address, from the perBroker Services' status (those with one)."""
    prefix = naming.broker_external_service(cluster, 0)[:-1]
    found: dict[int, str] = {}
    for service in services:
        suffix = str(service.get("metadata", {}).get("name", "")).removeprefix(prefix)
        host = load_balancer_host(service)
        if suffix.isdigit() and host and naming.broker_external_service(cluster, int(suffix)) == prefix + suffix:
            found[int(suffix)] = host
    return found


def claim_size(claim: Mapping[str, Any]) -> str:
    return str(claim.get("spec", {}).get("resources", {}).get("requests", {}).get("storage", "0"))


def template_size(statefulset: Mapping[str, Any]) -> str | None:
    for template in statefulset.get("spec", {}).get("volumeClaimTemplates", []):
        if template.get("metadata", {}).get("name") == naming.DATA_VOLUME:
            return claim_size(template)
    return None


def plan_storage(desired_size: str, observed: Observed) -> StoragePlan:
    wanted = specs.parse_quantity(desired_size)
    small_claims = tuple(
        sorted(
            claim["metadata"]["name"]
            for claim in observed.claims
            if specs.parse_quantity(claim_size(claim)) < wanted
        )
    )
    current_template = (
        template_size(observed.statefulset) if observed.statefulset is not None else None
    )
    if current_template is None:
        if small_claims and observed.storage_expandable is False:
            return StoragePlan(
                claim_size=desired_size,
                stalled=_unexpandable(observed, desired_size, small_claims),
            )
        return StoragePlan(claim_size=desired_size, expand_claims=small_claims)
    if specs.parse_quantity(current_template) > wanted:
        message = (
            f"storage.size {desired_size} is smaller than the brokers' volumes "
            f"({current_template}); volumes cannot shrink, keeping {current_template}"
        )
        return StoragePlan(claim_size=current_template, stalled=Verdict("InvalidSpec", message))
    template_small = specs.parse_quantity(current_template) < wanted
    if not small_claims and not template_small:
        return StoragePlan(claim_size=desired_size)
    if observed.storage_expandable is False:
        return StoragePlan(
            claim_size=current_template,
            stalled=_unexpandable(observed, desired_size, small_claims),
        )
    events: list[Event] = []
    if small_claims:
        events.append(
            Event(
                "Normal",
                "ExpandingVolumes",
                f"Growing {', '.join(small_claims)} to {desired_size}",
            )
        )
    if template_small:
        events.append(
            Event(
                "Normal",
                "RecreatingStatefulSet",
                f"Re-creating the StatefulSet with {desired_size} claims; its pods keep running",
            )
        )
    return StoragePlan(
        claim_size=desired_size,
        expand_claims=small_claims,
        recreate_statefulset=template_small,
        progressing=Verdict("ResizingStorage", f"growing broker volumes to {desired_size}"),
        events=tuple(events),
    )


def _unexpandable(observed: Observed, desired_size: str, claims: Sequence[str]) -> Verdict:
    storage_class = observed.storage_class or "(default)"
    return Verdict(
        "StorageExpansionUnsupported",
        f"storage class {storage_class} does not allow volume expansion, so "
        f"{', '.join(claims) or 'the claims'} cannot grow to {desired_size}; the volumes keep "
        "their size",
    )


def pod_ready(pod: Mapping[str, Any]) -> bool:
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return False
    for condition in pod.get("status", {}).get("conditions", []) or []:
        if condition.get("type") == "Ready":
            return condition.get("status") == "True"
    return False


def pod_hash(pod: Mapping[str, Any]) -> str | None:
    annotations = pod.get("metadata", {}).get("annotations") or {}
    return annotations.get(naming.CONFIG_HASH_ANNOTATION)


def live_pods(
    pods: Sequence[Mapping[str, Any]], cluster: str, replicas: int
) -> list[Mapping[str, Any]]:
    """Broker pods that belong to the set's current size and are not being deleted."""
    found = []
    for pod in pods:
        ordinal = naming.ordinal_of(pod["metadata"]["name"], cluster)
        if ordinal is None or ordinal >= replicas:
            continue
        if pod["metadata"].get("deletionTimestamp"):
            continue
        found.append(pod)
    return sorted(found, key=lambda p: naming.ordinal_of(p["metadata"]["name"], cluster) or 0)


def statefulset_settled(statefulset: Mapping[str, Any] | None) -> bool:
    """The StatefulSet controller has seen the latest template (so new pods get it)."""
    if statefulset is None:
        return False
    generation = statefulset.get("metadata", {}).get("generation", 0)
    return statefulset.get("status", {}).get("observedGeneration", -1) >= generation


def plan_roll(
    cluster: str, replicas: int, config_hash: str, observed: Observed, statefulset_applied: bool
) -> RollPlan:
    """Pick at most one broker to restart onto ``config_hash``.

    ``statefulset_applied`` says the StatefulSet just applied carries ``config_hash``; until
    the controller has observed that generation a restarted pod could come back on the old
    template, so nothing is restarted yet.
    """
    if replicas == 0:
        return RollPlan()
    pods = live_pods(observed.pods, cluster, replicas)
    outdated = [pod for pod in pods if pod_hash(pod) != config_hash]
    if not outdated:
        return RollPlan()
    names = [pod["metadata"]["name"] for pod in outdated]
    waiting = Verdict(
        "RollingUpdate",
        f"{len(pods) - len(outdated)}/{replicas} broker(s) run the current configuration; "
        f"waiting to restart {', '.join(names)}",
    )
    if not statefulset_applied or not statefulset_settled(observed.statefulset):
        return RollPlan(progressing=waiting)
    broken = [pod for pod in outdated if not pod_ready(pod)]
    if broken:
        name = broken[-1]["metadata"]["name"]
        message = f"Replacing {name}: it is not Ready and runs an outdated configuration"
        return RollPlan(
            delete=name,
            progressing=Verdict("RollingUpdate", message),
            events=(Event("Warning", "ReplacingBroker", message),),
        )
    everyone_ready = len(pods) == replicas and all(pod_ready(pod) for pod in pods)
    if not everyone_ready:
        return RollPlan(progressing=waiting)
    name = outdated[-1]["metadata"]["name"]
    message = f"Restarting {name} onto configuration {config_hash} (one broker at a time)"
    return RollPlan(
        evict=name,
        progressing=Verdict("RollingUpdate", message),
        events=(Event("Normal", "RestartingBroker", message),),
    )


# Container states that do not fix themselves: a person has to change the spec (image, config).
FAILING_REASONS: Final = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CrashLoopBackOff",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)


def failing_brokers(
    pods: Sequence[Mapping[str, Any]], cluster: str, replicas: int
) -> Verdict | None:
    """Stalled/BrokerFailing when a broker's container is stuck in a state only a spec change
    fixes (the image cannot be pulled, the broker crash-loops). The roll stops there by itself,
    since it waits for every broker to be Ready; this says why, for kstatus and ArgoCD."""
    found = []
    for pod in live_pods(pods, cluster, replicas):
        for container in pod.get("status", {}).get("containerStatuses", []) or []:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in FAILING_REASONS:
                detail = f"{pod['metadata']['name']}: {waiting['reason']}"
                if waiting.get("message"):
                    detail += f" ({str(waiting['message'])[:200]})"
                found.append(detail)
    if not found:
        return None
    return Verdict("BrokerFailing", "; ".join(found) + "; fix the spec (image, config) to recover")
