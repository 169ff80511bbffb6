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

The Log owns one BackgroundFlusher thread (see durability) for all partitions. Everything else is
called from the owner thread (the server's event loop), like PartitionLog itself; that includes
`enforce_retention`, which the server calls periodically.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from rustmq.storage import durability, errors
from rustmq.storage.config import LogConfig
from rustmq.storage.partition import PartitionLog, _fsync_directory, _write_durably

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

    def __init__(self, data_dir: Path, default_config: LogConfig, flusher: bool) -> None:
        self.data_dir = data_dir
        self.default_config = default_config
        self._topics: dict[str, Topic] = {}
        self._flusher = durability.BackgroundFlusher() if flusher else None
        self._closed = False

    @property
    def topics_dir(self) -> Path:
        return self.data_dir / "topics"

    @property
    def trash_dir(self) -> Path:
        return self.data_dir / "trash"

    @classmethod
    def open(cls, data_dir: Path, default_config: LogConfig, *, background_flusher: bool = True
             ) -> Log:
        """Open (creating if needed) the data directory and open/recover every partition."""
        log = cls(Path(data_dir), default_config, background_flusher)
        try:
            log._open()
        except BaseException:
            log.close(clean=False)
            raise
        return log

    def _open(self) -> None:
        try:
            self.topics_dir.mkdir(parents=True, exist_ok=True)
            self.trash_dir.mkdir(parents=True, exist_ok=True)
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
                self._open_partition(topic, index)

    def _open_partition(self, topic: Topic, index: int) -> PartitionLog:
        partition = PartitionLog.open(self.topics_dir / topic.name / str(index), topic.config)
        topic.partitions.append(partition)
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
        """Create a topic; InvalidConfigError, TopicExistsError or StorageFullError otherwise."""
        self._check_open()
        validate_topic_name(name)
        _check_partition_count(partitions)
        overrides = dict(overrides or {})
        config = self.default_config.merged(overrides)
        if name in self._topics:
            raise errors.TopicExistsError(f"topic {name!r} already exists")
        directory = self.topics_dir / name
        if directory.exists():  # left over from a crash; not a known topic
            self._move_to_trash(directory)
        topic = Topic(name, config, [], overrides)
        try:
            directory.mkdir()
            for index in range(partitions):
                self._open_partition(topic, index)
            self._write_topic_file(topic)
            _fsync_directory(self.topics_dir)
        except BaseException as error:
            for partition in topic.partitions:
                self._close_partition(partition, clean=False)
            self._move_to_trash(directory)
            if isinstance(error, OSError):
                raise errors.from_os_error(error, f"creating topic {name!r}") from error
            raise
        self._topics[name] = topic
        logger.info("created topic %s with %d partitions", name, partitions)
        return topic

    def delete_topic(self, name: str) -> None:
        """Close the topic's partitions and delete its data (views already handed out stay valid)."""
        self._check_open()
        topic = self.topic(name)
        del self._topics[name]
        for partition in topic.partitions:
            self._close_partition(partition, clean=False)
        self._move_to_trash(self.topics_dir / name)
        logger.info("deleted topic %s", name)

    def alter_topic_config(self, name: str, changes: dict[str, Any], reset: list[str]) -> Topic:
        """Set `changes` and drop `reset` from a topic's overrides; the merged config is checked
        whole before anything changes (InvalidConfigError), then topic.json is rewritten and
        every partition uses it from its next decision on (roll, flush, retention, compaction)."""
        self._check_open()
        topic = self.topic(name)
        overrides = {key: value for key, value in topic.overrides.items() if key not in set(reset)}
        overrides.update(changes)
        config = self.default_config.merged(overrides)
        previous = topic.overrides, topic.config
        topic.overrides, topic.config = overrides, config
        try:
            self._write_topic_file(topic)
        except BaseException:
            topic.overrides, topic.config = previous
            raise
        for partition in topic.partitions:
            partition.config = config
        return topic

    def add_partitions(self, name: str, total: int) -> Topic:
        """Grow a topic to `total` partitions (never shrinks: InvalidConfigError)."""
        self._check_open()
        topic = self.topic(name)
        _check_partition_count(total)
        if total <= len(topic.partitions):
            raise errors.InvalidConfigError(
                f"topic {name!r} has {len(topic.partitions)} partitions; can only grow, not to {total}"
            )
        first_new = len(topic.partitions)
        try:
            for index in range(first_new, total):
                self._open_partition(topic, index)
            self._write_topic_file(topic)
        except BaseException as error:
            for partition in topic.partitions[first_new:]:
                self._close_partition(partition, clean=False)
                shutil.rmtree(partition.directory, ignore_errors=True)
            del topic.partitions[first_new:]
            if isinstance(error, OSError):
                raise errors.from_os_error(error, f"adding partitions to {name!r}") from error
            raise
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

    def _write_topic_file(self, topic: Topic) -> None:
        meta = {"name": topic.name, "partitions": len(topic.partitions), "overrides": topic.overrides}
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
