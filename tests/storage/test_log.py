"""Log: topics with partitions and a JSON config, persisted across restarts."""

from __future__ import annotations

import json

import pytest

from rustmq.storage import errors
from rustmq.storage.log import Log
from storage_testlib import make_batch, read_all, small_config, stamped


def test_topics_partitions_data_and_overrides_survive_a_restart(tmp_path) -> None:
    log = Log.open(tmp_path, small_config())
    topic = log.create_topic("orders.v1", 3, {"retention_messages": 1000})
    assert topic.config.retention_messages == 1000 and len(topic.partitions) == 3
    raw = make_batch(5)
    topic.partitions[2].append(raw)
    log.add_partitions("orders.v1", 5)
    log.close()
    meta = json.loads((tmp_path / "topics" / "orders.v1" / "topic.json").read_text())
    assert meta == {"name": "orders.v1", "partitions": 5, "overrides": {"retention_messages": 1000}}

    log = Log.open(tmp_path, small_config(segment_bytes=8192))  # a new broker default ...
    topic = log.topic("orders.v1")
    assert len(topic.partitions) == 5
    assert topic.config.segment_bytes == 8192  # ... reaches topics that did not override it
    assert topic.config.retention_messages == 1000
    assert read_all(topic.partitions[2]) == stamped(raw, 0)
    assert all(p.recovery.clean_shutdown for p in topic.partitions)
    log.close()


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a b", "x" * 250, "ü"])
def test_invalid_topic_names_are_refused(tmp_path, name) -> None:
    log = Log.open(tmp_path, small_config())
    with pytest.raises(errors.InvalidConfigError, match="invalid topic name"):
        log.create_topic(name, 1)
    log.close()


def test_topic_errors_are_specific(tmp_path) -> None:
    log = Log.open(tmp_path, small_config())
    log.create_topic(".hidden-ok_1", 1)
    with pytest.raises(errors.TopicExistsError):
        log.create_topic(".hidden-ok_1", 1)
    with pytest.raises(errors.UnknownTopicError):
        log.topic("nope")
    with pytest.raises(errors.UnknownTopicError):
        log.delete_topic("nope")
    with pytest.raises(errors.InvalidConfigError, match="partition count"):
        log.create_topic("zero", 0)
    with pytest.raises(errors.InvalidConfigError, match="unknown config key"):
        log.create_topic("typo", 1, {"retention_msgs": 5})
    with pytest.raises(errors.InvalidConfigError, match="can only grow"):
        log.add_partitions(".hidden-ok_1", 1)
    assert [t.name for t in log.topics()] == [".hidden-ok_1"]
    log.close()
    with pytest.raises(errors.LogClosedError):
        log.create_topic("late", 1)


def test_delete_topic_removes_its_data_but_not_views_already_served(tmp_path) -> None:
    log = Log.open(tmp_path, small_config())
    partition = log.create_topic("gone", 1).partitions[0]
    raw = make_batch(1)
    partition.append(raw)
    held = partition.read(0, 1 << 20)
    log.delete_topic("gone")
    assert not (tmp_path / "topics" / "gone").exists()
    assert list((tmp_path / "trash").iterdir()) == []
    assert bytes(held.views[0]) == stamped(raw, 0)
    log.create_topic("gone", 2)  # the name is free again, with fresh data
    assert log.topic("gone").partitions[0].end_offset == 0
    log.close()


def test_a_half_created_topic_is_discarded_on_open(tmp_path) -> None:
    log = Log.open(tmp_path, small_config())
    log.create_topic("whole", 1)
    log.close()
    (tmp_path / "topics" / "half" / "0").mkdir(parents=True)  # crashed before topic.json
    log = Log.open(tmp_path, small_config())
    assert [t.name for t in log.topics()] == ["whole"]
    assert not (tmp_path / "topics" / "half").exists()
    log.close()


def test_unclean_close_recovers_every_partition(tmp_path) -> None:
    log = Log.open(tmp_path, small_config(), background_flusher=False)
    topic = log.create_topic("t", 2)
    for i in range(30):
        topic.partitions[i % 2].append(make_batch(i))
    log.close(clean=False)
    log = Log.open(tmp_path, small_config())
    assert [p.end_offset for p in log.topic("t").partitions] == [45, 45]
    assert not any(p.recovery.clean_shutdown for p in log.topic("t").partitions)
    assert log.enforce_retention(0) == 0
    log.close()
