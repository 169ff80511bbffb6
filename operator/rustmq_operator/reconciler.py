"""One level-based reconcile pass for one RustMQCluster: observe, decide, act, report.

A pass reads the CR and its children, lets ``planning`` decide (scale, storage, roll), renders
the children with the decisions, server-side applies them under one field manager (which also
restores anything edited or deleted by hand), prunes children the spec no longer asks for,
performs at most one disruptive action, and writes the status only if it changed. It remembers
nothing between passes: the next pass starts again from what the cluster shows, so a restart
of the operator, a lost watch event or a failed call costs one pass and no duplicate work.

The caller (``handlers``) runs passes from a work queue and schedules the next one after the
delay ``reconcile`` returns.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

from rustmq_operator import health, k8s, naming, planning, rendering
from rustmq_operator import spec as specs
from rustmq_operator import status as statuses

logger = logging.getLogger(__name__)

RESYNC_SECONDS: Final = 30.0  # drift check even when no watch event arrives
PROGRESS_SECONDS: Final = 2.0  # while converging
STALLED_SECONDS: Final = 15.0
# While the brokers publish a health report: the report is rewritten at least every 10 s and its
# ConfigMap is not watched (it is the brokers', not the operator's), so Available and Degraded
# follow it within this delay; and a report that stops changing turns stale by time alone.
HEALTH_SECONDS: Final = 10.0

# Kinds the operator prunes when the spec stops asking for them (never the StatefulSet or claims);
# _OPTIONAL_KINDS only where their CRD is served.
_PRUNABLE: Final = (
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("policy/v1", "PodDisruptionBudget"),
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
)
_OPTIONAL_KINDS: Final = (
    ("monitoring.coreos.com/v1", "ServiceMonitor", "servicemonitors"),
    ("monitoring.coreos.com/v1", "PrometheusRule", "prometheusrules"),
    ("cert-manager.io/v1", "Certificate", "certificates"),
)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a pass did, for logs and tests."""

    requeue_after: float | None  # None: the CR is gone, forget it
    applied: tuple[str, ...] = ()
    pruned: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()
    status_written: bool = False
    conditions: tuple[tuple[str, bool], ...] = ()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def observe(kube: k8s.Kube, namespace: str, name: str, spec: Mapping[str, Any]) -> planning.Observed:
    selector = naming.selector_labels(name)
    statefulset = kube.get("apps/v1", "StatefulSet", namespace, naming.statefulset(name))
    pods = [
        pod
        for pod in kube.list("v1", "Pod", namespace, selector)
        if naming.ordinal_of(pod["metadata"]["name"], name) is not None
    ]
    claim_prefix = f"{naming.DATA_VOLUME}-{name}-"
    claims = [
        claim
        for claim in kube.list("v1", "PersistentVolumeClaim", namespace, selector)
        if claim["metadata"]["name"].startswith(claim_prefix)
    ]
    external = None
    broker_services: list[dict[str, Any]] = []
    if spec["services"]["external"]["enabled"]:
        external = kube.get("v1", "Service", namespace, naming.external_service(name))
        if spec["services"]["external"]["perBroker"]["enabled"]:
            broker_services = [
                service
                for service in kube.list("v1", "Service", namespace, selector)
                if naming.BROKER_LABEL in (service["metadata"].get("labels") or {})
            ]
    storage_class, expandable = None, None
    wanted = specs.parse_quantity(spec["storage"]["size"])
    template = planning.template_size(statefulset) if statefulset else None
    needs_growth = any(
        specs.parse_quantity(planning.claim_size(claim)) < wanted for claim in claims
    ) or (template is not None and specs.parse_quantity(template) < wanted)
    if needs_growth:
        class_name = next(
            (c["spec"].get("storageClassName") for c in claims if c["spec"].get("storageClassName")),
            spec["storage"].get("storageClassName"),
        )
        storage_class, expandable = kube.storage_class_expandable(class_name)
    membership = kube.get("v1", "ConfigMap", namespace, health.membership_name(name))
    health_map = kube.get("v1", "ConfigMap", namespace, health.health_name(name))
    monitoring_api = kube.served("monitoring.coreos.com/v1")
    # Always asked, so that a Certificate is pruned once the spec stops asking for it.
    certificate_crd = "certificates" in kube.served("cert-manager.io/v1")
    return planning.Observed(
        statefulset=statefulset,
        pods=pods,
        claims=claims,
        external_service=external,
        broker_services=broker_services,
        storage_expandable=expandable,
        storage_class=storage_class,
        service_monitor_crd="servicemonitors" in monitoring_api,
        prometheus_rule_crd="prometheusrules" in monitoring_api,
        certificate_crd=certificate_crd,
        membership=membership,
        health=health_map,
    )


def monitoring_verdict(spec: Mapping[str, Any], observed: planning.Observed) -> planning.Verdict | None:
    if not spec["monitoring"]["serviceMonitor"]["enabled"]:
        return planning.Verdict("Disabled", "monitoring.serviceMonitor.enabled is false")
    if not observed.service_monitor_crd:
        return planning.Verdict(
            "ServiceMonitorCRDMissing",
            "the ServiceMonitor CRD (monitoring.coreos.com/v1) is not installed; the "
            "ServiceMonitor is created as soon as the Prometheus Operator's CRDs are",
        )
    return None


def certificate_verdict(spec: Mapping[str, Any], observed: planning.Observed) -> planning.Verdict | None:
    """spec.tls.certManager without cert-manager: the Secret would never be written."""
    if spec["tls"]["enabled"] and spec["tls"].get("certManager") and not observed.certificate_crd:
        return planning.Verdict(
            "CertManagerMissing",
            "spec.tls.certManager asks cert-manager for the certificate, but its Certificate CRD "
            "(cert-manager.io/v1) is not installed; install cert-manager or provide the Secret "
            "yourself and drop tls.certManager",
        )
    return None


def reconcile(
    kube: k8s.Kube,
    namespace: str,
    name: str,
    *,
    now: Callable[[], str] = _now,
) -> Outcome:
    cr = kube.get(specs.API_VERSION, specs.KIND, namespace, name)
    if cr is None or cr["metadata"].get("deletionTimestamp"):
        # Children carry owner references: the garbage collector removes them; the claims,
        # created by the StatefulSet controller and not owned by the CR, stay.
        return Outcome(requeue_after=None)
    metadata = cr["metadata"]
    spec = specs.with_defaults(cr.get("spec"))
    previous = cr.get("status") or {}
    generation = int(metadata.get("generation", 0))
    paused = specs.is_paused(metadata)
    observed = observe(kube, namespace, name, spec)
    stamp = now()
    moment = health.parse_time(stamp)
    membership = health.parse_membership(observed.membership)
    report = health.parse_health(observed.health, moment, health.stale_after_s(spec))

    invalid = specs.problems(spec)
    scale = planning.plan_scale(
        name,
        spec,
        observed,
        previous.get("lastNonZeroReplicas"),
        report=report,
        membership=membership,
        previous_drain=previous.get("drain"),
        now=moment,
    )
    storage = planning.plan_storage(spec["storage"]["size"], observed)
    monitoring = monitoring_verdict(spec, observed)
    stalled = (
        planning.Verdict("InvalidSpec", "; ".join(invalid))
        if invalid
        else scale.stalled
        or storage.stalled
        or certificate_verdict(spec, observed)
        or planning.failing_brokers(observed.pods, name, scale.replicas)
    )
    progressing = storage.progressing or scale.progressing

    target = rendering.Target(
        name=name,
        namespace=namespace,
        uid=metadata["uid"],
        spec=spec,
        replicas=scale.replicas,
        claim_size=storage.claim_size,
        service_monitor=spec["monitoring"]["serviceMonitor"]["enabled"] and observed.service_monitor_crd,
        prometheus_rule=spec["monitoring"]["prometheusRule"]["enabled"] and observed.prometheus_rule_crd,
        listener_hosts=planning.listener_hosts(name, observed.broker_services),
        certificate=bool(spec["tls"]["enabled"] and spec["tls"].get("certManager") and observed.certificate_crd),
    )
    rendered: rendering.Rendered | None = None
    if not invalid:
        try:
            rendered = rendering.render(target)
        except rendering.RenderError as error:
            stalled = planning.Verdict("RenderFailed", str(error))

    applied: list[str] = []
    pruned: list[str] = []
    actions: list[str] = []
    events: list[planning.Event] = []
    config_hash = rendered.config_hash if rendered else str(previous.get("configHash", ""))
    members_written = membership.brokers if membership is not None else None
    handover: Mapping[str, Any] | None = None

    acting = rendered is not None and not paused and not invalid
    applied_statefulset: dict[str, Any] | None = None
    if acting:
        assert rendered is not None
        events.extend(scale.events)
        events.extend(storage.events)
        for claim in storage.expand_claims:
            kube.resize_claim(namespace, claim, storage.claim_size)
            actions.append(f"expand {claim}")
        for obj in rendered.objects:
            if obj["kind"] == "StatefulSet" and storage.recreate_statefulset:
                continue
            try:
                result = _apply(kube, obj)
            except k8s.KubeError as error:
                if error.status not in (400, 403, 409, 422):
                    raise
                stalled = planning.Verdict(
                    "ApplyFailed", f"{obj['kind']} {obj['metadata']['name']}: {error.message}"
                )
                continue
            applied.append(f"{obj['kind']}/{obj['metadata']['name']}")
            if obj["kind"] == "StatefulSet":
                applied_statefulset = result
        if storage.recreate_statefulset and observed.statefulset is not None:
            kube.delete(
                "apps/v1",
                "StatefulSet",
                namespace,
                naming.statefulset(name),
                propagation="Orphan",
                uid=observed.statefulset["metadata"]["uid"],
            )
            actions.append("orphan-delete StatefulSet")
        pruned = _prune(kube, namespace, name, metadata["uid"], rendered, observed)
        if not storage.recreate_statefulset:
            live = dataclasses.replace(observed, statefulset=applied_statefulset or observed.statefulset)
            roll = planning.plan_roll(
                name,
                scale.replicas,
                rendered.config_hash,
                live,
                applied_statefulset is not None,
                report=report,
                membership=membership,
                draining=scale.drain is not None,
                previous_handover=previous.get("handover"),
                handover_timeout_s=float(spec["scaling"]["handoverTimeoutSeconds"]),
                now=moment,
            )
            handover = roll.handover
            progressing = progressing or roll.progressing
            wanted = _membership_wanted(membership, scale.members, roll.shutdown)
            if wanted is not None:
                try:
                    kube.apply(_membership_object(namespace, name, metadata["uid"], wanted))
                except k8s.KubeError as error:
                    if error.status != 409:
                        raise
                    # Changed since this pass read it (another operator replica, a hand edit):
                    # the next pass decides again from what it holds.
                    logger.warning("%s/%s: membership changed meanwhile: %s", namespace, name, error.message)
                    roll = dataclasses.replace(roll, evict=None, delete=None)
                else:
                    members_written = wanted.brokers
                    actions.append(
                        f"membership brokers={','.join(map(str, wanted.brokers))} "
                        f"shutdown={'' if wanted.shutdown is None else wanted.shutdown} "
                        f"generation={wanted.generation}"
                    )
                    # A new shutdown must be acted on by the controller before any eviction.
                    if membership is None or wanted.shutdown != membership.shutdown:
                        roll = dataclasses.replace(roll, evict=None)
                        if wanted.shutdown is not None:
                            events.extend(roll.events)
            if applied_statefulset is not None:
                claims = {claim["metadata"]["name"]: claim for claim in observed.claims}
                for claim_name in planning.claims_to_release(
                    name, spec, observed, scale.replicas, members_written, report
                ):
                    kube.delete(
                        "v1",
                        "PersistentVolumeClaim",
                        namespace,
                        claim_name,
                        uid=claims[claim_name]["metadata"]["uid"],
                    )
                    actions.append(f"delete claim {claim_name}")
                    events.append(planning.Event(
                        "Normal",
                        "ReleasedClaim",
                        f"deleted {claim_name} of a drained broker "
                        f"(retentionPolicy.whenScaled {spec['storage']['retentionPolicy']['whenScaled']})",
                    ))
            if roll.delete is not None:
                kube.delete("v1", "Pod", namespace, roll.delete)
                actions.append(f"delete pod {roll.delete}")
                events.extend(roll.events)
            elif roll.evict is not None:
                if kube.evict(namespace, roll.evict):
                    actions.append(f"evict pod {roll.evict}")
                    events.extend(roll.events)
                else:
                    progressing = planning.Verdict(
                        "RollingUpdate",
                        f"the PodDisruptionBudget does not allow restarting {roll.evict} yet",
                    )

    inputs = statuses.Inputs(
        name=name,
        namespace=namespace,
        generation=generation,
        spec=spec,
        # What the StatefulSet was told this pass; while paused or refused, what it already runs.
        replicas=scale.replicas
        if applied_statefulset is not None
        else (planning.current_replicas(observed, name) or 0),
        config_hash=config_hash,
        claim_size=storage.claim_size,
        # Remembered only once the StatefulSet carries it, so that a refused or failed apply
        # never makes the StatefulSet's real size look like a hand edit on the next pass.
        last_non_zero=scale.last_non_zero
        if applied_statefulset is not None
        else previous.get("lastNonZeroReplicas"),
        observed=observed,
        paused=paused,
        stalled=stalled,
        progressing=progressing,
        monitoring=monitoring,
        report=report,
        drain=scale.drain if acting else previous.get("drain"),
        handover=handover if acting else previous.get("handover"),
        members=members_written,
    )
    new_status = statuses.compute(inputs, previous, stamp)
    patch = statuses.merge_patch(previous, new_status)
    if stalled is not None and stalled.reason not in statuses.stalled_reasons(previous):
        events.append(planning.Event("Warning", stalled.reason, stalled.message))
    degraded = statuses.condition(new_status, "Degraded") or {}
    before = statuses.condition(previous, "Degraded") or {}
    if degraded.get("status") == "True" and (
        before.get("status") != "True" or before.get("reason") != degraded.get("reason")
    ):
        events.append(planning.Event("Warning", str(degraded["reason"]), str(degraded.get("message", ""))))
    for event in events:
        kube.post_event(cr, event.type, event.reason, event.message)
    if patch:
        kube.patch_status(namespace, name, patch)
    if actions:
        logger.info("%s/%s: %s", namespace, name, "; ".join(actions))
    ready = statuses.condition(new_status, "Ready") or {}
    if stalled is not None:
        delay = STALLED_SECONDS
    elif ready.get("status") != "True" and not paused:
        delay = PROGRESS_SECONDS
    else:
        delay = RESYNC_SECONDS
    if observed.health is not None:
        delay = min(delay, HEALTH_SECONDS)
    return Outcome(
        requeue_after=delay,
        applied=tuple(applied),
        pruned=tuple(pruned),
        actions=tuple(actions),
        status_written=bool(patch),
        conditions=tuple(
            (str(found["type"]), found["status"] == "True") for found in new_status["conditions"]
        ),
    )


def _membership_wanted(
    membership: health.Membership | None, members: tuple[int, ...] | None, shutdown: int | None
) -> health.Membership | None:
    """The membership to write this pass (generation + 1), or None when nothing changes."""
    if members is None and membership is None:
        return None
    brokers = members if members is not None else membership.brokers if membership is not None else ()
    if membership is not None and membership.brokers == brokers and membership.shutdown == shutdown:
        return None
    generation = (membership.generation if membership is not None else 0) + 1
    return health.Membership(
        brokers=brokers,
        shutdown=shutdown,
        generation=generation,
        resource_version=membership.resource_version if membership is not None else None,
    )


def _membership_object(namespace: str, name: str, uid: str, wanted: health.Membership) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": health.membership_name(name),
        "namespace": namespace,
        "labels": naming.labels(name),
        "ownerReferences": [
            {
                "apiVersion": specs.API_VERSION,
                "kind": specs.KIND,
                "name": name,
                "uid": uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    if wanted.resource_version:
        # Server-side apply with a resourceVersion is a compare-and-swap: 409 if it changed.
        metadata["resourceVersion"] = wanted.resource_version
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": wanted.data()}


def _apply(kube: k8s.Kube, obj: Mapping[str, Any]) -> dict[str, Any]:
    """Server-side apply; if a hand edit left clashing list entries (422), reset the edited
    spec with a merge patch and apply again. The StatefulSet is never reset this way: its
    422s are immutable fields, which the caller reports as Stalled."""
    try:
        return kube.apply(obj)
    except k8s.KubeError as error:
        if error.status != 422 or obj["kind"] == "StatefulSet":
            raise
        logger.warning(
            "%s %s/%s: apply refused (%s); resetting its spec",
            obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"], error.message,
        )
        kube.replace_spec(obj)
        return kube.apply(obj)


def _prune(
    kube: k8s.Kube,
    namespace: str,
    name: str,
    owner_uid: str,
    rendered: rendering.Rendered,
    observed: planning.Observed,
) -> list[str]:
    wanted = {(obj["kind"], obj["metadata"]["name"]) for obj in rendered.objects}
    # Written by the pass itself, not rendered: never pruned while the cluster exists.
    wanted.add(("ConfigMap", health.membership_name(name)))
    selector = {naming.CLUSTER_LABEL: name, "app.kubernetes.io/managed-by": naming.MANAGED_BY}
    kinds = list(_PRUNABLE)
    served = {
        "servicemonitors": observed.service_monitor_crd,
        "prometheusrules": observed.prometheus_rule_crd,
        "certificates": observed.certificate_crd,
    }
    for api_version, kind, plural in _OPTIONAL_KINDS:
        if served[plural]:
            kinds.append((api_version, kind))
    removed: list[str] = []
    for api_version, kind in kinds:
        for obj in kube.list(api_version, kind, namespace, selector):
            meta = obj["metadata"]
            owned = any(ref.get("uid") == owner_uid for ref in meta.get("ownerReferences") or [])
            if owned and (kind, meta["name"]) not in wanted:
                kube.delete(api_version, kind, namespace, meta["name"], uid=meta["uid"])
                removed.append(f"{kind}/{meta['name']}")
    return removed
