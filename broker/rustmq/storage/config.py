"""Per-topic log configuration: frozen dataclasses that round-trip through JSON.

A topic stores only its overrides (in its `topic.json`); the effective config is the broker
default `merged` with them, so changing a broker default reaches every topic that did not
override it (Kafka's model). Every value is validated on construction and a bad one raises
InvalidConfigError naming the key, so a typo in a request or a file can never half-apply.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Final, Literal

from rustmq.storage import errors

FlushMode = Literal["none", "interval", "bytes", "always"]
FLUSH_MODES: Final = ("none", "interval", "bytes", "always")

CleanupPolicy = Literal["delete", "compact", "compact,delete"]
CLEANUP_POLICIES: Final = ("delete", "compact", "compact,delete")
MAX_RETAINING_GROUPS: Final = 64

MIN_SEGMENT_BYTES: Final = 4096
MAX_SEGMENT_BYTES: Final = 0x7FFF_FFFF  # index positions are 32-bit


@dataclasses.dataclass(frozen=True, slots=True)
class FlushPolicy:
    """When appended data is forced to stable storage (fdatasync).

    * ``none``: only when a segment is sealed (rolled) and at clean shutdown; the OS writes back
      the rest at its own pace. Survives a broker crash, not a power loss.
    * ``interval``: additionally every `interval_ms` by the Log's background flusher.
    * ``bytes``: additionally as soon as `bytes` are unflushed (background flusher, woken by append).
    * ``always``: every append is acknowledged only once durable; the caller asks the
      GroupCommitter, which shares one fsync among the appends arriving within its window.
    """

    mode: FlushMode = "always"
    interval_ms: int = 1000
    bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.mode not in FLUSH_MODES:
            raise errors.InvalidConfigError(
                f"flush.mode must be one of {', '.join(FLUSH_MODES)}, not {self.mode!r}"
            )
        _require_int("flush.interval_ms", self.interval_ms, minimum=1)
        _require_int("flush.bytes", self.bytes, minimum=1)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "interval_ms": self.interval_ms, "bytes": self.bytes}


@dataclasses.dataclass(frozen=True, slots=True)
class LogConfig:
    """Segment, index, retention and flush settings of one topic (all of its partitions).

    `segment_bytes` bounds a segment; its blocks are allocated in steps ahead of the appends (see
    rustmq.storage.segment), so an idle partition holds almost no disk space whatever the size.
    Retention deletes whole sealed segments only; None means unlimited.

    `cleanup_policy`: "delete" applies the retention limits; "compact" instead keeps, in sealed
    segments, only the latest record per key (tombstones, records with a None value, go once
    they are older than `delete_retention_ms`); "compact,delete" does both. Compaction itself
    lives outside storage (rustmq.compaction), which hands the rewritten segments to
    `PartitionLog.replace_sealed_segments`.

    `retain_until_consumed_by` names consumer groups: retention (time, size, count) never
    deletes a segment holding an offset at or above the smallest offset those groups committed
    on the partition (a group that never committed there keeps everything). With
    `retain_until_settled`, the same holds for the ack floor of every queue subscription of the
    partition. Storage only takes the resulting floor (`enforce_retention(keep_from_offset=...)`);
    the server computes it from the coordinator.
    """

    segment_bytes: int = 64 << 20
    segment_ms: int | None = 7 * 24 * 3600 * 1000
    index_interval_bytes: int = 4096
    retention_ms: int | None = 7 * 24 * 3600 * 1000
    retention_bytes: int | None = None
    retention_messages: int | None = None
    flush: FlushPolicy = dataclasses.field(default_factory=FlushPolicy)
    cleanup_policy: CleanupPolicy = "delete"
    delete_retention_ms: int = 24 * 3600 * 1000
    retain_until_consumed_by: tuple[str, ...] = ()
    retain_until_settled: bool = False

    def __post_init__(self) -> None:
        _require_int("segment_bytes", self.segment_bytes, MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES)
        _require_optional_int("segment_ms", self.segment_ms, minimum=1)
        _require_int("index_interval_bytes", self.index_interval_bytes, minimum=1)
        _require_optional_int("retention_ms", self.retention_ms, minimum=0)
        _require_optional_int("retention_bytes", self.retention_bytes, minimum=0)
        _require_optional_int("retention_messages", self.retention_messages, minimum=0)
        if not isinstance(self.flush, FlushPolicy):
            raise errors.InvalidConfigError("flush must be a FlushPolicy")
        if self.cleanup_policy not in CLEANUP_POLICIES:
            raise errors.InvalidConfigError(
                f"cleanup_policy must be one of {', '.join(map(repr, CLEANUP_POLICIES))}, "
                f"not {self.cleanup_policy!r}"
            )
        _require_int("delete_retention_ms", self.delete_retention_ms, minimum=0)
        groups = self.retain_until_consumed_by
        if (
            not isinstance(groups, tuple)
            or len(groups) > MAX_RETAINING_GROUPS
            or not all(isinstance(group, str) and group for group in groups)
        ):
            raise errors.InvalidConfigError(
                "retain_until_consumed_by must be a list of at most "
                f"{MAX_RETAINING_GROUPS} non-empty group names, not {groups!r}"
            )
        if not isinstance(self.retain_until_settled, bool):
            raise errors.InvalidConfigError(
                f"retain_until_settled must be true or false, not {self.retain_until_settled!r}"
            )

    @property
    def compacted(self) -> bool:
        """Whether the topic asks for key-based compaction."""
        return self.cleanup_policy != "delete"

    @property
    def deletes(self) -> bool:
        """Whether the retention limits (time, size, count) apply."""
        return self.cleanup_policy != "compact"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LogConfig:
        """Build from a JSON-like mapping; missing keys take the defaults, unknown keys are errors."""
        return cls().merged(data)

    def to_dict(self) -> dict[str, Any]:
        result = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        result["flush"] = self.flush.to_dict()
        result["retain_until_consumed_by"] = list(self.retain_until_consumed_by)
        return result

    def merged(self, overrides: Mapping[str, Any] | None) -> LogConfig:
        """Return a copy with `overrides` applied (a partial "flush" mapping merges key by key)."""
        if not overrides:
            return self
        if not isinstance(overrides, Mapping):
            raise errors.InvalidConfigError("config overrides must be a mapping")
        known = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(str(key) for key in overrides if key not in known)
        if unknown:
            raise errors.InvalidConfigError(f"unknown config key(s): {', '.join(unknown)}")
        changes = {key: value for key, value in overrides.items() if key != "flush"}
        if "flush" in overrides:
            changes["flush"] = _merged_flush(self.flush, overrides["flush"])
        groups = changes.get("retain_until_consumed_by")
        if isinstance(groups, list):  # JSON and msgpack carry arrays as lists
            changes["retain_until_consumed_by"] = tuple(groups)
        return dataclasses.replace(self, **changes)


def _merged_flush(base: FlushPolicy, value: Any) -> FlushPolicy:
    if isinstance(value, FlushPolicy):
        return value
    if not isinstance(value, Mapping):
        raise errors.InvalidConfigError("flush must be a mapping with mode, interval_ms, bytes")
    unknown = sorted(str(key) for key in value if key not in ("mode", "interval_ms", "bytes"))
    if unknown:
        raise errors.InvalidConfigError(f"unknown flush key(s): {', '.join(unknown)}")
    return dataclasses.replace(base, **value)


def _require_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.InvalidConfigError(f"{name} must be an integer, not {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise errors.InvalidConfigError(f"{name} must be {bound}, not {value}")


def _require_optional_int(name: str, value: Any, minimum: int) -> None:
    if value is not None:
        _require_int(name, value, minimum)
