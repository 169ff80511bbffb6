"""Per-subscription and per-topic queue settings overrides: checking, merging, applying to live
partition states, and persistence in the queue_state journal across reopen and compaction
(real journal files in a tmp dir)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rustmq.coordination.queue import (
    QueueConfigError,
    QueueSettings,
    QueueSettingValueError,
    QueueStore,
    check_overrides,
    merge_settings,
)


def offsets_of(delivery) -> list[int]:
    return [] if delivery is None else [o for s, e in delivery.ranges for o in range(s, e)]


@pytest.mark.parametrize(("values", "error"), [
    ({"max_deliveries": 0}, QueueSettingValueError),
    ({"max_deliveries": "2"}, QueueSettingValueError),
    ({"max_deliveries": True}, QueueSettingValueError),
    ({"ack_wait_ms": 13 * 3600 * 1000}, QueueSettingValueError),
    ({"ttl_ms": 0}, QueueSettingValueError),
    ({"priority_weights": [8, 0, 1]}, QueueSettingValueError),
    ({"priority_weights": "8,4,1"}, QueueSettingValueError),
    ({"max_deliveres": 2}, QueueConfigError),
])
def test_each_value_is_checked_alone(values, error) -> None:
    with pytest.raises(error):
        check_overrides(values)


def test_merging_keeps_levels_and_consistency() -> None:
    base = QueueSettings()
    merged = merge_settings(base, {"ttl_ms": 1000, "max_deliveries": 9}, {"max_deliveries": 2, "ttl_ms": None})
    assert merged.max_deliveries == 2 and merged.ttl_ms is None and merged.ack_wait_ms == base.ack_wait_ms
    assert merge_settings(base, {"priority_weights": (1, 1, 1)}).priority_weights == (1, 1, 1)
    with pytest.raises(QueueConfigError, match="levels"):
        merge_settings(base, {"priority_weights": (1, 1)})
    with pytest.raises(QueueConfigError, match="max_lookahead"):
        merge_settings(base, {"max_in_flight": 50_000}, {"max_lookahead": 20_000})
    with pytest.raises(QueueConfigError, match="default_priority"):
        merge_settings(base, {"default_priority": 5})


def test_overrides_apply_per_subscription_on_top_of_the_topic_layer(tmp_path: Path) -> None:
    store = QueueStore.open(tmp_path / "q")
    strict = store.get("strict", "jobs", 0)
    lenient = store.get("lenient", "jobs", 0)
    other_topic = store.get("strict", "mail", 0)
    store.configure(0, "jobs", "strict", {"max_deliveries": 2})
    store.configure(0, "jobs", None, {"ttl_ms": 60_000, "ack_wait_ms": 1000})
    assert strict.settings.max_deliveries == 2 and strict.settings.ttl_ms == 60_000
    assert lenient.settings.max_deliveries == 5 and lenient.settings.ttl_ms == 60_000
    assert other_topic.settings == QueueSettings()
    later = store.get("strict", "jobs", 1)  # a partition first used after the change
    assert later.settings is not None and later.settings.max_deliveries == 2 and later.settings.ack_wait_ms == 1000

    strict.offer(0, 0, 1, 0)
    lenient.offer(0, 0, 1, 0)
    letters = []
    for now in (1, 2):
        for sub in (strict, lenient):
            assert offsets_of(sub.acquire(now, "c", 1)) == [0]
            letters.append((sub.subscription, sub.nack(now, [0], reason=f"fail {now}")))
    dead = [(name, [(d.offset, d.attempts) for d in ds]) for name, ds in letters if ds]
    assert dead == [("strict", [(0, 2)])]
    assert offsets_of(lenient.acquire(3, "c", 1)) == [0]  # the default 5 keeps delivering

    store.configure(0, "jobs", "strict", {}, reset=["max_deliveries"])
    assert strict.settings.max_deliveries == 5
    store.close()


def test_a_topic_ttl_expires_records_undelivered(tmp_path: Path) -> None:
    store = QueueStore.open(tmp_path / "q")
    store.configure(0, "events", None, {"ttl_ms": 1000})
    sub = store.get("s", "events", 0)
    sub.offer(5_000, 0, 10, timestamp_ms=3_000)  # written 2 s ago: already expired
    sub.offer(5_000, 10, 5, timestamp_ms=4_500)
    assert offsets_of(sub.acquire(5_000, "c", 100)) == list(range(10, 15))
    assert sub.counters.expired == 10 and sub.ack_floor == 10
    store.close()


def test_a_change_that_breaks_any_subscription_is_refused_whole(tmp_path: Path) -> None:
    store = QueueStore.open(tmp_path / "q")
    store.configure(0, "jobs", "small", {"max_lookahead": 20_000})
    with pytest.raises(QueueConfigError, match="'small'"):
        store.configure(0, "jobs", None, {"max_in_flight": 50_000, "ttl_ms": 5})
    assert store.overrides == {("small", "jobs"): {"max_lookahead": 20_000}}
    with pytest.raises(QueueSettingValueError):
        store.configure(0, "jobs", "small", {"max_deliveries": 1, "ack_wait_ms": -1})
    with pytest.raises(QueueConfigError):
        store.configure(0, "jobs", "small", {}, reset=["nonsense"])
    assert store.settings_for("small", "jobs").max_deliveries == 5
    store.close()


def test_overrides_survive_reopen_and_apply_to_restored_states(tmp_path: Path) -> None:
    store = QueueStore.open(tmp_path / "q")
    sub = store.get("billing", "orders", 2, start_offset=10)
    sub.offer(0, 10, 5, 0)
    sub.ack(offsets_of(sub.acquire(0, "c", 2)))
    store.persist(0)
    store.configure(1, "orders", "billing", {"max_deliveries": 3, "priority_weights": [1, 1, 1]})
    store.configure(2, "orders", None, {"ttl_ms": 90_000})
    store.configure(3, "orders", "audit", {"ack_wait_ms": 5})
    store.configure(4, "orders", "audit", {}, reset=["ack_wait_ms"])  # back to nothing: a tombstone
    store.flush()
    store.close(clean=False)

    store = QueueStore.open(tmp_path / "q")
    assert store.overrides == {("billing", "orders"): {"max_deliveries": 3, "priority_weights": (1, 1, 1)},
                               (None, "orders"): {"ttl_ms": 90_000}}
    restored = store.subscriptions[("billing", "orders", 2)]
    assert restored.ack_floor == 12
    assert restored.settings == QueueSettings(max_deliveries=3, priority_weights=(1, 1, 1), ttl_ms=90_000)
    assert store.get("audit", "orders", 0).settings == QueueSettings(ttl_ms=90_000)
    described = store.describe("orders", "billing")
    assert described["overrides"] == {"max_deliveries": 3, "priority_weights": [1, 1, 1]}
    assert described["topic_overrides"] == {"ttl_ms": 90_000}
    assert described["effective"]["max_deliveries"] == 3  # type: ignore[index]
    assert [p["partition"] for p in described["partitions"]] == [2]  # type: ignore[union-attr]
    assert store.describe("orders", None)["subscriptions"] == ["audit", "billing"]
    store.close()


def test_overrides_survive_compaction(tmp_path: Path) -> None:
    store = QueueStore.open(tmp_path / "q", compact_bytes=4096)
    store.configure(0, "t", "s", {"max_deliveries": 7})
    store.configure(0, "t", "gone", {"max_deliveries": 4})
    store.configure(0, "t", "gone", {}, reset=["max_deliveries"])
    sub = store.get("s", "t", 0)
    for i in range(0, 20_000, 100):
        sub.offer(0, i, 100, 0)
        got = offsets_of(sub.acquire(0, "c", 100))
        sub.ack(got[1:])
        store.persist(i)
    store.journal.wait_compaction()  # compaction runs beside the writes
    assert store.journal.compactions > 0
    store.flush()
    store.close()
    store = QueueStore.open(tmp_path / "q", compact_bytes=4096)
    assert store.overrides == {("s", "t"): {"max_deliveries": 7}}
    assert store.subscriptions[("s", "t", 0)].settings.max_deliveries == 7
    store.close()


def test_changed_broker_defaults_never_stop_a_start(tmp_path: Path) -> None:
    """Overrides valid under the old defaults but not the new ones are ignored, with a warning."""
    store = QueueStore.open(tmp_path / "q")
    store.configure(0, "t", "s", {"max_lookahead": 12_000, "max_deliveries": 2})
    store.configure(0, "t", None, {"default_priority": 2})
    store.flush()
    store.close()
    store = QueueStore.open(tmp_path / "q", QueueSettings(max_in_flight=20_000, priority_weights=(1, 1)))
    assert store.settings_for("s", "t") == QueueSettings(max_in_flight=20_000, priority_weights=(1, 1))
    store.close()
