"""A Jepsen-style history checker for produce/consume runs against a cluster.

Writers record every produce as ``invoked`` and then ``ok`` (acknowledged, with its partition and
offset), ``fail`` (a definite error) or ``info`` (unknown outcome: timeout, lost connection; it
may or may not have been stored). Readers record every (partition, offset, value) they consume.
Values are unique. ``check`` reports, after Jepsen's Kafka workload:

- lost: an ``ok`` value that no reader read (readers drain to the end before checking);
- duplicated: a value read at more than one offset;
- inconsistent: one (partition, offset) read with two different values;
- reordered: a writer's ``ok`` values whose offsets in their partition do not grow in the order
  the writer had them acknowledged (each writer waits for each ack before the next send);
- aborted: a value read whose produce returned ``fail``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any


@dataclass
class History:
    ok: dict[bytes, tuple[int, int]] = field(default_factory=dict)  # value -> (partition, offset)
    writer_order: dict[str, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    failed: set[bytes] = field(default_factory=set)
    unknown: set[bytes] = field(default_factory=set)
    reads: dict[tuple[int, int], set[bytes]] = field(default_factory=lambda: defaultdict(set))
    read_at: dict[bytes, set[tuple[int, int]]] = field(default_factory=lambda: defaultdict(set))

    def acked(self, writer: str, value: bytes, partition: int, offset: int) -> None:
        self.ok[value] = (partition, offset)
        self.writer_order[writer].append(value)

    def fail(self, value: bytes) -> None:
        self.failed.add(value)

    def info(self, value: bytes) -> None:
        self.unknown.add(value)

    def read(self, partition: int, offset: int, value: bytes) -> None:
        self.reads[(partition, offset)].add(value)
        self.read_at[value].add((partition, offset))

    def check(self) -> dict[str, Any]:
        lost = sorted(v for v in self.ok if v not in self.read_at)
        duplicated = sorted(v for v, at in self.read_at.items() if len(at) > 1)
        inconsistent = sorted(k for k, values in self.reads.items() if len(values) > 1)
        aborted = sorted(v for v in self.failed if v in self.read_at)
        reordered = []
        for values in self.writer_order.values():
            last: dict[int, int] = {}
            for value in values:
                partition, offset = self.ok[value]
                if offset <= last.get(partition, -1):
                    reordered.append(value)
                last[partition] = offset
        wrong_offset = sorted(v for v, (p, o) in self.ok.items() if v in self.read_at and (p, o) not in self.read_at[v])
        return {
            "acknowledged": len(self.ok), "failed": len(self.failed), "unknown": len(self.unknown),
            "read": len(self.read_at), "recovered_unknown": len(self.unknown & set(self.read_at)),
            "lost": len(lost), "duplicated": len(duplicated), "inconsistent": len(inconsistent),
            "aborted": len(aborted), "reordered": len(reordered), "wrong_offset": len(wrong_offset),
            "examples": {"lost": [v.decode() for v in lost[:5]], "duplicated": [v.decode() for v in duplicated[:5]],
                         "inconsistent": [list(k) for k in inconsistent[:5]], "wrong_offset": [v.decode() for v in wrong_offset[:5]]},
        }


@dataclass
class QueueHistory:
    """Deliveries of a shared queue subscription, for lost and duplicated deliveries.

    ``published`` values are acknowledged produces (unique values); ``delivered`` records each
    delivery (value, consumer, attempt); ``acked`` the values whose ack the broker confirmed,
    with the number of deliveries seen before the confirmation; ``released`` values whose lease
    the test let expire, nacked, or that were in flight when the coordinator died (each such
    event allows one more delivery). ``check`` reports:

    - lost: a published value never delivered;
    - duplicated: a value delivered more often than 1 + its releases (two consumers got it at
      once, or it came again though nothing released it);
    - after_ack: a value delivered again after its ack was confirmed (an ack the cluster lost).
    """

    published: set[bytes] = field(default_factory=set)
    deliveries: dict[bytes, list[str]] = field(default_factory=lambda: defaultdict(list))
    acked: dict[bytes, int] = field(default_factory=dict)
    released: dict[bytes, int] = field(default_factory=lambda: defaultdict(int))

    def publish(self, value: bytes) -> None:
        self.published.add(value)

    def deliver(self, value: bytes, consumer: str) -> None:
        self.deliveries[value].append(consumer)

    def ack_confirmed(self, value: bytes) -> None:
        self.acked.setdefault(value, len(self.deliveries[value]))

    def release(self, value: bytes) -> None:
        self.released[value] += 1

    def in_flight(self) -> list[bytes]:
        """Delivered, not acked (their lease may be held right now)."""
        return [v for v in self.deliveries if v not in self.acked]

    def check(self) -> dict[str, Any]:
        lost = sorted(v for v in self.published if not self.deliveries.get(v))
        duplicated = sorted(v for v, got in self.deliveries.items() if len(got) > 1 + self.released.get(v, 0))
        after_ack = sorted(v for v, seen in self.acked.items() if len(self.deliveries[v]) > seen)
        return {
            "published": len(self.published), "delivered": len(self.deliveries),
            "deliveries": sum(len(got) for got in self.deliveries.values()), "acked": len(self.acked),
            "lost": len(lost), "duplicated": len(duplicated), "after_ack": len(after_ack),
            "examples": {"lost": [v.decode() for v in lost[:5]],
                         "duplicated": [[v.decode(), self.deliveries[v]] for v in duplicated[:5]],
                         "after_ack": [v.decode() for v in after_ack[:5]]},
        }
