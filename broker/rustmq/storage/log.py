"""Log: every topic under one data directory, each a list of PartitionLogs plus a JSON config.

Layout::

    <data_dir>/topics/<topic>/topic.json     {"name": ..., "partitions": N, "overrides": {...}}
    <data_dir>/topics/<topic>/<partition>/   one PartitionLog directory per partition (0..N-1)
    <data_dir>/trash/                        topics being deleted; emptied on open

A topic stores only its config overrides; its effective config is the Log's default config
merged with them. topic.json is written last (atomically, fsynced), so a topic directory without
one is a creation that crashed half way and is discarded on open. Topic and partition directories
live under `topics/` so that no valid topic name (which may start with a dot) can collide with
the Log's own entries.

The Log owns one BackgroundFlusher thread (see durability) for all partitions. Reads and appends
of partitions, `topic`, `topics` and `enforce_retention` (which the server calls periodically)
run on the owner thread (the server's event loop), like PartitionLog itself.

Topic administration may run on a worker thread, so that creating directories, writing and
fsyncing files and removing a deleted topic's data never block the owner thread:

* `create_topic`, `add_partitions` and `alter_topic_config` from any thread: they are
  serialised by one lock, build everything first and publish last (a topic appears in the
  topic map, copied on write, only once its partitions are open and topic.json is durable; new
  partitions join a topic's list only once topic.json counts them), so the owner thread sees a
  topic whole or not at all;
* deletion in two steps: `detach_topic` on the owner thread (cheap: the topic leaves the map and
  its partitions refuse every later append, read and flush), then `destroy_topic` on any thread
  (closes fds and maps, moves the directory to the trash and removes it). `delete_topic` does
  both on the calling thread.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from rustmq.storage import durability, errors
from rustmq.storage.config import MAX_SEGMENT_BYTES, MIN_SEGMENT_BYTES, LogConfig
from rustmq.storage.partition import (
    PartitionLog,
    _fsync_directory,
    _write_durably,
    make_directories,
)

logger = logging.getLogger("rustmq.storage")

TOPIC_FILE: Final = "topic.json"
DEFAULT_PARTITIONS: Final = 12
MAX_PARTITIONS: Final = 10_000
_TOPIC_NAME: Final = re.compile(r"[A-Za-z0-9._-]{1,249}")


def validate_topic_name(name: str) -> None:
    """InvalidConfigError unless `name` is 1..249 of [A-Za-z0-9._-] and not "." or ".."."""
    if not isinstance(name, str) or not _TOPIC_NAME.fullmatch(name) or name in (".", ".."):
        raise errors.InvalidConfigError(
            f"invalid topic name {name!r}: use 1 to 249 characters of [A-Za-z0-9._-], "
            "not '.' or '..'"
        )


@dataclass
class Topic:
    name: str
    config: LogConfig
    partitions: list[PartitionLog]
    overrides: dict[str, Any] = field(default_factory=dict)


class Log:
    """All topics of a broker. Open with `Log.open`; close with `close()`."""

    def __init__(self, data_dir: Path, default_config: LogConfig, flusher: bool,
                 override_segment_bytes: tuple[int, int]) -> None:
        self.data_dir = data_dir
        self.default_config = default_config
        self.override_segment_bytes = override_segment_bytes
        self._topics: dict[str, Topic] = {}  # replaced, never mutated: safe to iterate anywhere
        self._admin_lock = threading.RLock()  # topic creation, change, deletion and close
        self._flusher = durability.BackgroundFlusher() if flusher else None
        self._closed = False

    @property
    def topics_dir(self) -> Path:
        return self.data_dir / "topics"

    @property
    def trash_dir(self) -> Path:
        return self.data_dir / "trash"

    @classmethod
    def open(cls, data_dir: Path, default_config: LogConfig, *, background_flusher: bool = True,
             override_segment_bytes: tuple[int, int] = (MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES)
             ) -> Log:
        """Open (creating if needed) the data directory and open/recover every partition.

        `override_segment_bytes` (low, high): the range a topic's own `segment_bytes` override
        must lie in (create_topic, alter_topic_config: InvalidConfigError otherwise), narrower
        than the engine's limits when the broker does not trust its clients with them; the
        default config itself is not bound by it, nor topics that already exist.
        """
        low, high = override_segment_bytes
        if not MIN_SEGMENT_BYTES <= low <= high <= MAX_SEGMENT_BYTES:
            raise errors.InvalidConfigError(
                f"override_segment_bytes must lie within [{MIN_SEGMENT_BYTES}, "
                f"{MAX_SEGMENT_BYTES}] with low <= high, not {override_segment_bytes!r}")
        log = cls(Path(data_dir), default_config, background_flusher, (low, high))
        try:
            log._open()
        except BaseException:
            log.close(clean=False)
            raise
        return log

    def _open(self) -> None:
        try:
            make_directories(self.topics_dir)
            make_directories(self.trash_dir)
            for entry in os.scandir(self.trash_dir):
                shutil.rmtree(entry.path, ignore_errors=True)
            names = sorted(entry.name for entry in os.scandir(self.topics_dir) if entry.is_dir())
        except OSError as error:
            raise errors.from_os_error(error, f"opening data directory {self.data_dir}") from error
        for name in names:
            directory = self.topics_dir / name
            try:
                meta = json.loads((directory / TOPIC_FILE).read_bytes())
                partition_count = int(meta["partitions"])
                overrides = dict(meta.get("overrides") or {})
            except (OSError, ValueError, KeyError, TypeError):
                logger.warning("%s: no valid %s (a creation that did not finish); discarding it",
                               directory, TOPIC_FILE)
                self._move_to_trash(directory)
                continue
            config = self.default_config.merged(overrides)
            topic = Topic(name, config, [], overrides)
            self._topics[name] = topic
            for index in range(partition_count):
                topic.partitions.append(self._open_partition(topic, index))

    def _open_partition(self, topic: Topic, index: int) -> PartitionLog:
        partition = PartitionLog.open(self.topics_dir / topic.name / str(index), topic.config)
        if self._flusher is not None:
            self._flusher.register(partition)
        return partition

    # ----------------------------------------------------------------------------- topics

    def topic(self, name: str) -> Topic:
        try:
            return self._topics[name]
        except KeyError:
            raise errors.UnknownTopicError(f"unknown topic {name!r}") from None

    def topics(self) -> list[Topic]:
        return list(self._topics.values())

    def create_topic(self, name: str, partitions: int = DEFAULT_PARTITIONS,
                     overrides: dict[str, Any] | None = None) -> Topic:
        """Create a topic; InvalidConfigError, TopicExistsError or StorageFullError otherwise.

        Any thread (see the module docstring). An empty partition holds a few small files and
        no data blocks: segments allocate their blocks as appends come (rustmq.storage.segment).
        """
        validate_topic_name(name)
        _check_partition_count(partitions)
        overrides = dict(overrides or {})
        config = self.default_config.merged(overrides)
        self._check_override(overrides)
        with self._admin_lock:
            self._check_open()
            if name in self._topics:
                raise errors.TopicExistsError(f"topic {name!r} already exists")
            directory = self.topics_dir / name
            if directory.exists():  # left over from a crash; not a known topic
                self._move_to_trash(directory)
            topic = Topic(name, config, [], overrides)
            try:
                directory.mkdir()
                for index in range(partitions):
                    topic.partitions.append(self._open_partition(topic, index))
                self._write_topic_file(topic, len(topic.partitions))
                _fsync_directory(self.topics_dir)
            except BaseException as error:
                for partition in topic.partitions:
                    self._close_partition(partition, clean=False)
                self._move_to_trash(directory)
                if isinstance(error, OSError):
                    raise errors.from_os_error(error, f"creating topic {name!r}") from error
                raise
            self._topics = {**self._topics, name: topic}  # published whole (copy on write)
        logger.info("created topic %s with %d partitions", name, partitions)
        return topic

    def delete_topic(self, name: str) -> None:
        """`detach_topic` then `destroy_topic` on the calling (owner) thread."""
        self.destroy_topic(self.detach_topic(name))

    def detach_topic(self, name: str) -> Topic:
        """Owner thread: take the topic out of the map; its partitions refuse every later append,
        read and flush from here on. Cheap (no I/O). Pass the result to `destroy_topic`."""
        with self._admin_lock:
            self._check_open()
            topic = self.topic(name)
            self._topics = {key: value for key, value in self._topics.items() if key != name}
        for partition in topic.partitions:
            if self._flusher is not None:
                self._flusher.unregister(partition)
            partition.detach()
        return topic

    def destroy_topic(self, topic: Topic) -> None:
        """Any thread, after `detach_topic`: close the partitions and delete the topic's data
        (views already handed out stay valid: the unlinked files live while mapped). A topic of
        the same name created meanwhile is not touched (its directory is the new one)."""
        with self._admin_lock:
            for partition in topic.partitions:
                partition.close(clean=False)
            if topic.name not in self._topics:
                self._move_to_trash(self.topics_dir / topic.name)
        logger.info("deleted topic %s", topic.name)

    def alter_topic_config(self, name: str, changes: dict[str, Any], reset: list[str]) -> Topic:
        """Set `changes` and drop `reset` from a topic's overrides; the merged config is checked
        whole before anything changes (InvalidConfigError), then topic.json is rewritten and
        every partition uses it from its next decision on (roll, flush, retention, compaction).
        Any thread."""
        with self._admin_lock:
            self._check_open()
            topic = self.topic(name)
            overrides = {key: value for key, value in topic.overrides.items()
                         if key not in set(reset)}
            overrides.update(changes)
            config = self.default_config.merged(overrides)
            if "segment_bytes" in changes:
                self._check_override(overrides)
            previous = topic.overrides, topic.config
            topic.overrides, topic.config = overrides, config
            try:
                self._write_topic_file(topic, len(topic.partitions))
            except BaseException:
                topic.overrides, topic.config = previous
                raise
            for partition in topic.partitions:
                partition.config = config
        return topic

    def add_partitions(self, name: str, total: int) -> Topic:
        """Grow a topic to `total` partitions (never shrinks: InvalidConfigError). Any thread:
        the new partitions join the topic's list only once topic.json counts them."""
        _check_partition_count(total)
        with self._admin_lock:
            self._check_open()
            topic = self.topic(name)
            if total <= len(topic.partitions):
                raise errors.InvalidConfigError(
                    f"topic {name!r} has {len(topic.partitions)} partitions; can only grow, "
                    f"not to {total}"
                )
            first_new = len(topic.partitions)
            added: list[PartitionLog] = []
            try:
                for index in range(first_new, total):
                    added.append(self._open_partition(topic, index))
                self._write_topic_file(topic, total)
            except BaseException as error:
                for partition in added:
                    self._close_partition(partition, clean=False)
                    shutil.rmtree(partition.directory, ignore_errors=True)
                if isinstance(error, OSError):
                    raise errors.from_os_error(error, f"adding partitions to {name!r}") from error
                raise
            topic.partitions.extend(added)
        return topic

    def enforce_retention(self, now_ms: int,
                          floor: Callable[[Topic, int], int | None] | None = None) -> int:
        """Apply every topic's retention; returns the number of segments deleted.

        `floor(topic, partition)` gives the offset from which that partition must be kept (the
        "keep until consumed" floor, see LogConfig); it is asked only for topics that name
        groups or queue subscriptions to wait for, and storage never interprets it further.
        Without `floor`, such topics keep everything.
        """
        self._check_open()
        deleted = 0
        for topic in list(self._topics.values()):
            config = topic.config
            waits = bool(config.retain_until_consumed_by) or config.retain_until_settled
            for index, partition in enumerate(topic.partitions):
                keep_from = None
                if waits:  # without a floor callback nothing can be known consumed: keep it
                    keep_from = floor(topic, index) if floor is not None else 0
                deleted += partition.enforce_retention(now_ms, keep_from)
        return deleted

    def close(self, clean: bool = True) -> None:
        """Stop the flusher and close every partition (clean: flush + clean-shutdown markers)."""
        with self._admin_lock:
            if self._closed:
                return
            self._closed = True
            if self._flusher is not None:
                self._flusher.close()
            for topic in self._topics.values():
                for partition in topic.partitions:
                    partition.close(clean=clean)

    # ----------------------------------------------------------------------------- helpers

    def _check_open(self) -> None:
        if self._closed:
            raise errors.LogClosedError(f"the log in {self.data_dir} is closed")

    def _close_partition(self, partition: PartitionLog, clean: bool) -> None:
        if self._flusher is not None:
            self._flusher.unregister(partition)
        partition.close(clean=clean)

    def _check_override(self, overrides: dict[str, Any]) -> None:
        value = overrides.get("segment_bytes")
        low, high = self.override_segment_bytes
        if value is not None and not low <= value <= high:
            raise errors.InvalidConfigError(
                f"segment_bytes must be between {low} and {high} (this broker's limit for a "
                f"topic's own setting), not {value}")

    def _write_topic_file(self, topic: Topic, partitions: int) -> None:
        meta = {"name": topic.name, "partitions": partitions, "overrides": topic.overrides}
        _write_durably(self.topics_dir / topic.name / TOPIC_FILE,
                       json.dumps(meta, indent=2, sort_keys=True).encode())

    def _move_to_trash(self, directory: Path) -> None:
        if not directory.exists():
            return
        target = self.trash_dir / f"{directory.name}-{uuid.uuid4().hex}"
        try:
            os.rename(directory, target)
            _fsync_directory(self.topics_dir)
        except OSError as error:
            raise errors.from_os_error(error, f"deleting {directory}") from error
        shutil.rmtree(target, ignore_errors=True)


def _check_partition_count(count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_PARTITIONS:
        raise errors.InvalidConfigError(
            f"partition count must be an integer from 1 to {MAX_PARTITIONS}, not {count!r}"
        )
