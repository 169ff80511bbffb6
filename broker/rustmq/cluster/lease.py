"""Lease timing: when to renew, when one's own lease is in doubt, when another's has expired.

The API server enforces nothing about Leases; expiry is a convention kept on each broker's own
monotonic clock (client-go's and Patroni's way), never by comparing remote timestamps:

- Holding. A holder renews every ``renew_period_s``; each API call is bounded by
  ``api_timeout_s``. It counts its lease as valid only until ``renew_period_s + 2 *
  api_timeout_s`` after the START of its last successful renewal (one period plus two failed
  attempts). Timing rule (Patroni's ``loop_wait + 2*retry_timeout <= ttl``):
  ``renew_period_s + 2 * api_timeout_s <= lease_duration_s``. So a holder stops acting (no more
  acks=all answers, no more controller writes) before any observer may consider the lease
  expired, whatever happened in between (a frozen process included: it checks on waking).
- Observing. An observer stamps the moment it first sees a lease record change (holder,
  renewTime, annotations); the lease is expired when ``lease_duration_s`` passed on the
  observer's clock since then with no change. An empty holder means released: expired at once.
  An observer that could not look for longer than ``max_gap_s`` (the API server unreachable
  for it, or its own process frozen) restarts the count at its next look instead of judging
  the time it was blind: holders could not renew then either, and all of them would otherwise
  look expired at once after an API outage (a failover of everything for nothing). This only
  ever delays a takeover, which is safe: holders stop acting on their own clocks.

``LeaseTiming.check`` raises ValueError for timings that break the rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from rustmq.cluster.store import LeaseRecord


@dataclass(frozen=True, slots=True)
class LeaseTiming:
    lease_duration_s: float = 6.0
    renew_period_s: float = 1.0
    api_timeout_s: float = 2.0

    def check(self) -> LeaseTiming:
        if min(self.lease_duration_s, self.renew_period_s, self.api_timeout_s) <= 0:
            raise ValueError("lease_duration_s, renew_period_s and api_timeout_s must be positive")
        if self.renew_period_s + 2 * self.api_timeout_s > self.lease_duration_s:
            raise ValueError(
                f"renew_period_s + 2 * api_timeout_s ({self.renew_period_s} + 2 * {self.api_timeout_s}) "
                f"must not exceed lease_duration_s ({self.lease_duration_s}): a holder that cannot renew "
                "must notice before the others may take over"
            )
        return self

    @property
    def holder_validity_s(self) -> float:
        return self.renew_period_s + 2 * self.api_timeout_s

    @property
    def duration_seconds(self) -> int:
        """The whole seconds written to leaseDurationSeconds (rounded up)."""
        return max(1, int(-(-self.lease_duration_s // 1)))


class HeldLease:
    """One's own lease: valid while renewals keep succeeding in time."""

    __slots__ = ("timing", "_valid_until")

    def __init__(self, timing: LeaseTiming) -> None:
        self.timing = timing
        self._valid_until = float("-inf")

    def renewed(self, attempt_started: float) -> None:
        """A renewal (or the acquisition) begun at attempt_started succeeded."""
        self._valid_until = max(self._valid_until, attempt_started + self.timing.holder_validity_s)

    def lost(self) -> None:
        self._valid_until = float("-inf")

    def valid(self, now: float) -> bool:
        return now < self._valid_until

    def remaining(self, now: float) -> float:
        return self._valid_until - now


class LeaseObserver:
    """Liveness of leases held by others, on this process's clock."""

    __slots__ = ("_looked", "_seen", "max_gap_s")

    def __init__(self, max_gap_s: float | None = None) -> None:
        self.max_gap_s = max_gap_s
        self._seen: dict[str, tuple[tuple[object, ...], float, float]] = {}  # name -> (fingerprint, since, duration)
        self._looked: dict[str, float] = {}  # name -> when it was last observed

    def observe(self, name: str, record: LeaseRecord | None, now: float) -> None:
        if record is None:
            self._seen.pop(name, None)
            self._looked.pop(name, None)
            return
        fingerprint = (record.holder, record.renew_time, record.transitions, tuple(sorted(record.annotations.items())))
        previous = self._seen.get(name)
        looked = self._looked.get(name)
        self._looked[name] = now
        blind = self.max_gap_s is not None and looked is not None and now - looked > self.max_gap_s
        if previous is None or previous[0] != fingerprint or blind:
            self._seen[name] = (fingerprint, now, float(record.duration_s))

    def holder(self, name: str, now: float) -> str | None:
        """The live holder of a lease, or None if it is released, unknown or expired."""
        seen = self._seen.get(name)
        if seen is None:
            return None
        fingerprint, since, duration = seen
        holder = fingerprint[0]
        if not holder or now - since > duration:
            return None
        return str(holder)

    def forget(self, names: set[str]) -> None:
        for name in set(self._seen) - names:
            del self._seen[name]
            self._looked.pop(name, None)
