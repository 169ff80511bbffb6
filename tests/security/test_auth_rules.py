"""The pure auth rules: token hashing and checking, ACL parsing and decisions, the request table,
and the quota buckets (rustmq.auth)."""

from __future__ import annotations

import pytest

from rustmq.auth import acl, tokens
from rustmq.auth.quotas import Bucket, parse_quotas
from rustmq.protocol.api import ApiKey, ErrorCode, RequestError


def test_a_token_checks_only_against_its_own_hash_and_is_never_stored_in_clear() -> None:
    token, line = tokens.new_token("app", log_n=8)
    assert token.startswith("app:") and token.split(":", 1)[1] not in line
    stored = tokens.parse_file(f"# comment\n\n{line}\n" + tokens.hash_line("other", "s", log_n=8))
    assert tokens.check(stored, token) == "app"
    assert tokens.check(stored, token + "x") is None
    assert tokens.check(stored, "ghost:" + token.split(":", 1)[1]) is None
    assert tokens.check(stored, "no-separator") is None
    # two lines for one principal: either token works (rotation without a gap)
    second, second_line = tokens.new_token("app", log_n=8)
    both = tokens.parse_file(line + "\n" + second_line)
    assert tokens.check(both, token) == tokens.check(both, second) == "app"


@pytest.mark.parametrize(("text", "message"), [
    ("app:plain-secret", "plaintext tokens are refused"),
    ("app:scrypt$14$8$1$!!$AAAA", "line 1"),
    ("bad name:scrypt$14$8$1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==", "expected <principal>"),
    ("app:scrypt$40$8$1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==", "out of range"),
])
def test_bad_token_file_lines_are_named(text: str, message: str) -> None:
    with pytest.raises(tokens.TokenFileError, match="line 1") as error:
        tokens.parse_file(text)
    assert message in str(error.value)


def test_decisions_super_users_deny_beats_allow_prefixes_and_the_default() -> None:
    policy = acl.parse_policy({
        "default": "deny",
        "super_users": ["root"],
        "rules": [
            {"principal": "app", "topic": "orders.*", "allow": ["produce", "describe"]},
            {"principal": "app", "topic": "orders.audit", "deny": ["produce"]},
            {"principal": "*", "group": "*", "allow": ["describe"]},
        ],
    })
    assert policy.allowed("app", "topic", "orders.eu", "produce")
    assert not policy.allowed("app", "topic", "orders.audit", "produce")
    assert policy.allowed("app", "topic", "orders.audit", "describe")
    assert not policy.allowed("app", "topic", "ordersX", "produce")
    assert not policy.allowed("app", "topic", "orders.eu", "delete")
    assert policy.allowed("anyone", "group", "g", "describe") and not policy.allowed("anyone", "group", "g", "consume")
    assert policy.allowed("root", "cluster", "*", "alter")
    assert acl.parse_policy({"default": "allow"}).allowed("x", "topic", "t", "delete")
    assert acl.ALLOW_ALL.allowed("x", "topic", "t", "delete")


@pytest.mark.parametrize(("data", "message"), [
    ({"default": "maybe"}, "default must be allow or deny"),
    ({"rules": [{"principal": "a", "topic": "t", "allow": ["fly"]}]}, "has no verb(s) fly"),
    ({"rules": [{"principal": "a", "topic": "t", "group": "g", "allow": ["consume"]}]}, "exactly one of"),
    ({"rules": [{"principal": "a", "topic": "a*b", "allow": ["consume"]}]}, "prefix ending in '*'"),
    ({"rules": [{"principal": "a", "topic": "t"}]}, "give allow, deny or both"),
    ({"rulez": []}, "unknown key(s) rulez"),
    ({"quotas": {"default": {"produce_bytes_per_s": -1}}}, "positive integer"),
])
def test_bad_acl_files_say_where(data: object, message: str) -> None:
    with pytest.raises(acl.AclFileError) as error:
        acl.parse_policy(data)
    assert message in str(error.value)


def test_the_request_table() -> None:
    need = acl.requirements
    assert need(ApiKey.PRODUCE, {"topic": "t"}) == [("topic", "t", "produce")]
    assert need(ApiKey.FETCH, {"partitions": [{"topic": "b"}, {"topic": "a"}, {"topic": "a"}]}) == [
        ("topic", "a", "consume"), ("topic", "b", "consume")]
    assert need(ApiKey.FETCH, {"replica_id": 2, "partitions": []}) == [("cluster", "*", "replicate")]
    assert need(ApiKey.COMMIT_OFFSETS, {"group": "g", "offsets": [["t", 0, 1]]})[0] == ("group", "g", "alter")
    assert need(ApiKey.COMMIT_OFFSETS, {"group": "g", "member_id": "m", "offsets": []}) == [("group", "g", "consume")]
    assert need(ApiKey.METADATA, {"topics": None}) == []
    assert need(ApiKey.AUTHENTICATE, {}) == []
    assert need(999, {}) == [("cluster", "*", "alter")]  # an API without a line is closed
    with pytest.raises(RequestError) as error:
        need(ApiKey.PRODUCE, {"topic": 5})
    assert error.value.code is ErrorCode.INVALID_REQUEST
    # every API the protocol knows has a deliberate line (none falls to the closed default by accident)
    for key in ApiKey:
        if key not in (ApiKey.METADATA, ApiKey.LIST_TOPICS, ApiKey.AUTHENTICATE, ApiKey.INIT_PRODUCER):
            header = {"topic": "t", "group": "g", "subscription": "s", "topics": ["t"], "offsets": [], "partitions": []}
            assert need(key, header) != [("cluster", "*", "alter")], key


def test_a_bucket_turns_debt_into_delay() -> None:
    bucket = Bucket(1000, now=0.0)
    assert bucket.charge(1000, 0.0) == 0.0  # one second of burst
    assert bucket.charge(500, 0.0) == pytest.approx(0.5)  # 500 in debt at 1000/s
    assert bucket.debt_delay(0.25) == pytest.approx(0.25)
    assert bucket.charge(0, 1.0) == 0.0
    assert parse_quotas({"principals": {"a": {"connections": 3}}}).for_principal("a").connections == 3
