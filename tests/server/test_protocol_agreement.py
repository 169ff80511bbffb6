"""docs/protocol.md and the broker agree (issue 11, "The protocol document, tried as a new user
would"): each place where they disagreed, as a client that read only the document sees it."""

from __future__ import annotations

from rustmq.protocol.api import ApiKey, ErrorCode


def test_commits_with_bad_values_are_invalid_commit(broker, raw) -> None:
    client = raw(broker.producer_port)
    commit = {"api": ApiKey.COMMIT_OFFSETS, "group": "g"}
    negative = client.call({**commit, "offsets": [["default", 0, -5]]})[0]
    assert negative["error"] == ErrorCode.INVALID_COMMIT, negative
    unknown_topic = client.call({**commit, "offsets": [["nope", 0, 1]]})[0]
    assert unknown_topic["error"] == ErrorCode.INVALID_COMMIT, unknown_topic
    unknown_partition = client.call({**commit, "offsets": [["default", 3, 1]]})[0]  # 3 partitions: 0..2
    assert unknown_partition["error"] == ErrorCode.INVALID_COMMIT, unknown_partition
    long_metadata = client.call({**commit, "offsets": [["default", 0, 1]], "metadata": "x" * 4097})[0]
    assert long_metadata["error"] == ErrorCode.INVALID_COMMIT and "4096" in long_metadata["message"]
    assert client.call({**commit, "offsets": [["default", 0, 1]], "metadata": "x" * 4096})[0]["error"] == 0
    fetched = client.call({"api": ApiKey.FETCH_OFFSETS, "group": "g"})[0]
    assert fetched["offsets"] == [["default", 0, 1]]  # nothing of the refused commits was kept
    malformed = client.call({**commit, "offsets": [["default", "zero", 1]]})[0]
    assert malformed["error"] == ErrorCode.INVALID_REQUEST  # the wrong type stays a request error


def test_a_negative_fetch_offset_fails_only_its_partition(broker, raw) -> None:
    client = raw(broker.consumer_port)
    response, _ = client.call({"api": ApiKey.FETCH, "max_wait_ms": 0, "partitions": [
        {"topic": "default", "partition": 0, "offset": -1},
        {"topic": "default", "partition": 1, "offset": 0},
    ]})
    assert response["error"] == 0
    bad, good = response["partitions"]
    assert bad["error"] == ErrorCode.OFFSET_OUT_OF_RANGE and bad["size"] == 0
    assert good["error"] == 0


def test_add_partitions_only_grows_and_unknown_keys(broker, raw) -> None:
    client = raw(broker.producer_port)
    shrink = client.call({"api": ApiKey.ADD_PARTITIONS, "topic": "default", "partitions": 2})[0]
    assert shrink["error"] == ErrorCode.INVALID_CONFIG and "only grow" in shrink["message"]
    # An unknown header key is ignored (a newer client's optional field); an unknown config key
    # is refused (a typo must not silently fall back to the default).
    assert client.call({"api": ApiKey.LIST_TOPICS, "newer_client_field": [1, 2]})[0]["error"] == 0
    typo = client.call({"api": ApiKey.CREATE_TOPIC, "topic": "t", "config": {"retention_mss": 1}})[0]
    assert typo["error"] == ErrorCode.INVALID_CONFIG and "retention_mss" in typo["message"]
