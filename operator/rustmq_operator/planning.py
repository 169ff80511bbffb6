"""Decide what to change, from the spec and what the cluster looks like right now.

Every reconcile pass observes the real objects (StatefulSet, pods, claims) and calls these pure
functions to decide; nothing is remembered between passes except what the cluster itself shows,
so an operator restarted halfway through a roll or a resize carries on where reality is.

The rules, in the order a pass applies them:

* Scale (issue 14; the ConfigMaps are described in ``health``): scaling up grows the StatefulSet
  at once and adds each new broker to ``<cluster>-membership`` once its pod is Ready (the
  brokers' controller then moves replicas onto it). Scaling down drains the highest broker
  first: it leaves the membership, and only when a fresh health report that has seen that
  membership says it holds nothing does the StatefulSet shrink by one, then its claim is
  released per ``retentionPolicy.whenScaled``; one broker at a time. The drain's progress is
  kept in ``status.drain`` (only its start time is not derivable from the cluster), raising
  ``replicas`` again cancels it, and it is Stalled on ``scaling.drainTimeoutSeconds`` or when
  the remaining brokers cannot hold the largest replication factor. A StatefulSet resized by
  hand grows back at once, or is drained back. Zero hibernates without a drain, and waking
  brings every broker back before any drain. The spec is never written (that would fight
  kubectl and ArgoCD).
* Storage: a larger ``storage.size`` is written into each smaller claim (the storage driver
  grows the volume online), and since a StatefulSet's claim template is immutable the set is
  deleted with ``propagationPolicy: Orphan`` (its pods keep running) and re-created with the new
  template on the next pass. Sizes are compared with the actual claims, not the template, so a
  resize interrupted at any step completes. A storage class that cannot expand gives
  Stalled/StorageExpansionUnsupported and nothing is touched.
* Roll: the StatefulSet uses ``OnDelete``; a broker whose pod carries an outdated config hash is
  evicted (the Eviction API honours the PodDisruptionBudget) only while every other broker is
  Ready, one per pass, after a controlled shutdown (``plan_roll``). A broker stuck on an
  outdated revision and not Ready is already down, so it is replaced at once: that is how a bad
  image is recovered from once the spec is fixed.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from typing import Any, Final

from rustmq_operator import health, naming
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
    membership: Mapping[str, Any] | None = None  # the ConfigMap <cluster>-membership
    health: Mapping[str, Any] | None = None  # the ConfigMap <cluster>-health


@dataclasses.dataclass(frozen=True)
class ScalePlan:
    replicas: int
    last_non_zero: int | None
    # The brokers that should hold data (``<cluster>-membership`` ``brokers``); None: leave the
    # ConfigMap as it is (no broker has been Ready yet, so there is nothing to say).
    members: tuple[int, ...] | None = None
    drain: Mapping[str, Any] | None = None  # status.drain
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
    shutdown: int | None = None  # the membership's ``shutdown`` after this pass
    handover: Mapping[str, Any] | None = None  # status.handover: a controlled shutdown waited for
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


def ready_ordinals(observed: Observed, cluster: str) -> set[int]:
    found = set()
    for pod in observed.pods:
        ordinal = naming.ordinal_of(pod["metadata"]["name"], cluster)
        if ordinal is not None and pod_ready(pod):
            found.add(ordinal)
    return found


def pod_ordinals(observed: Observed, cluster: str) -> set[int]:
    """Ordinals of every broker pod that exists, terminating ones included."""
    found = {naming.ordinal_of(pod["metadata"]["name"], cluster) for pod in observed.pods}
    return {ordinal for ordinal in found if ordinal is not None}


def _elapsed_s(started: str, now: datetime.datetime) -> float:
    try:
        return (now - health.parse_time(started)).total_seconds()
    except ValueError:
        return 0.0


def _stamp(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def plan_scale(
    cluster: str,
    spec: Mapping[str, Any],
    observed: Observed,
    last_non_zero: int | None,
    *,
    report: health.Report,
    membership: health.Membership | None,
    previous_drain: Mapping[str, Any] | None,
    now: datetime.datetime,
) -> ScalePlan:
    """Size of the StatefulSet and the membership for this pass, draining one broker at a time.

    Scale-down: the highest broker leaves ``members``; once a fresh health report that has
    seen that membership says it holds nothing, the StatefulSet shrinks by one (the next pass
    releases its claim, see ``claims_to_release``, and starts on the next broker). Raising
    ``replicas`` again puts it back (cancelled). Scale-up: the StatefulSet grows at once and
    each new broker joins ``members`` once its pod is Ready. Zero hibernates without a drain.
    """
    desired = int(spec["replicas"])
    current = current_replicas(observed, cluster)
    if current is None:
        return ScalePlan(replicas=desired, last_non_zero=desired or last_non_zero)
    events: list[Event] = []
    if observed.statefulset is not None and last_non_zero and current not in (0, last_non_zero):
        if current < last_non_zero:
            # Shrunk by hand: the removed brokers' claims still hold their data; grow back.
            events.append(Event(
                "Warning",
                "StatefulSetResized",
                f"the StatefulSet was resized outside the operator to {current}; restoring "
                f"{last_non_zero} (scale the RustMQCluster instead, e.g. kubectl scale rmq/{cluster})",
            ))
            current = last_non_zero
        else:
            # Grown by hand: the extra brokers may already hold data, so they leave the way any
            # broker leaves, through a drain (below), never by deleting them.
            events.append(Event(
                "Warning",
                "StatefulSetResized",
                f"the StatefulSet was resized outside the operator to {current}; draining back "
                f"to {max(desired, 1)} broker(s) (scale the RustMQCluster instead, e.g. kubectl "
                f"scale rmq/{cluster})",
            ))
            last_non_zero = current
    base = set(membership.brokers) if membership is not None else set()
    ready = ready_ordinals(observed, cluster)
    drain_broker = previous_drain.get("broker") if previous_drain else None

    def joined(limit: int, restore: bool) -> tuple[int, ...] | None:
        found = base | {ordinal for ordinal in ready if ordinal < limit}
        if restore and isinstance(drain_broker, int) and drain_broker < current:
            found.add(drain_broker)  # a cancelled drain: the broker holds data again
        if membership is None and not found:
            return None
        return tuple(sorted(found))

    cancelled: tuple[Event, ...] = ()
    if previous_drain and (desired >= current or desired == 0):
        cancelled = (Event(
            "Normal",
            "DrainCancelled",
            f"replicas is {desired} again: {naming.pod(cluster, int(drain_broker or 0))} stays "
            "and takes data again",
        ),) if isinstance(drain_broker, int) and drain_broker < current else ()

    if desired == 0:
        if current > 0:
            message = f"Hibernating: stopping {current} broker(s); their volumes are kept"
            events.append(Event("Normal", "Hibernating", message))
        return ScalePlan(
            replicas=0,
            last_non_zero=max(last_non_zero or 0, current) or None,
            members=joined(0, restore=True),
            events=tuple(events) + cancelled,
        )
    if current == 0:
        # Waking up: every broker that held data comes back first; a smaller size is then
        # reached by draining, like any scale-down.
        size = max(desired, last_non_zero or 0)
        message = f"Waking up with {size} broker(s)"
        return ScalePlan(
            replicas=size,
            last_non_zero=size,
            members=joined(size, restore=False),
            progressing=Verdict("ScalingUp", message),
            events=(*events, Event("Normal", "ScalingUp", message)),
        )
    if desired >= current:
        members = joined(desired, restore=True)
        progressing = None
        if desired > current:
            message = f"Scaling up from {current} to {desired} broker(s)"
            events.append(Event("Normal", "ScalingUp", message))
            progressing = Verdict("ScalingUp", message)
        else:
            fresh = report.fresh
            if fresh is not None and fresh.reassigning:
                progressing = Verdict(
                    "Rebalancing",
                    f"the brokers are moving {fresh.reassigning} partition replica(s) "
                    f"({fresh.bytes_to_move} bytes left to copy)",
                )
            elif fresh is not None and membership is not None and (
                    members not in (None, membership.brokers) or fresh.observed_generation < membership.generation):
                # A broker just joined: until the controller's report has seen the membership
                # that names it, "nothing moving" is a report from before it joined.
                progressing = Verdict(
                    "Rebalancing",
                    f"waiting for the brokers' controller to act on membership generation "
                    f"{membership.generation + (members != membership.brokers)}",
                )
        return ScalePlan(
            replicas=desired,
            last_non_zero=desired,
            members=members,
            progressing=progressing,
            events=tuple(events) + cancelled,
        )
    return _plan_drain(
        cluster, spec, current, desired, base, ready, membership, report, previous_drain, now,
        tuple(events),
    )


def _plan_drain(
    cluster: str,
    spec: Mapping[str, Any],
    current: int,
    desired: int,
    base: set[int],
    ready: set[int],
    membership: health.Membership | None,
    report: health.Report,
    previous_drain: Mapping[str, Any] | None,
    now: datetime.datetime,
    events: tuple[Event, ...],
) -> ScalePlan:
    leaving = current - 1
    pod = naming.pod(cluster, leaving)
    keep = base | {ordinal for ordinal in ready if ordinal < desired}
    target = tuple(sorted(keep - {leaving}))
    same = previous_drain is not None and previous_drain.get("broker") == leaving
    started_at = str((previous_drain or {}).get("startedAt") or "") if same else ""
    started_at = started_at or _stamp(now)
    started = membership is not None and leaving not in base  # the controller was told
    fresh = report.fresh
    new_events: list[Event] = list(events)
    if not same:
        new_events.append(Event(
            "Normal",
            "Draining",
            f"Draining {pod} (scaling down from {current} to {desired} broker(s)): its partition "
            "replicas move to the remaining brokers before it is removed",
        ))
    drain: dict[str, Any] = {"broker": leaving, "phase": "Draining", "startedAt": started_at}
    if fresh is not None:
        drain["partitionsLeft"] = fresh.replicas_of(leaving)
        drain["bytesLeft"] = fresh.bytes_to_move
    timeout = int(spec["scaling"]["drainTimeoutSeconds"])
    elapsed = _elapsed_s(started_at, now)
    restored = tuple(sorted(keep | ({leaving} if leaving in base or started else set())))

    if fresh is None and not started:
        # Nothing has changed yet; without a report the removal could not be confirmed.
        waiting = Verdict("Draining", f"waiting to drain {pod}: {report.problem}")
        stalled = None
        if elapsed > timeout:
            stalled = Verdict("DrainTimedOut", f"{pod} could not be drained in {timeout} s: {report.problem}")
        return ScalePlan(
            replicas=current,
            last_non_zero=current,
            members=restored if membership is not None else None,
            drain={**drain, "phase": "Pending"},
            stalled=stalled,
            progressing=waiting,
            events=tuple(new_events),
        )
    if fresh is not None and len(target) < fresh.max_replication_factor and (leaving in base or started):
        message = (
            f"cannot drain {pod}: {len(target)} broker(s) would remain, but a topic has "
            f"replication factor {fresh.max_replication_factor}; keep at least "
            f"{fresh.max_replication_factor} replicas (or lower the topics' replication factor)"
        )
        return ScalePlan(
            replicas=current,
            last_non_zero=current,
            members=restored,
            stalled=Verdict("InsufficientBrokers", message),
            events=events,
        )
    drained = (
        membership is not None
        and membership.brokers == target
        and fresh is not None
        and fresh.observed_generation >= membership.generation
        and fresh.holds_nothing(leaving)
    )
    if drained:
        message = f"{pod} holds no partition replica; shrinking the StatefulSet to {current - 1}"
        return ScalePlan(
            replicas=current - 1,
            last_non_zero=current - 1,
            members=target,
            drain={**drain, "phase": "Shrinking", "partitionsLeft": 0},
            progressing=Verdict("Draining", message),
            events=(*new_events, Event("Normal", "BrokerDrained", message)),
        )
    if fresh is None:
        detail = str(report.problem)
    elif membership is None or membership.brokers != target or fresh.observed_generation < membership.generation:
        detail = "waiting for the brokers' controller to see the new membership"
    else:
        detail = (
            f"{fresh.replicas_of(leaving)} partition replica(s) left on it, "
            f"{fresh.bytes_to_move} byte(s) still to copy"
        )
    message = f"draining {pod} (to reach {desired} broker(s)): {detail}"
    stalled = None
    if elapsed > timeout:
        stalled = Verdict(
            "DrainTimedOut",
            f"the drain of {pod} has not finished in {timeout} s (scaling.drainTimeoutSeconds): "
            f"{detail}; it goes on, and setting replicas back to {current} cancels it",
        )
    return ScalePlan(
        replicas=current,
        last_non_zero=current,
        members=target,
        drain=drain,
        stalled=stalled,
        progressing=Verdict("Draining", message),
        events=tuple(new_events),
    )


def claims_to_release(
    cluster: str,
    spec: Mapping[str, Any],
    observed: Observed,
    replicas: int,
    members: tuple[int, ...] | None,
    report: health.Report,
) -> tuple[str, ...]:
    """Claims of drained brokers that ``retentionPolicy.whenScaled`` (Drain, Delete) deletes.

    Only a claim beyond the StatefulSet's size, of a broker that is not a member, whose pod is
    gone, and that a fresh health report shows holding nothing; never while hibernated
    (``replicas`` 0), whose claims hold the data the cluster wakes up with."""
    if spec["storage"]["retentionPolicy"]["whenScaled"] not in ("Drain", "Delete") or replicas == 0:
        return ()
    fresh = report.fresh
    if fresh is None:
        return ()
    running = pod_ordinals(observed, cluster)
    found = []
    for claim in observed.claims:
        name = claim["metadata"]["name"]
        ordinal = naming.ordinal_of(name, f"{naming.DATA_VOLUME}-{cluster}")
        if ordinal is None or ordinal < replicas or ordinal in running:
            continue
        if ordinal in (members or ()) or not fresh.holds_nothing(ordinal):
            continue
        found.append(name)
    return tuple(sorted(found))


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
    cluster: str,
    replicas: int,
    config_hash: str,
    observed: Observed,
    statefulset_applied: bool,
    *,
    report: health.Report | None = None,
    membership: health.Membership | None = None,
    draining: bool = False,
    previous_handover: Mapping[str, Any] | None = None,
    handover_timeout_s: float = 120.0,
    now: datetime.datetime | None = None,
) -> RollPlan:
    """Pick at most one broker to restart onto ``config_hash``, with a controlled shutdown.

    ``statefulset_applied`` says the StatefulSet just applied carries ``config_hash``; until
    the controller has observed that generation a restarted pod could come back on the old
    template, so nothing is restarted yet.

    With a health report (``<cluster>-health`` exists) a healthy broker is restarted in three
    steps over several passes: ``shutdown: <id>`` is written into the membership, then, once a
    fresh report that saw it shows the broker leading nothing and no partition
    under-replicated, the pod is evicted; ``shutdown`` is cleared once the restarted pod is
    Ready and no partition is under-replicated, and only then is the next broker picked.
    Without any report (brokers that do not publish one) the roll is gated by readiness and
    the PodDisruptionBudget alone. A drain in progress holds the roll.

    Leaderships with no in-sync follower (a partition of replication factor 1, a single-broker
    cluster) cannot be handed over: a one-broker cluster is restarted without asking, and
    otherwise the hand-over is given ``handover_timeout_s`` from ``status.handover.startedAt``
    before the broker is evicted anyway (Warning ControlledShutdownTimedOut).
    """
    shutdown = membership.shutdown if membership is not None else None
    fresh = report.fresh if report is not None else None
    with_health = observed.health is not None
    pods = live_pods(observed.pods, cluster, replicas)
    by_ordinal = {naming.ordinal_of(pod["metadata"]["name"], cluster): pod for pod in pods}
    if shutdown is not None:
        restarting = by_ordinal.get(shutdown)
        if shutdown >= replicas:
            shutdown = None  # its broker was removed
        elif restarting is not None and pod_hash(restarting) == config_hash:
            caught_up = fresh is not None and fresh.under_replicated == 0
            if pod_ready(restarting) and (caught_up or not with_health):
                shutdown = None
            else:
                name = restarting["metadata"]["name"]
                why = "to be Ready" if not pod_ready(restarting) else (
                    f"to catch up ({fresh.under_replicated} partition(s) under-replicated)"
                    if fresh is not None
                    else f"a fresh health report ({report.problem if report else ''})"
                )
                return RollPlan(
                    shutdown=shutdown,
                    progressing=Verdict("RollingUpdate", f"restarted {name}; waiting for it {why}"),
                )
        elif draining:
            shutdown = None  # the drain comes first; the roll picks this broker again later
    if replicas == 0 or draining:
        return RollPlan(shutdown=shutdown)
    outdated = [pod for pod in pods if pod_hash(pod) != config_hash]
    if not outdated:
        return RollPlan(shutdown=shutdown)
    names = [pod["metadata"]["name"] for pod in outdated]
    waiting = Verdict(
        "RollingUpdate",
        f"{len(pods) - len(outdated)}/{replicas} broker(s) run the current configuration; "
        f"waiting to restart {', '.join(names)}",
    )
    if not statefulset_applied or not statefulset_settled(observed.statefulset):
        return RollPlan(progressing=waiting, shutdown=shutdown)
    broken = [pod for pod in outdated if not pod_ready(pod)]
    if broken:
        name = broken[-1]["metadata"]["name"]
        message = f"Replacing {name}: it is not Ready and runs an outdated configuration"
        return RollPlan(
            delete=name,
            shutdown=shutdown,
            progressing=Verdict("RollingUpdate", message),
            events=(Event("Warning", "ReplacingBroker", message),),
        )
    everyone_ready = len(pods) == replicas and all(pod_ready(pod) for pod in pods)
    if not everyone_ready:
        return RollPlan(progressing=waiting, shutdown=shutdown)
    candidate = outdated[-1]
    name = candidate["metadata"]["name"]
    ordinal = naming.ordinal_of(name, cluster)
    message = f"Restarting {name} onto configuration {config_hash} (one broker at a time)"
    restart = RollPlan(
        evict=name,
        shutdown=shutdown,
        progressing=Verdict("RollingUpdate", message),
        events=(Event("Normal", "RestartingBroker", message),),
    )
    if not with_health or membership is None or replicas == 1:
        return restart
    if fresh is None:
        return RollPlan(
            shutdown=shutdown,
            progressing=Verdict("RollingUpdate", f"waiting to restart {name}: {report.problem if report else ''}"),
        )
    if fresh.under_replicated:
        return RollPlan(
            shutdown=shutdown,
            progressing=Verdict(
                "RollingUpdate",
                f"waiting to restart {name}: {fresh.under_replicated} partition(s) are under-replicated",
            ),
        )
    if membership.shutdown != ordinal:
        return RollPlan(
            shutdown=ordinal,
            progressing=Verdict("RollingUpdate", f"moving the leaderships of {name} to in-sync followers"),
            events=(Event("Normal", "ControlledShutdown", f"moving the leaderships of {name} away before restarting it"),),
        )
    if fresh.observed_generation < membership.generation or fresh.leaders_of(ordinal or 0):
        moment = now or datetime.datetime.now(datetime.UTC)
        same = previous_handover is not None and previous_handover.get("broker") == ordinal
        started = str((previous_handover or {}).get("startedAt") or "") if same else ""
        started = started or _stamp(moment)
        left = fresh.leaders_of(ordinal or 0)
        if _elapsed_s(started, moment) > handover_timeout_s:
            message = (
                f"{name} still leads {left} partition(s) {handover_timeout_s:.0f} s after the controlled "
                "shutdown was asked for (no in-sync follower to take them, e.g. replication factor 1); "
                "restarting it anyway: those partitions are offline until it is back"
            )
            return dataclasses.replace(
                restart, events=(Event("Warning", "ControlledShutdownTimedOut", message), *restart.events)
            )
        return RollPlan(
            shutdown=shutdown,
            handover={"broker": ordinal, "startedAt": started},
            progressing=Verdict(
                "RollingUpdate",
                f"waiting for {name} to hand over its leaderships ({left} left)",
            ),
        )
    return restart


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
