"""The two ConfigMaps through which the operator and the brokers' controller talk (issue 14).

The operator never dials a broker: it writes its wishes into ``<cluster>-membership`` and reads
what the controller did from ``<cluster>-health`` (docs/operator.md, Scaling; the broker side is
docs/cluster.md). This module parses and builds both, and nothing else; the decisions live in
``planning``.

``<cluster>-membership`` (written by the operator only), data:

* ``brokers``: comma-separated ascending broker ids that should hold data (``"0,1,2"``);
* ``shutdown``: one broker id the operator is about to restart, or empty;
* ``generation``: an integer incremented on every change of the two above; the controller
  echoes the one it acted on as ``observedMembershipGeneration`` in the health report.

``<cluster>-health`` (written by the brokers' controller only), data key ``health``: JSON with
``updatedAt`` (RFC 3339, rewritten at least every 10 s), ``observedMembershipGeneration``,
``partitions``, ``offline``, ``underReplicated``, ``underMinIsr``, ``reassigning``,
``bytesToMove``, ``maxReplicationFactor``, the leadership balance (``leaderSkew``,
``topicLeaderSkew``, ``leadersNotPreferred``; absent from older brokers' reports, read as 0) and
per broker id ``{alive, replicas, leaders, inSyncReplicas, bytes}``. A report older than three lease durations counts as unknown: the
controller that wrote it may be dead. A report that does not parse counts as absent, with the
reason kept for the status message, so a broker bug can never make the operator act on garbage.
Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Mapping
from typing import Any, Final

DATA_KEY: Final = "health"
DEFAULT_LEASE_DURATION_S: Final = 6.0  # the brokers' RUSTMQ_LEASE_DURATION_S default (docs/cluster.md)
STALE_LEASES: Final = 3  # a report older than this many lease durations is not believed


def membership_name(cluster: str) -> str:
    return f"{cluster}-membership"


def health_name(cluster: str) -> str:
    return f"{cluster}-health"


@dataclasses.dataclass(frozen=True)
class Membership:
    brokers: tuple[int, ...]
    shutdown: int | None
    generation: int
    resource_version: str | None = None

    def data(self) -> dict[str, str]:
        return {
            "brokers": ",".join(str(broker) for broker in sorted(self.brokers)),
            "shutdown": "" if self.shutdown is None else str(self.shutdown),
            "generation": str(self.generation),
        }


def parse_membership(config_map: Mapping[str, Any] | None) -> Membership | None:
    """The membership ConfigMap as written; None when absent. Unparsable fields read as empty,
    so the next write (generation + 1) repairs a hand edit."""
    if config_map is None:
        return None
    data = config_map.get("data") or {}
    brokers = tuple(
        sorted({int(part) for part in str(data.get("brokers", "")).split(",") if part.strip().isdigit()})
    )
    shutdown_text = str(data.get("shutdown", "")).strip()
    generation_text = str(data.get("generation", "0")).strip()
    return Membership(
        brokers=brokers,
        shutdown=int(shutdown_text) if shutdown_text.isdigit() else None,
        generation=int(generation_text) if generation_text.isdigit() else 0,
        resource_version=(config_map.get("metadata") or {}).get("resourceVersion"),
    )


@dataclasses.dataclass(frozen=True)
class BrokerHealth:
    alive: bool
    replicas: int
    leaders: int
    in_sync_replicas: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class Health:
    updated_at: datetime.datetime
    age_s: float  # seconds between updatedAt and the pass that read it
    fresh: bool
    observed_generation: int
    partitions: int
    offline: int
    under_replicated: int
    under_min_isr: int
    reassigning: int
    bytes_to_move: int
    max_replication_factor: int
    brokers: Mapping[int, BrokerHealth]
    leader_skew: int = 0  # most minus fewest leaderships of a live member
    topic_leader_skew: int = 0  # the same within one topic, the largest over topics
    leaders_not_preferred: int = 0  # partitions led by another replica than their first

    def leadership(self) -> dict[str, Any]:
        """status.leadership: where leaders are and how even that is."""
        return {
            "perBroker": ",".join(f"{b}={h.leaders}" for b, h in sorted(self.brokers.items()) if h.alive or h.leaders),
            "skew": self.leader_skew, "topicSkew": self.topic_leader_skew, "notPreferred": self.leaders_not_preferred,
        }

    def holds_nothing(self, broker: int) -> bool:
        """The contract's "holds nothing": absent from the report, or no replica."""
        found = self.brokers.get(broker)
        return found is None or found.replicas == 0

    def replicas_of(self, broker: int) -> int:
        found = self.brokers.get(broker)
        return 0 if found is None else found.replicas

    def leaders_of(self, broker: int) -> int:
        found = self.brokers.get(broker)
        return 0 if found is None else found.leaders


@dataclasses.dataclass(frozen=True)
class Report:
    """What a pass knows about the data: a parsed report, or why there is none."""

    health: Health | None
    problem: str | None = None  # set when health is None or stale

    @property
    def fresh(self) -> Health | None:
        return self.health if self.health is not None and self.health.fresh else None


def stale_after_s(spec: Mapping[str, Any]) -> float:
    """3 x the brokers' lease duration (spec.config.extra.LEASE_DURATION_S, default 6 s)."""
    extra = (spec.get("config") or {}).get("extra") or {}
    try:
        lease = float(extra.get("LEASE_DURATION_S", DEFAULT_LEASE_DURATION_S))
    except (TypeError, ValueError):
        lease = DEFAULT_LEASE_DURATION_S
    return STALE_LEASES * max(lease, 1.0)


def parse_time(text: str) -> datetime.datetime:
    parsed = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed


def _count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{field} is not a count: {value!r}")
    return value


def parse_health(
    config_map: Mapping[str, Any] | None, now: datetime.datetime, stale_after: float
) -> Report:
    if config_map is None:
        return Report(None, "no health report from the brokers' controller yet")
    text = (config_map.get("data") or {}).get(DATA_KEY)
    if not text:
        return Report(None, f"the health ConfigMap has no {DATA_KEY!r} key")
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        updated_at = parse_time(str(raw["updatedAt"]))
        brokers: dict[int, BrokerHealth] = {}
        for key, entry in (raw.get("brokers") or {}).items():
            if not isinstance(entry, dict):
                raise ValueError(f"brokers.{key} is not an object")
            brokers[int(key)] = BrokerHealth(
                alive=bool(entry.get("alive", False)),
                replicas=_count(entry.get("replicas", 0), f"brokers.{key}.replicas"),
                leaders=_count(entry.get("leaders", 0), f"brokers.{key}.leaders"),
                in_sync_replicas=_count(entry.get("inSyncReplicas", 0), f"brokers.{key}.inSyncReplicas"),
                bytes=_count(entry.get("bytes", 0), f"brokers.{key}.bytes"),
            )
        age = (now - updated_at).total_seconds()
        health = Health(
            updated_at=updated_at,
            age_s=age,
            fresh=age <= stale_after,
            # null: the controller has not read a membership yet.
            observed_generation=_count(raw.get("observedMembershipGeneration") or 0, "observedMembershipGeneration"),
            partitions=_count(raw.get("partitions", 0), "partitions"),
            offline=_count(raw.get("offline", 0), "offline"),
            under_replicated=_count(raw.get("underReplicated", 0), "underReplicated"),
            under_min_isr=_count(raw.get("underMinIsr", 0), "underMinIsr"),
            reassigning=_count(raw.get("reassigning", 0), "reassigning"),
            bytes_to_move=_count(raw.get("bytesToMove", 0), "bytesToMove"),
            max_replication_factor=_count(raw.get("maxReplicationFactor", 0), "maxReplicationFactor"),
            brokers=brokers,
            leader_skew=_count(raw.get("leaderSkew", 0), "leaderSkew"),
            topic_leader_skew=_count(raw.get("topicLeaderSkew", 0), "topicLeaderSkew"),
            leaders_not_preferred=_count(raw.get("leadersNotPreferred", 0), "leadersNotPreferred"),
        )
    except (ValueError, KeyError, TypeError) as error:
        return Report(None, f"the health report does not parse ({error})")
    if not health.fresh:
        return Report(
            health,
            f"the health report is stale (written {raw['updatedAt']}, believed for "
            f"{stale_after:.0f} s): is the brokers' controller running?",
        )
    return Report(health)
