"""The access policy (ACL file) and the table of what each request needs.

ACL file (YAML; reloaded when it changes)::

    default: deny                 # allow | deny: what a request matching no rule gets
    super_users: [admin, broker]  # principals allowed everything
    rules:
      - principal: app            # a principal, or "*" for everyone (ANONYMOUS included)
        topic: "orders.*"         # or group: / subscription: / cluster: ; "*" all, "x*" prefix, else exact
        allow: [produce, describe]
        deny: [delete]            # optional; a matching deny beats any allow
    quotas:                       # optional, rustmq.auth.quotas
      default: {produce_bytes_per_s: 10485760}
      principals: {app: {fetch_bytes_per_s: 52428800, connections: 50}}
      connections_per_address: 200

Allowing any verb on a topic, group or subscription implies ``describe`` of it (as in Kafka);
a deny of ``describe`` still wins. Without an ACL file the broker allows everything (compatible with brokers before ACLs); an ACL
file without ``default`` means ``deny``. Decisions: super-user, else any matching deny rule
refuses, else any matching allow rule grants, else the default.

``requirements`` is the one table from a request to the (resource, name, verb) triples it needs
(docs/security.md prints it); it checks the types of the fields it reads so that a malformed
request is refused as INVALID_REQUEST before any handler sees it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from rustmq.auth.quotas import QuotaPolicy, parse_quotas
from rustmq.protocol.api import ApiKey, ErrorCode, RequestError

ANONYMOUS: Final = "ANONYMOUS"
VERBS: Final[dict[str, frozenset[str]]] = {
    "topic": frozenset({"produce", "consume", "describe", "create", "alter", "delete"}),
    "group": frozenset({"consume", "describe", "alter"}),
    "subscription": frozenset({"consume", "describe", "alter"}),
    "cluster": frozenset({"describe", "alter", "replicate"}),
}


class AclFileError(ValueError):
    """An ACL file that does not parse; the message says where."""


@dataclass(frozen=True, slots=True)
class Rule:
    principal: str  # "*" matches every principal
    resource: str
    pattern: str  # "*" all, "x*" prefix "x", else exact
    verbs: frozenset[str]
    allow: bool

    def matches(self, principal: str, resource: str, name: str, verb: str) -> bool:
        if self.resource != resource or verb not in self.verbs:
            return False
        if self.principal != "*" and self.principal != principal:
            return False
        pattern = self.pattern
        if pattern.endswith("*"):
            return name.startswith(pattern[:-1])
        return name == pattern


@dataclass(frozen=True, slots=True)
class Policy:
    default_allow: bool = True
    super_users: frozenset[str] = frozenset()
    rules: tuple[Rule, ...] = ()
    quotas: QuotaPolicy = field(default_factory=QuotaPolicy)

    def allowed(self, principal: str, resource: str, name: str, verb: str) -> bool:
        if principal in self.super_users:
            return True
        granted = False
        for rule in self.rules:
            if rule.matches(principal, resource, name, verb):
                if not rule.allow:
                    return False
                granted = True
        return granted or self.default_allow


ALLOW_ALL: Final = Policy()


def parse_policy(data: Any) -> Policy:
    """A Policy from the decoded YAML; AclFileError naming the offending entry."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AclFileError("the ACL file must hold a mapping")
    unknown = sorted(set(data) - {"default", "super_users", "rules", "quotas"})
    if unknown:
        raise AclFileError(f"unknown key(s) {', '.join(map(str, unknown))} (expected default, super_users, rules, quotas)")
    default = data.get("default", "deny")
    if default not in ("allow", "deny"):
        raise AclFileError(f"default must be allow or deny, not {default!r}")
    supers = data.get("super_users") or []
    if not isinstance(supers, list) or not all(isinstance(s, str) and s for s in supers):
        raise AclFileError("super_users must be a list of principal names")
    raw_rules = data.get("rules") or []
    if not isinstance(raw_rules, list):
        raise AclFileError("rules must be a list")
    rules: list[Rule] = []
    for index, raw in enumerate(raw_rules):
        rules.extend(_parse_rule(index, raw))
    try:
        quotas = parse_quotas(data.get("quotas"))
    except ValueError as exc:
        raise AclFileError(f"quotas: {exc}") from None
    return Policy(default == "allow", frozenset(supers), tuple(rules), quotas)


def _parse_rule(index: int, raw: Any) -> list[Rule]:
    where = f"rules[{index}]"
    if not isinstance(raw, dict):
        raise AclFileError(f"{where} must be a mapping")
    unknown = sorted(set(raw) - {"principal", "allow", "deny", *VERBS})
    if unknown:
        raise AclFileError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}")
    principal = raw.get("principal")
    if not isinstance(principal, str) or not principal:
        raise AclFileError(f"{where}: principal must be a name or '*'")
    resources = [name for name in VERBS if name in raw]
    if len(resources) != 1:
        raise AclFileError(f"{where}: name exactly one of {', '.join(VERBS)}")
    resource = resources[0]
    pattern = raw[resource]
    if not isinstance(pattern, str) or not pattern or "*" in pattern[:-1]:
        raise AclFileError(f"{where}: {resource} must be a name, a prefix ending in '*', or '*'")
    found: list[Rule] = []
    for effect in ("allow", "deny"):
        verbs = raw.get(effect)
        if verbs is None:
            continue
        if verbs == "*" or verbs == ["*"]:
            verbs = sorted(VERBS[resource])
        if not isinstance(verbs, list) or not verbs or not all(isinstance(v, str) for v in verbs):
            raise AclFileError(f"{where}: {effect} must be a list of verbs")
        bad = sorted(set(verbs) - VERBS[resource])
        if bad:
            raise AclFileError(f"{where}: {resource} has no verb(s) {', '.join(bad)} (its verbs: {', '.join(sorted(VERBS[resource]))})")
        granted = set(verbs)
        if effect == "allow" and resource != "cluster" and granted - {"describe"}:
            granted.add("describe")  # as in Kafka, any right on a resource implies seeing it
        found.append(Rule(principal, resource, pattern, frozenset(granted), effect == "allow"))
    if not found:
        raise AclFileError(f"{where}: give allow, deny or both")
    return found


# -- what each request needs ----------------------------------------------------------------------

Need = tuple[str, str, str]  # (resource, name, verb)


def _str(header: dict[str, Any], name: str) -> str:
    value = header.get(name)
    if not isinstance(value, str):
        raise RequestError(ErrorCode.INVALID_REQUEST, f"'{name}' must be a string")
    return value


def _optional_str(header: dict[str, Any], name: str) -> str | None:
    value = header.get(name)
    if value is not None and not isinstance(value, str):
        raise RequestError(ErrorCode.INVALID_REQUEST, f"'{name}' must be a string or nil")
    return value


def _list(header: dict[str, Any], name: str) -> list[Any]:
    value = header.get(name)
    if not isinstance(value, list):
        raise RequestError(ErrorCode.INVALID_REQUEST, f"'{name}' must be an array")
    return value


def _topic(name: str, verb: str) -> Need:
    return ("topic", name, verb)


def requirements(api_key: int, header: dict[str, Any]) -> list[Need]:
    """What a request needs (docs/security.md, "What each request needs"). LIST_TOPICS and a
    METADATA for all topics need nothing here: their answers are filtered to the topics the
    principal may describe. AUTHENTICATE needs nothing; an API this table does not name needs
    cluster alter (so a new API is closed until it is given its line)."""
    if api_key in (ApiKey.PRODUCE, ApiKey.PRODUCE_IDEMPOTENT):
        return [_topic(_str(header, "topic"), "produce")]
    if api_key == ApiKey.FETCH:
        if header.get("replica_id") is not None:
            return [("cluster", "*", "replicate")]
        entries = _list(header, "partitions")
        names = {_str(entry, "topic") if isinstance(entry, dict) else _bad("partitions") for entry in entries}
        return [_topic(name, "consume") for name in sorted(names)]
    if api_key in (ApiKey.LIST_OFFSETS, ApiKey.DESCRIBE_TOPIC):
        return [_topic(_str(header, "topic"), "describe")]
    if api_key == ApiKey.METADATA:
        topics = header.get("topics")
        if topics is None:
            return []
        if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            raise RequestError(ErrorCode.INVALID_REQUEST, "'topics' must be an array of strings or nil")
        verbs = ("describe", "produce") if header.get("create") is True else ("describe",)
        return [_topic(name, verb) for name in topics for verb in verbs]
    if api_key == ApiKey.CREATE_TOPIC:
        return [_topic(_str(header, "topic"), "create")]
    if api_key == ApiKey.DELETE_TOPIC:
        return [_topic(_str(header, "topic"), "delete")]
    if api_key in (ApiKey.ADD_PARTITIONS, ApiKey.ALTER_TOPIC_CONFIG, ApiKey.DLQ_REPLAY):
        return [_topic(_str(header, "topic"), "alter")]
    if api_key in (ApiKey.BROKER_STATS, ApiKey.LIST_GROUPS):
        return [("cluster", "*", "describe")]
    if api_key == ApiKey.JOIN_GROUP:
        topics = _list(header, "topics")
        if not all(isinstance(t, str) for t in topics):
            _bad("topics")
        return [("group", _str(header, "group"), "consume"), *(_topic(t, "describe") for t in sorted(set(topics)))]
    if api_key in (ApiKey.HEARTBEAT, ApiKey.LEAVE_GROUP):
        return [("group", _str(header, "group"), "consume")]
    if api_key == ApiKey.COMMIT_OFFSETS:
        group = _str(header, "group")
        offsets = _list(header, "offsets")
        names = {entry[0] if isinstance(entry, list) and entry and isinstance(entry[0], str) else _bad("offsets")
                 for entry in offsets}
        verb = "alter" if header.get("member_id") is None else "consume"
        return [("group", group, verb), *(_topic(name, "consume") for name in sorted(names))]
    if api_key == ApiKey.FIND_COORDINATOR and header.get("key_type") == "queue":
        return [_topic(_str(header, "topic"), "describe")]
    if api_key in (ApiKey.FETCH_OFFSETS, ApiKey.DESCRIBE_GROUP, ApiKey.FIND_COORDINATOR):
        return [("group", _str(header, "group"), "describe")]
    if api_key in (ApiKey.QUEUE_FETCH, ApiKey.QUEUE_ACK, ApiKey.QUEUE_NACK, ApiKey.QUEUE_EXTEND):
        return [("subscription", _str(header, "subscription"), "consume"), _topic(_str(header, "topic"), "consume")]
    if api_key == ApiKey.QUEUE_CONFIGURE:
        subscription = _optional_str(header, "subscription")
        if subscription is None:
            return [_topic(_str(header, "topic"), "alter")]
        return [("subscription", subscription, "alter"), _topic(_str(header, "topic"), "describe")]
    if api_key == ApiKey.QUEUE_DESCRIBE:
        subscription = _optional_str(header, "subscription")
        topic_need = _topic(_str(header, "topic"), "describe")
        return [topic_need] if subscription is None else [topic_need, ("subscription", subscription, "describe")]
    if api_key in (ApiKey.AUTHENTICATE, ApiKey.LIST_TOPICS, ApiKey.INIT_PRODUCER):
        # INIT_PRODUCER only hands out a producer id; writing with it needs topic produce
        # (Kafka dropped its IdempotentWrite check the same way, KIP-679).
        return []
    # Hazard: an API added later without a line here is an administrator's (fails closed).
    return [("cluster", "*", "alter")]


def _bad(name: str) -> Any:
    raise RequestError(ErrorCode.INVALID_REQUEST, f"'{name}' is malformed")
