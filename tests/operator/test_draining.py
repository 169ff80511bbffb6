"""The drain and controlled-shutdown state machine (planning.plan_scale, plan_roll,
claims_to_release) as pure functions: every transition, resuming after an operator restart,
cancelling, and the stalls. The brokers' controller is played by a few lines of test code that
rewrite the health report from the membership (the real controller is tested in tests/cluster,
and both together in tests/e2e/test_operator_brokers.py)."""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any

from rustmq_operator import health, naming, planning
from rustmq_operator import spec as specs

T0 = datetime.datetime(2026, 12, 6, 7, 0, 0, tzinfo=datetime.UTC)


def pod(ordinal: int, *, ready: bool = True, config_hash: str = "h1") -> dict[str, Any]:
    return {
        "metadata": {"name": naming.pod("rustmq", ordinal), "annotations": {naming.CONFIG_HASH_ANNOTATION: config_hash}},
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def statefulset(replicas: int) -> dict[str, Any]:
    return {
        "metadata": {"name": "rustmq", "uid": "sts-uid", "generation": 4},
        "spec": {"replicas": replicas},
        "status": {"observedGeneration": 4},
    }


def claim(ordinal: int) -> dict[str, Any]:
    return {"metadata": {"name": naming.claim("rustmq", ordinal), "uid": f"claim-{ordinal}"}, "spec": {}}


def membership(brokers: tuple[int, ...], generation: int, shutdown: int | None = None) -> dict[str, Any]:
    data = health.Membership(brokers, shutdown, generation).data()
    return {"metadata": {"resourceVersion": str(100 + generation)}, "data": data}


def health_map(
    at: datetime.datetime,
    generation: int,
    replicas: dict[int, int],
    *,
    leaders: dict[int, int] | None = None,
    under_replicated: int = 0,
    max_rf: int = 2,
    bytes_to_move: int = 0,
) -> dict[str, Any]:
    body = {
        "updatedAt": at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "observedMembershipGeneration": generation,
        "partitions": 12,
        "offline": 0,
        "underReplicated": under_replicated,
        "reassigning": 0,
        "bytesToMove": bytes_to_move,
        "maxReplicationFactor": max_rf,
        "brokers": {
            str(broker): {"alive": True, "replicas": count, "leaders": (leaders or {}).get(broker, 0),
                          "inSyncReplicas": count, "bytes": count * 1000}
            for broker, count in replicas.items()
        },
    }
    return {"data": {"health": json.dumps(body)}}


@dataclasses.dataclass
class World:
    """A cluster as the operator observes it, plus a stand-in for the brokers' controller."""

    replicas: int
    pods: list[dict[str, Any]]
    members: tuple[int, ...] | None
    generation: int = 0
    shutdown: int | None = None
    report: dict[str, Any] | None = None
    claims: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def observed(self) -> planning.Observed:
        return planning.Observed(
            statefulset=statefulset(self.replicas),
            pods=self.pods,
            claims=self.claims,
            membership=membership(self.members, self.generation, self.shutdown) if self.members is not None else None,
            health=self.report,
        )

    def parsed(self, now: datetime.datetime) -> tuple[health.Membership | None, health.Report]:
        observed = self.observed()
        return health.parse_membership(observed.membership), health.parse_health(observed.health, now, 18.0)

    def write_membership(self, members: tuple[int, ...] | None, shutdown: int | None = None) -> None:
        if members is None or (members == self.members and shutdown == self.shutdown):
            return
        self.members, self.shutdown, self.generation = members, shutdown, self.generation + 1

    def controller_round(self, now: datetime.datetime, *, moved: bool = True, max_rf: int = 2) -> None:
        """What the brokers' controller reports: with ``moved``, every replica already sits on a
        member (the reassignment finished), else the leaving brokers still hold theirs."""
        members = self.members or ()
        alive = [naming.ordinal_of(p["metadata"]["name"], "rustmq") for p in self.pods]
        replicas = {b: (6 if b in members or not moved else 0) for b in alive if b is not None}
        self.report = health_map(now, self.generation, replicas, max_rf=max_rf)


def scale(world: World, desired: int, now: datetime.datetime, previous_drain: Any = None,
          last_non_zero: int | None = None, **spec: Any) -> planning.ScalePlan:
    membership_, report = world.parsed(now)
    return planning.plan_scale(
        "rustmq",
        specs.with_defaults({"replicas": desired, **spec}),
        world.observed(),
        last_non_zero if last_non_zero is not None else world.replicas,
        report=report,
        membership=membership_,
        previous_drain=previous_drain,
        now=now,
    )


def three() -> World:
    world = World(replicas=3, pods=[pod(0), pod(1), pod(2)], members=(0, 1, 2), generation=1,
                  claims=[claim(0), claim(1), claim(2)])
    world.controller_round(T0)
    return world


# -- scale-down, one transition at a time ---------------------------------------------------------


def test_scale_down_first_takes_the_highest_broker_out_of_the_membership() -> None:
    world = three()
    plan = scale(world, 2, T0)
    assert plan.replicas == 3  # the StatefulSet keeps the broker until it holds nothing
    assert plan.members == (0, 1)
    assert plan.drain is not None
    assert (plan.drain["broker"], plan.drain["phase"], plan.drain["startedAt"]) == (2, "Draining", "2026-12-06T07:00:00Z")
    assert plan.drain["partitionsLeft"] == 6
    assert plan.progressing is not None and plan.progressing.reason == "Draining"
    assert [e.reason for e in plan.events] == ["Draining"]
    assert plan.stalled is None


def test_the_shrink_waits_for_a_report_that_saw_the_new_membership() -> None:
    world = three()
    world.write_membership(scale(world, 2, T0).members)
    # The broker holds nothing according to a report about the OLD membership: not enough.
    world.report = health_map(T0, world.generation - 1, {0: 6, 1: 6})
    plan = scale(world, 2, T0, previous_drain={"broker": 2, "startedAt": "2026-12-06T07:00:00Z"})
    assert plan.replicas == 3 and "new membership" in str(plan.progressing)
    # It saw the membership but broker 2 still holds replicas: still waiting, progress reported.
    world.report = health_map(T0, world.generation, {0: 6, 1: 6, 2: 4}, bytes_to_move=5000)
    plan = scale(world, 2, T0, previous_drain={"broker": 2, "startedAt": "2026-12-06T07:00:00Z"})
    assert plan.replicas == 3
    assert plan.drain is not None and (plan.drain["partitionsLeft"], plan.drain["bytesLeft"]) == (4, 5000)
    assert plan.events == ()  # the drain is not announced twice


def test_a_drained_broker_is_removed_and_then_its_claim_released() -> None:
    world = three()
    world.write_membership(scale(world, 2, T0).members)
    world.controller_round(T0)
    plan = scale(world, 2, T0, previous_drain={"broker": 2, "startedAt": "2026-12-06T07:00:00Z"})
    assert plan.replicas == 2 and plan.last_non_zero == 2
    assert plan.drain is not None and plan.drain["phase"] == "Shrinking"
    assert [e.reason for e in plan.events] == ["BrokerDrained"]
    spec = specs.with_defaults({"replicas": 2})
    _, report = world.parsed(T0)
    # Its pod still exists (terminating): the claim stays until the pod is gone.
    assert planning.claims_to_release("rustmq", spec, world.observed(), 2, plan.members, report) == ()
    world.replicas, world.pods = 2, world.pods[:2]
    world.controller_round(T0)
    _, report = world.parsed(T0)
    assert planning.claims_to_release("rustmq", spec, world.observed(), 2, plan.members, report) == ("data-rustmq-2",)
    retain = specs.with_defaults({"replicas": 2, "storage": {"retentionPolicy": {"whenScaled": "Retain"}}})
    assert planning.claims_to_release("rustmq", retain, world.observed(), 2, plan.members, report) == ()
    after = scale(world, 2, T0, previous_drain=plan.drain)
    assert after.replicas == 2 and after.drain is None and after.members == (0, 1)


def test_claims_are_never_released_on_hibernation_or_without_a_fresh_report() -> None:
    world = three()
    spec = specs.with_defaults({"replicas": 0})
    world.pods = []
    _, report = world.parsed(T0)
    assert planning.claims_to_release("rustmq", spec, world.observed(), 0, (0, 1, 2), report) == ()
    world.replicas = 2
    _, stale = world.parsed(T0 + datetime.timedelta(minutes=5))
    assert planning.claims_to_release("rustmq", spec, world.observed(), 2, (0, 1), stale) == ()
    # A claim of a broker the report shows holding replicas is never released.
    world.report = health_map(T0, 1, {2: 3})
    _, holding = world.parsed(T0)
    assert planning.claims_to_release("rustmq", specs.with_defaults({"replicas": 2}), world.observed(), 2, (0, 1), holding) == ()


def test_five_to_two_drains_one_broker_at_a_time_and_survives_an_operator_restart() -> None:
    world = World(replicas=5, pods=[pod(i) for i in range(5)], members=(0, 1, 2, 3, 4), generation=3,
                  claims=[claim(i) for i in range(5)])
    world.controller_round(T0)
    now, drain, history = T0, None, []
    for step in range(40):
        now += datetime.timedelta(seconds=2)
        plan = scale(world, 2, now, previous_drain=drain)
        world.write_membership(plan.members)
        # At most one broker is ever outside the membership while still in the StatefulSet.
        assert len(set(range(world.replicas)) - set(world.members or ())) <= 1
        if plan.replicas < world.replicas:
            history.append(world.replicas - 1)
            world.replicas = plan.replicas
            world.pods = world.pods[: plan.replicas]
        drain = plan.drain
        if step == 7:
            drain = dict(drain) if drain else None  # the CR's status is all a restarted operator has
        if step % 2:
            world.controller_round(now)
        if world.replicas == 2 and plan.drain is None:
            break
    assert history == [4, 3, 2]
    assert world.replicas == 2 and world.members == (0, 1)


def test_resuming_after_a_restart_keeps_the_start_time() -> None:
    world = three()
    world.write_membership(scale(world, 2, T0).members)
    later = T0 + datetime.timedelta(minutes=10)
    world.report = health_map(later, world.generation, {0: 6, 1: 6, 2: 2})
    plan = scale(world, 2, later, previous_drain={"broker": 2, "phase": "Draining", "startedAt": "2026-12-06T07:00:00Z"})
    assert plan.drain is not None and plan.drain["startedAt"] == "2026-12-06T07:00:00Z"
    assert plan.events == ()
    # Even a lost status (e.g. restored from a backup) resumes: the membership says who leaves.
    plan = scale(world, 2, later, previous_drain=None)
    assert plan.members == (0, 1) and plan.replicas == 3


def test_raising_replicas_cancels_the_drain_and_restores_the_broker() -> None:
    world = three()
    world.write_membership(scale(world, 2, T0).members)
    plan = scale(world, 3, T0, previous_drain={"broker": 2, "startedAt": "2026-12-06T07:00:00Z"})
    assert plan.replicas == 3 and plan.members == (0, 1, 2) and plan.drain is None
    assert [e.reason for e in plan.events] == ["DrainCancelled"]
    bigger = scale(world, 4, T0, previous_drain={"broker": 2, "startedAt": "2026-12-06T07:00:00Z"})
    assert bigger.replicas == 4 and bigger.members == (0, 1, 2)


def test_hibernating_in_the_middle_of_a_drain_keeps_every_broker_a_member() -> None:
    world = three()
    world.write_membership(scale(world, 2, T0).members)
    plan = scale(world, 0, T0, previous_drain={"broker": 2, "startedAt": "2026-12-06T07:00:00Z"})
    assert plan.replicas == 0 and plan.members == (0, 1, 2) and plan.drain is None


def test_a_drain_that_takes_too_long_is_stalled_but_goes_on() -> None:
    world = three()
    world.write_membership(scale(world, 2, T0).members)
    late = T0 + datetime.timedelta(seconds=601)
    world.report = health_map(late, world.generation, {0: 6, 1: 6, 2: 5})
    plan = scale(world, 2, late, previous_drain={"broker": 2, "startedAt": "2026-12-06T07:00:00Z"},
                 scaling={"drainTimeoutSeconds": 600})
    assert plan.stalled is not None and plan.stalled.reason == "DrainTimedOut"
    assert "600 s" in plan.stalled.message and "5 partition replica(s) left" in plan.stalled.message
    assert plan.members == (0, 1) and plan.replicas == 3
    not_yet = scale(world, 2, late, previous_drain={"broker": 2, "startedAt": "2026-12-06T07:00:00Z"},
                    scaling={"drainTimeoutSeconds": 3600})
    assert not_yet.stalled is None


def test_too_few_brokers_for_the_replication_factor_is_stalled_and_nothing_moves() -> None:
    world = three()
    world.controller_round(T0, max_rf=3)
    plan = scale(world, 2, T0)
    assert plan.stalled is not None and plan.stalled.reason == "InsufficientBrokers"
    assert "replication factor 3" in plan.stalled.message
    assert plan.members == (0, 1, 2) and plan.replicas == 3 and plan.drain is None


def test_a_topic_created_mid_drain_with_a_larger_factor_restores_the_broker() -> None:
    world = three()
    world.write_membership(scale(world, 2, T0).members)
    world.report = health_map(T0, world.generation, {0: 6, 1: 6, 2: 3}, max_rf=3)
    plan = scale(world, 2, T0, previous_drain={"broker": 2, "startedAt": "2026-12-06T07:00:00Z"})
    assert plan.stalled is not None and plan.stalled.reason == "InsufficientBrokers"
    assert plan.members == (0, 1, 2) and plan.replicas == 3


def test_no_drain_starts_without_a_fresh_report() -> None:
    world = three()
    world.report = None
    plan = scale(world, 2, T0)
    assert plan.replicas == 3 and plan.members == (0, 1, 2)
    assert plan.drain is not None and plan.drain["phase"] == "Pending"
    assert plan.progressing is not None and "no health report" in plan.progressing.message
    world.controller_round(T0)
    stale = scale(world, 2, T0 + datetime.timedelta(minutes=2))
    assert stale.members == (0, 1, 2) and "stale" in str(stale.progressing)
    timed_out = scale(world, 2, T0 + datetime.timedelta(hours=2),
                      previous_drain={"broker": 2, "startedAt": "2026-12-06T07:00:00Z"})
    assert timed_out.stalled is not None and timed_out.stalled.reason == "DrainTimedOut"


def test_a_stale_report_never_confirms_a_drain() -> None:
    world = three()
    world.write_membership(scale(world, 2, T0).members)
    world.controller_round(T0)  # broker 2 holds nothing...
    plan = scale(world, 2, T0 + datetime.timedelta(seconds=19),  # ...but the report is too old
                 previous_drain={"broker": 2, "startedAt": "2026-12-06T07:00:00Z"})
    assert plan.replicas == 3 and "stale" in str(plan.progressing)


# -- scale-up -----------------------------------------------------------------------------------


def test_new_brokers_join_the_membership_once_ready() -> None:
    world = three()
    plan = scale(world, 5, T0)
    assert plan.replicas == 5 and plan.members == (0, 1, 2)
    world.replicas, world.pods = 5, [*world.pods, pod(3, ready=False), pod(4)]
    plan = scale(world, 5, T0)
    assert plan.members == (0, 1, 2, 4)
    world.pods[3] = pod(3)
    assert scale(world, 5, T0).members == (0, 1, 2, 3, 4)


def test_a_rebalance_in_progress_is_progress() -> None:
    world = three()
    world.report = health_map(T0, 1, {0: 6, 1: 6, 2: 6})
    body = json.loads(world.report["data"]["health"])
    body["reassigning"] = 4
    world.report = {"data": {"health": json.dumps(body)}}
    plan = scale(world, 3, T0)
    assert plan.progressing is not None and plan.progressing.reason == "Rebalancing"


def test_a_broker_joining_is_rebalancing_until_the_report_has_seen_it() -> None:
    """A report from before a new broker joined says nothing moves: not taken for converged."""
    world = three()
    world.replicas, world.pods = 4, [*world.pods, pod(3)]
    plan = scale(world, 4, T0)  # broker 3 Ready: it joins in this pass
    assert plan.members == (0, 1, 2, 3)
    assert plan.progressing is not None and plan.progressing.reason == "Rebalancing"
    assert "generation 2" in plan.progressing.message
    world.write_membership(plan.members)
    plan = scale(world, 4, T0)  # written, but the report is still the one of generation 1
    assert plan.progressing is not None and plan.progressing.reason == "Rebalancing"
    world.controller_round(T0)
    assert scale(world, 4, T0).progressing is None  # the report of generation 2: done


# -- rolling restarts with a controlled shutdown ---------------------------------------------------


def roll(world: World, now: datetime.datetime = T0, draining: bool = False) -> planning.RollPlan:
    membership_, report = world.parsed(now)
    return planning.plan_roll("rustmq", world.replicas, "h2", world.observed(), True,
                              report=report, membership=membership_, draining=draining)


def test_a_roll_asks_for_a_controlled_shutdown_before_evicting() -> None:
    world = three()
    world.report = health_map(T0, 1, {0: 6, 1: 6, 2: 6}, leaders={0: 4, 1: 4, 2: 4})
    plan = roll(world)
    assert plan.shutdown == 2 and plan.evict is None
    assert [e.reason for e in plan.events] == ["ControlledShutdown"]
    world.write_membership(world.members, plan.shutdown)
    # The controller has not acted on it yet (old generation): no eviction.
    assert roll(world).evict is None
    # It acted, but broker 2 still leads a partition.
    world.report = health_map(T0, world.generation, {0: 6, 1: 6, 2: 6}, leaders={0: 5, 1: 6, 2: 1})
    assert roll(world).evict is None
    world.report = health_map(T0, world.generation, {0: 6, 1: 6, 2: 6}, leaders={0: 6, 1: 6, 2: 0})
    plan = roll(world)
    assert plan.evict == "rustmq-2" and plan.shutdown == 2


def test_no_eviction_while_anything_is_under_replicated() -> None:
    world = three()
    world.report = health_map(T0, 1, {0: 6, 1: 6, 2: 6}, under_replicated=2)
    plan = roll(world)
    assert plan.evict is None and plan.shutdown is None
    assert "under-replicated" in str(plan.progressing)


def test_the_next_broker_waits_until_the_restarted_one_is_ready_and_caught_up() -> None:
    world = three()
    world.shutdown, world.generation = 2, 2
    world.pods[2] = pod(2, ready=False, config_hash="h2")
    world.report = health_map(T0, 2, {0: 6, 1: 6, 2: 6}, under_replicated=0)
    plan = roll(world)
    assert plan.evict is None and plan.shutdown == 2 and "to be Ready" in str(plan.progressing)
    world.pods[2] = pod(2, config_hash="h2")
    world.report = health_map(T0, 2, {0: 6, 1: 6, 2: 6}, under_replicated=3)
    plan = roll(world)
    assert plan.evict is None and plan.shutdown == 2 and "catch up" in str(plan.progressing)
    world.report = health_map(T0, 2, {0: 6, 1: 6, 2: 6}, leaders={1: 3})
    plan = roll(world)
    # Caught up: the shutdown is cleared and the next broker (1) is asked to hand over.
    assert plan.shutdown == 1 and plan.evict is None


def test_a_drain_holds_the_roll_and_drops_a_shutdown_not_yet_acted_on() -> None:
    world = three()
    world.shutdown, world.generation = 2, 2
    world.report = health_map(T0, 2, {0: 6, 1: 6, 2: 6})
    plan = roll(world, draining=True)
    assert plan.evict is None and plan.delete is None and plan.shutdown is None


def test_without_any_health_report_the_roll_is_gated_by_readiness_only() -> None:
    world = three()
    world.report = None
    plan = roll(world)
    assert plan.evict == "rustmq-2" and plan.shutdown is None


def test_a_stale_report_holds_the_roll() -> None:
    world = three()
    plan = roll(world, T0 + datetime.timedelta(minutes=1))
    assert plan.evict is None and "stale" in str(plan.progressing)


def test_a_broken_broker_is_replaced_even_without_a_controlled_shutdown() -> None:
    world = three()
    world.pods[1] = pod(1, ready=False)
    plan = roll(world)
    assert plan.delete == "rustmq-1"


def test_a_single_broker_is_restarted_without_asking_for_a_hand_over() -> None:
    """Nobody could take its leaderships: asking would hold the roll forever."""
    world = World(replicas=1, pods=[pod(0)], members=(0,), generation=1)
    world.report = health_map(T0, 1, {0: 12}, leaders={0: 12})
    plan = roll(world)
    assert plan.evict == "rustmq-0" and plan.shutdown is None


def test_leaderships_nobody_can_take_hold_the_roll_only_until_the_hand_over_timeout() -> None:
    world = three()
    world.shutdown, world.generation = 2, 2
    world.report = health_map(T0, 2, {0: 6, 1: 6, 2: 6}, leaders={2: 1})  # e.g. a partition of factor 1
    membership_, report = world.parsed(T0)

    def at(seconds: float, previous: Any) -> planning.RollPlan:
        return planning.plan_roll("rustmq", 3, "h2", world.observed(), True, report=report, membership=membership_,
                                  previous_handover=previous, handover_timeout_s=120,
                                  now=T0 + datetime.timedelta(seconds=seconds))

    first = at(0, None)
    assert first.evict is None and first.handover == {"broker": 2, "startedAt": "2026-12-06T07:00:00Z"}
    assert "1 left" in str(first.progressing)
    assert at(100, first.handover).evict is None
    late = at(121, first.handover)
    assert late.evict == "rustmq-2"
    assert [e.reason for e in late.events][0] == "ControlledShutdownTimedOut"
    # A hand-over recorded for another broker does not count for this one.
    assert at(121, {"broker": 1, "startedAt": "2026-12-06T07:00:00Z"}).evict is None
