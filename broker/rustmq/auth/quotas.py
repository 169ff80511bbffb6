"""Quotas per principal: byte rates (produce, fetch), request rate, connection counts.

Rates are token buckets holding one second of the rate: a request is always served, and the
debt it leaves (bytes or requests beyond the bucket) is turned into a delay, the time the bucket
needs to refill to zero. The broker holds the connection's answer for that delay and reads
nothing more from it meanwhile (Kafka's throttling: delay, do not refuse or disconnect), and
puts ``throttle_ms`` in the delayed answer. A client over its rate is slowed to it; one under
its rate never waits. Limiters are per principal, shared by all its connections on a broker.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Final

MAX_DELAY_S: Final = 30.0  # one answer is never held longer (a huge batch against a tiny quota)


@dataclass(frozen=True, slots=True)
class Quota:
    """Limits of one principal; None is unlimited."""

    produce_bytes_per_s: int | None = None
    fetch_bytes_per_s: int | None = None
    requests_per_s: int | None = None
    connections: int | None = None

    @property
    def limits_rates(self) -> bool:
        return any(v is not None for v in (self.produce_bytes_per_s, self.fetch_bytes_per_s, self.requests_per_s))


UNLIMITED: Final = Quota()


@dataclass(frozen=True, slots=True)
class QuotaPolicy:
    default: Quota = UNLIMITED
    principals: dict[str, Quota] = field(default_factory=dict)
    connections_per_address: int | None = None

    def for_principal(self, principal: str) -> Quota:
        return self.principals.get(principal, self.default)


def _quota(where: str, raw: Any) -> Quota:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping")
    names = {f.name for f in fields(Quota)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} (known: {', '.join(sorted(names))})")
    for name, value in raw.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{where}.{name} must be a positive integer or null")
    return Quota(**raw)


def parse_quotas(raw: Any) -> QuotaPolicy:
    if raw is None:
        return QuotaPolicy()
    if not isinstance(raw, dict):
        raise ValueError("must be a mapping")
    unknown = sorted(set(raw) - {"default", "principals", "connections_per_address"})
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(str, unknown))}")
    default = _quota("default", raw["default"]) if raw.get("default") is not None else UNLIMITED
    principals = raw.get("principals") or {}
    if not isinstance(principals, dict):
        raise ValueError("principals must be a mapping of principal to quota")
    per_address = raw.get("connections_per_address")
    if per_address is not None and (not isinstance(per_address, int) or isinstance(per_address, bool) or per_address < 1):
        raise ValueError("connections_per_address must be a positive integer or null")
    return QuotaPolicy(default, {str(name): _quota(f"principals.{name}", q) for name, q in principals.items()}, per_address)


class Bucket:
    """A token bucket of ``rate`` units per second holding at most one second of them."""

    __slots__ = ("_last", "_level", "rate")

    def __init__(self, rate: int, now: float) -> None:
        self.rate = rate
        self._level = float(rate)
        self._last = now

    def charge(self, amount: int, now: float) -> float:
        """Take ``amount``; the delay in seconds until the bucket is back at zero (0 if not below)."""
        self._level = min(float(self.rate), self._level + (now - self._last) * self.rate) - amount
        self._last = now
        return 0.0 if self._level >= 0 else min(MAX_DELAY_S, -self._level / self.rate)

    def debt_delay(self, now: float) -> float:
        """The delay the current debt asks for, without taking anything."""
        level = min(float(self.rate), self._level + (now - self._last) * self.rate)
        return 0.0 if level >= 0 else min(MAX_DELAY_S, -level / self.rate)


class Limiter:
    """The buckets of one principal (shared by its connections)."""

    __slots__ = ("fetch", "produce", "quota", "requests")

    def __init__(self, quota: Quota, now: float) -> None:
        self.quota = quota
        self.produce = Bucket(quota.produce_bytes_per_s, now) if quota.produce_bytes_per_s else None
        self.fetch = Bucket(quota.fetch_bytes_per_s, now) if quota.fetch_bytes_per_s else None
        self.requests = Bucket(quota.requests_per_s, now) if quota.requests_per_s else None
