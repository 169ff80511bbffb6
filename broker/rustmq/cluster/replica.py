"""A partition leader's view of its followers: their log ends, the ISR and the high watermark.

Kafka's rules, on the leader's monotonic clock:

- A follower's fetch offset is its acknowledgement of everything below it (followers fetch
  whole batches, so it is always a batch boundary). A follower is caught up at a fetch whose
  offset reaches the leader's log end at that moment, and was caught up at the time of its
  previous fetch when this fetch reaches the leader's log end of that time (Kafka's rule: under
  a steady stream of appends a follower is never exactly at the end, yet never falls behind).
- High watermark = the smallest log end over the stored ISR (the leader's own included); it only
  grows. Consumers read below it; an acks=all produce is answered once it passes the batch.
- Shrink: an ISR follower not caught up for ``lag_s`` leaves the ISR. Expand: a replica outside
  the ISR whose fetch offset reached the high watermark (and the start of the current leader
  epoch, so it truncated first) joins it.
- Safe order (Patroni's rule 3, Kafka's AlterPartition): ``proposed_isr`` only proposes; the
  tracker keeps using the stored ISR until ``isr_stored`` confirms the CAS, so a removed
  follower is counted until its removal is durable and an added one only after it is.
"""

from __future__ import annotations

from collections.abc import Iterable


class ReplicaTracker:
    __slots__ = (
        "broker_id", "leader_epoch", "epoch_start_offset", "replicas", "isr", "min_insync",
        "lag_s", "high_watermark", "_leo", "_caught_up", "_last_fetch",
    )

    def __init__(self, broker_id: int, leader_epoch: int, epoch_start_offset: int, replicas: Iterable[int],
                 isr: Iterable[int], min_insync: int, lag_s: float, high_watermark: int, now: float) -> None:
        self.broker_id = broker_id
        self.leader_epoch = leader_epoch
        self.epoch_start_offset = epoch_start_offset
        self.replicas = tuple(replicas)
        self.isr = tuple(isr)
        self.min_insync = min_insync
        self.lag_s = lag_s
        self.high_watermark = high_watermark
        self._leo: dict[int, int] = {}
        # A new leader gives every follower a full lag period to show up before shrinking.
        self._caught_up: dict[int, float] = {r: now for r in self.replicas if r != broker_id}
        self._last_fetch: dict[int, tuple[int, float]] = {}  # follower -> (leader end, time) of its last fetch

    def follower_fetched(self, follower: int, offset: int, leader_end: int, now: float) -> bool:
        """Record a follower fetch; True when the high watermark moved."""
        if follower not in self._caught_up:
            if follower not in self.replicas or follower == self.broker_id:
                return False
            # A replica added after this leader took over (a reassignment): not caught up yet.
            self._caught_up[follower] = float("-inf")
        self._leo[follower] = offset
        previous = self._last_fetch.get(follower)
        if offset >= leader_end:
            self._caught_up[follower] = now
        elif previous is not None and offset >= previous[0]:
            self._caught_up[follower] = max(self._caught_up[follower], previous[1])
        self._last_fetch[follower] = (leader_end, now)
        return self.advance(leader_end)

    def advance(self, leader_end: int) -> bool:
        """Recompute the high watermark (after an append or a fetch); True if it moved."""
        low = leader_end
        for r in self.isr:
            if r != self.broker_id:
                end = self._leo.get(r, -1)
                if end < low:
                    low = end
        if low > self.high_watermark:
            self.high_watermark = low
            return True
        return False

    def follower_end(self, follower: int) -> int | None:
        return self._leo.get(follower)

    def proposed_isr(self, leader_end: int, now: float) -> tuple[int, ...] | None:
        """The ISR this leader wants stored now, or None when the stored one is right."""
        keep = [self.broker_id]
        for r in self.replicas:
            if r == self.broker_id:
                continue
            end = self._leo.get(r)
            if r in self.isr:
                if now - self._caught_up.get(r, now) <= self.lag_s:
                    keep.append(r)
            elif end is not None and end >= max(self.high_watermark, self.epoch_start_offset) and (
                now - self._caught_up.get(r, float("-inf")) <= self.lag_s
            ):
                keep.append(r)
        wanted = tuple(r for r in self.replicas if r in keep)
        return None if set(wanted) == set(self.isr) else wanted

    def isr_stored(self, isr: Iterable[int], leader_end: int) -> bool:
        self.isr = tuple(isr)
        return self.advance(leader_end)

    def enough_replicas(self) -> bool:
        return len(self.isr) >= self.min_insync
