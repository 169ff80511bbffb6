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

    Segments are preallocated to `segment_bytes` on disk when created (so disk-full shows up as an
    error at roll time, never as SIGBUS), so this is also the disk space an idle partition holds.
    Retention deletes whole sealed segments only; None means unlimited.
    """

    segment_bytes: int = 64 << 20
    segment_ms: int | None = 7 * 24 * 3600 * 1000
    index_interval_bytes: int = 4096
    retention_ms: int | None = 7 * 24 * 3600 * 1000
    retention_bytes: int | None = None
    retention_messages: int | None = None
    flush: FlushPolicy = dataclasses.field(default_factory=FlushPolicy)

    def __post_init__(self) -> None:
        _require_int("segment_bytes", self.segment_bytes, MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES)
        _require_optional_int("segment_ms", self.segment_ms, minimum=1)
        _require_int("index_interval_bytes", self.index_interval_bytes, minimum=1)
        _require_optional_int("retention_ms", self.retention_ms, minimum=0)
        _require_optional_int("retention_bytes", self.retention_bytes, minimum=0)
        _require_optional_int("retention_messages", self.retention_messages, minimum=0)
        if not isinstance(self.flush, FlushPolicy):
            raise errors.InvalidConfigError("flush must be a FlushPolicy")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LogConfig:
        """Build from a JSON-like mapping; missing keys take the defaults, unknown keys are errors."""
        return cls().merged(data)

    def to_dict(self) -> dict[str, Any]:
        result = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        result["flush"] = self.flush.to_dict()
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
