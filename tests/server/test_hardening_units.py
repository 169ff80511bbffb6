"""Work and memory a request can force on the broker, measured on the server's own functions
(issue 11): counts are checked before anything is expanded or allocated."""

from __future__ import annotations

import tracemalloc

import pytest

from rustmq.protocol.api import ErrorCode, RequestError
from rustmq.server import coordination_handlers


def test_ranges_beyond_the_offset_limit_are_refused_before_they_are_expanded() -> None:
    header = {"ranges": [[0, 1_000_000], [2_000_000, 3_000_000]]}  # 2 million offsets, 50 bytes
    tracemalloc.start()
    try:
        with pytest.raises(RequestError) as refused:
            coordination_handlers._offsets(header)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.code is ErrorCode.INVALID_REQUEST
    assert "1,000,000" in refused.value.message
    assert peak < 1 << 20, f"refusing a 50-byte request allocated {peak} bytes"


def test_offsets_and_ranges_within_the_limit_are_all_returned() -> None:
    got = coordination_handlers._offsets({"offsets": [7, 3], "ranges": [[10, 13], [20, 20]]})
    assert sorted(got) == [3, 7, 10, 11, 12]


async def test_a_long_poll_over_many_partitions_keeps_one_registration_per_partition(tmp_path) -> None:
    """The FETCH waiter pattern: wait on every partition, get woken by one append, wait again.
    Registrations must stay one per (waiter, partition), not pile up with every append."""
    from rustmq.server.broker import Broker
    from rustmq.server.settings import ServerSettings
    from rustmq.server.stats import BrokerStats
    from rustmq.storage import durability
    from rustmq.storage.config import LogConfig
    from rustmq.storage.log import Log

    log = Log.open(tmp_path, LogConfig(segment_bytes=1 << 16), background_flusher=False)
    committer = durability.GroupCommitter()
    try:
        broker = Broker(log, committer, ServerSettings(), BrokerStats())
        topic = broker.create_topic("wide", 200, None)
        plogs = list(topic.partitions)
        woken = []

        def wake() -> None:
            woken.append(1)
            if len(woken) <= 4 * len(plogs):  # (before the fix the wake-ups multiplied without end)
                broker.wait_for_data(plogs, wake)  # what a long poll that is not yet satisfied does

        broker.wait_for_data(plogs, wake)
        from rustmq.protocol import batch as record_batch
        from rustmq.protocol import records

        built = record_batch.build_batch(records.encode_body([[0, None, b"x", None]]), record_count=1,
                                          first_timestamp_ms=1, max_timestamp_ms=1)
        for index in range(len(plogs)):
            broker.produce("wide", index, None, built)
        assert len(woken) == len(plogs)
        registrations = sum(len(waiters) for waiters in broker._waiters.values())
        assert registrations <= len(plogs), f"{registrations} registrations for one waiter on {len(plogs)} partitions"
        broker.stop_waiting(plogs, wake)
        assert not broker._waiters
    finally:
        committer.close()
        log.close()
