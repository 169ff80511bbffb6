"""The storage engine's exceptions: one tree under `StorageError`, each with a readable message,
plus `CorruptBatchError`, the record-batch format's own (rustmq.protocol.batch), which the engine
raises too and which is therefore not a StorageError.

The server maps these to wire error codes, so every class names one condition a client can act on.
OS errors are translated at the edge by `from_os_error` so callers never have to inspect errno.
"""

from __future__ import annotations

import errno

# The record-batch format's validation error (rustmq.protocol.batch); the engine raises it too.
from rustmq.protocol.batch import CorruptBatchError as CorruptBatchError


class StorageError(Exception):
    """Base class of everything the storage engine raises on purpose."""


class BatchTooLargeError(StorageError):
    """A single batch is larger than a whole segment (raise segment_bytes or send smaller batches)."""


class OffsetOutOfRangeError(StorageError):
    """A read asked for an offset before the log start or after the log end."""

    def __init__(self, offset: int, start_offset: int, end_offset: int) -> None:
        super().__init__(
            f"offset {offset} is out of range: the log holds offsets [{start_offset}, {end_offset})"
        )
        self.offset = offset
        self.start_offset = start_offset
        self.end_offset = end_offset


class StorageFullError(StorageError):
    """The disk (or quota, or file size limit) is full: nothing was written; free space and retry."""


class StorageIOError(StorageError):
    """Any other operating-system I/O failure."""


class UnknownTopicError(StorageError):
    """No topic of that name exists."""


class TopicExistsError(StorageError):
    """A topic of that name already exists."""


class InvalidConfigError(StorageError):
    """A configuration value (or a topic name, or a partition count) is not acceptable."""


class StaleCompactionError(StorageError):
    """A compaction plan no longer matches the partition (retention or another swap moved it)."""


class PartitionBusyError(StorageError):
    """The partition's files are being rebuilt on a worker thread (a follower's truncation or
    restart, `PartitionLog.begin_truncate`): nothing can be read or appended until it is done."""


class LogClosedError(StorageError):
    """The partition or log was closed (or failed an fsync and stopped accepting writes)."""


_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def from_os_error(error: OSError, action: str) -> StorageError:
    """Translate an OSError raised while doing `action` into StorageFullError or StorageIOError."""
    detail = f"{action}: {error.strerror or error} (errno {error.errno})"
    if error.errno in _FULL_ERRNOS:
        return StorageFullError(f"no space left: {detail}")
    return StorageIOError(detail)
