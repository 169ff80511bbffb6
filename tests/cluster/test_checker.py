"""The checker itself must catch what it claims to catch."""

from __future__ import annotations

from checker import History, QueueHistory


def test_a_clean_history_passes() -> None:
    h = History()
    h.acked("w", b"a", 0, 0)
    h.acked("w", b"b", 0, 1)
    h.read(0, 0, b"a")
    h.read(0, 1, b"b")
    r = h.check()
    assert (r["lost"], r["duplicated"], r["inconsistent"], r["reordered"], r["aborted"]) == (0, 0, 0, 0, 0)


def test_each_anomaly_is_reported() -> None:
    h = History()
    h.acked("w", b"a", 0, 5)
    h.acked("w", b"b", 0, 3)  # acknowledged later at a lower offset: reordered
    h.acked("w", b"c", 0, 7)  # never read: lost
    h.fail(b"d")
    h.info(b"e")
    h.read(0, 5, b"a")
    h.read(0, 3, b"b")
    h.read(0, 9, b"b")  # b at two offsets: duplicated
    h.read(0, 4, b"d")  # a failed write that was read: aborted
    h.read(0, 4, b"x")  # two values at one offset: inconsistent
    h.read(0, 8, b"e")  # an unknown outcome that did land
    r = h.check()
    assert r["lost"] == 1 and r["examples"]["lost"] == ["c"]
    assert r["duplicated"] == 1 and r["inconsistent"] == 1 and r["aborted"] == 1
    assert r["reordered"] == 1 and r["recovered_unknown"] == 1


def test_the_queue_checker_reports_lost_duplicated_and_after_ack_deliveries() -> None:
    h = QueueHistory()
    for value in (b"a", b"b", b"c", b"d", b"e"):
        h.publish(value)
    h.deliver(b"a", "x")
    h.ack_confirmed(b"a")
    h.deliver(b"a", "y")  # delivered again after its ack was confirmed: after_ack (and duplicated)
    h.deliver(b"b", "x")
    h.deliver(b"b", "y")  # two consumers, nothing released it: duplicated
    h.deliver(b"c", "x")
    h.release(b"c")  # its lease was let go: one more delivery is fine
    h.deliver(b"c", "y")
    h.deliver(b"d", "x")  # e never delivered: lost
    r = h.check()
    assert (r["lost"], r["duplicated"], r["after_ack"]) == (1, 2, 1), r
    assert r["examples"]["lost"] == ["e"] and r["examples"]["after_ack"] == ["a"]
    assert sorted(h.in_flight()) == [b"b", b"c", b"d"]
