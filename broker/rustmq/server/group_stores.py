"""Cluster mode: consumer-group coordinators on the replicated internal topic.

A group's coordinator is the leader of partition ``partition_for(group)`` of
``__rustmq_coordination`` (rustmq.coordination.internal_topic). `ClusterGroupStores` is the
`GroupStores` the Coordinator consults in cluster mode: for each partition this broker leads it
keeps one `OffsetStore` and one `ProducerNames` (stable producer names -> id, epoch) on a
`LogJournal` over that partition, stamped with the leader epoch; one replay feeds both.

- Leadership is checked on every group request (the stored leader, this broker, a valid broker
  lease); otherwise NOT_COORDINATOR and the client finds the coordinator again.
- A store is rebuilt by replaying its partition whenever the leader epoch differs from the one
  it was built at (this broker became leader again, or for the first time): what the broker
  appended as a follower is exactly what the previous leader wrote. Group membership is not
  replicated: on a new coordinator members get UNKNOWN_MEMBER and join again; the members a
  broker held in an earlier term are dropped when it rebuilds.
- A commit is answered once the partition's high watermark passes it (acks=all; refused with
  NOT_ENOUGH_REPLICAS when the ISR is below min_insync_replicas before anything is written). A
  leadership lost while waiting answers NOT_COORDINATOR: the commit may or may not survive,
  and the client retries it at the new coordinator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rustmq.coordination import internal_topic
from rustmq.coordination.journal import LogJournal
from rustmq.coordination.offsets import OffsetStore
from rustmq.coordination.producers import ProducerNames
from rustmq.coordination.service import Coordinator, NotCoordinatorError
from rustmq.protocol.api import ErrorCode, RequestError

if TYPE_CHECKING:
    from rustmq.server.broker import Broker
    from rustmq.server.replicated import ClusterRoles, PartitionRole


class ClusterGroupStores:
    def __init__(self, broker: Broker, coordinator: Coordinator, roles: ClusterRoles) -> None:
        self.broker = broker
        self.coordinator = coordinator
        self.roles = roles
        self._stores: dict[int, tuple[PartitionRole, int, OffsetStore, ProducerNames]] = {}

    # -- GroupStores -------------------------------------------------------------------------

    def partition_count(self, topic: str) -> int:
        state = self.roles.topics.get(topic)
        return len(state.partitions) if state is not None else 0

    def store_for(self, group: str) -> OffsetStore:
        return self._state(group)[2]

    def names_for(self, name: str) -> ProducerNames:
        return self._state(name)[3]

    def _state(self, key: str) -> tuple[PartitionRole, int, OffsetStore, ProducerNames]:
        index = self.partition_of(key)
        role = self._led_role(index, key)
        cached = self._stores.get(index)
        if cached is not None and cached[0] is role and cached[1] == role.leader_epoch:
            return cached
        count = self.partition_count(internal_topic.TOPIC)
        for name in [g for g in self.coordinator.groups.groups if internal_topic.partition_for(g, count) == index]:
            del self.coordinator.groups.groups[name]  # members of an earlier term join again
        # Both stores share the partition: one replay, each entry to the store of its key.
        journal = LogJournal(role.plog, role.leader_epoch, lambda: self._appended(role))
        offsets, names = OffsetStore(journal), ProducerNames(journal)
        for entry_key, value in journal.replay():
            (names if ProducerNames.is_name_key(entry_key) else offsets).apply(entry_key, value)
        state = self._stores[index] = (role, role.leader_epoch, offsets, names)
        return state

    def stores(self) -> list[OffsetStore]:
        led = []
        for index, (role, epoch, store, _) in list(self._stores.items()):
            if self._leads(role) and role.leader_epoch == epoch:
                led.append(store)
            else:
                del self._stores[index]
        return led

    # -- the request path --------------------------------------------------------------------

    def partition_of(self, group: str) -> int:
        count = self.partition_count(internal_topic.TOPIC)
        if count == 0:
            raise NotCoordinatorError(
                f"the coordination topic {internal_topic.TOPIC} does not exist yet (the controller "
                "creates it once the brokers have registered)")
        return internal_topic.partition_for(group, count)

    def find(self, group: str) -> dict[str, Any]:
        """FIND_COORDINATOR's answer: the stored leader of the group's partition."""
        index = self.partition_of(group)
        state = self.roles.topics[internal_topic.TOPIC]
        leader = state.partitions[index].leader
        broker = next((b for b in self.roles.brokers if b["id"] == leader), None)
        if broker is None:
            raise NotCoordinatorError(f"partition {index} of {internal_topic.TOPIC} has no live leader right now")
        return {"coordinator": leader, "partition": index, **{k: v for k, v in broker.items() if k != "id"}}

    def high_watermark(self, topic: str, index: int) -> int:
        """How far queues may read this broker's replica of a partition: its high watermark
        (a leader's own, a follower's as its leader last reported it; 0 without a replica)."""
        role = self.roles.role(topic, index)
        if role is None:
            return 0
        return role.tracker.high_watermark if role.tracker is not None else role.high_watermark

    def check_replicas(self, group: str) -> None:
        """NOT_ENOUGH_REPLICAS before a write the ISR could not acknowledge."""
        self.roles.check_insync(self._led_role(self.partition_of(group), group))

    def replicated_role(self, plog: Any) -> PartitionRole | None:
        for role, *_ in self._stores.values():
            if role.plog is plog:
                return role
        return None

    def when_replicated(self, role: PartitionRole, offset: int, done: Callable[[BaseException | None], None]) -> None:
        def translated(error: BaseException | None) -> None:
            if isinstance(error, RequestError) and error.code is ErrorCode.NOT_LEADER:
                error = RequestError(ErrorCode.NOT_COORDINATOR, f"coordinator moved before the write was replicated: {error.message}")
            done(error)

        self.roles.when_replicated(role, offset + 1, translated)

    # -- internals ---------------------------------------------------------------------------

    def _leads(self, role: PartitionRole) -> bool:
        return role.tracker is not None and role.leader == self.roles.broker_id and self.roles.lease_valid()

    def _led_role(self, index: int, key: str) -> PartitionRole:
        role = self.roles.role(internal_topic.TOPIC, index)
        if role is None or not self._leads(role):
            leader = role.leader if role is not None else -1
            raise NotCoordinatorError(
                f"broker {self.roles.broker_id} does not coordinate {key!r} "
                f"(partition {index} of {internal_topic.TOPIC}, leader: {leader})")
        return role

    def _appended(self, role: PartitionRole) -> None:
        self.broker._wake(role.plog)
        self.roles.appended(role)
