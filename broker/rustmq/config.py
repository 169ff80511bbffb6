"""Broker configuration: defaults, then an optional config file, then RUSTMQ_* variables, then flags.

The five variables of the deployment RustMQ replaces keep their names and defaults
(RUSTMQ_DATA_DIR=/data/rustmq, RUSTMQ_PARTITIONS=12, RUSTMQ_PRODUCER_PORT=9092,
RUSTMQ_CONSUMER_PORT=9093, RUSTMQ_METRICS_PORT=9094). Every other field of BrokerConfig can be
set the same way: ``RUSTMQ_<FIELD>`` in the environment, ``--<field>`` on the command line, or
``<field>: value`` in a YAML/JSON file given with ``--config``. The ``log`` field holds the
default LogConfig of every topic (segment, retention and flush settings; see docs/storage.md),
as overrides of DEFAULT_LOG, and is only settable from the file or as JSON in RUSTMQ_LOG.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from rustmq.cluster.lease import LeaseTiming
from rustmq.server.authz import AuthSettings
from rustmq.server.settings import ServerSettings
from rustmq.server.tls import TlsSettings
from rustmq.storage.config import LogConfig

ENV_PREFIX = "RUSTMQ_"
_SERVER_DEFAULTS = ServerSettings()

# The broker default flushes every second in the background; produce with acks=durable (or a
# topic whose flush.mode is "always") for acknowledgements that survive a power loss.
DEFAULT_LOG: dict[str, Any] = {"flush": {"mode": "interval", "interval_ms": 1000}}


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the field and the source."""


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerConfig:
    data_dir: Path = Path("/data/rustmq")
    partitions: int = 12  # partitions of the default topic and of auto-created topics
    host: str = "0.0.0.0"
    producer_port: int = 9092
    consumer_port: int = 9093
    metrics_port: int = 9094
    advertised_host: str | None = None
    broker_id: int = 0
    max_frame_bytes: int = _SERVER_DEFAULTS.max_frame_bytes
    max_connections: int = _SERVER_DEFAULTS.max_connections
    max_inflight_requests: int = _SERVER_DEFAULTS.max_inflight_requests
    write_buffer_high_bytes: int = _SERVER_DEFAULTS.write_buffer_high_bytes
    max_fetch_bytes: int = _SERVER_DEFAULTS.max_fetch_bytes
    frame_timeout_s: float = _SERVER_DEFAULTS.frame_timeout_s
    idle_timeout_s: float = _SERVER_DEFAULTS.idle_timeout_s
    max_topics: int = _SERVER_DEFAULTS.max_topics
    max_partitions: int = _SERVER_DEFAULTS.max_partitions
    max_partitions_per_topic: int = _SERVER_DEFAULTS.max_partitions_per_topic
    max_segment_bytes: int = _SERVER_DEFAULTS.max_segment_bytes
    max_long_polls_per_connection: int = _SERVER_DEFAULTS.max_long_polls_per_connection
    fd_headroom: int = _SERVER_DEFAULTS.fd_headroom
    map_headroom: int = _SERVER_DEFAULTS.map_headroom
    readiness_min_free_bytes: int = _SERVER_DEFAULTS.readiness_min_free_bytes
    max_groups: int = 10_000  # consumer groups per broker (members or committed offsets)
    max_subscriptions: int = 10_000  # queue subscriptions (subscription, topic) per broker
    auto_create_topics: bool = True
    default_topic: str = "default"
    group_commit_ms: float = 0.5  # how long the group committer waits for more durable appends
    retention_check_s: float = 30.0  # how often expired segments are deleted
    shutdown_timeout_s: float = _SERVER_DEFAULTS.shutdown_timeout_s
    ports_file: Path | None = None  # where to write the bound ports as JSON once listening
    log_level: str = "INFO"
    uvloop: bool = True  # run on uvloop when it is installed (the image and scripts/setup have it)
    log: dict[str, Any] = dataclasses.field(default_factory=dict)  # overrides of DEFAULT_LOG
    # TLS on the producer and consumer ports (docs/security.md): on when a certificate is given.
    tls_cert_file: Path | None = None  # PEM chain, leaf first; reloaded when it changes
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None  # CAs of client certificates (mutual TLS)
    tls_client_auth: str = "none"  # none | optional | required (fixed at start-up)
    tls_reload_s: float = 10.0  # how often the TLS files are checked for a change
    tls_peer_ca_file: Path | None = None  # cluster mode: CAs of the other brokers' certificates
    tls_io: str = "threads"  # threads: OpenSSL on a thread per connection; loop: the event loop's TLS
    admin_tls: bool = False  # the admin/metrics port speaks HTTPS too (the tls_* certificate, reloaded)
    # Authentication, ACLs and quotas (docs/security.md): on when a token or ACL file is given.
    auth_token_file: Path | None = None  # "<principal>:scrypt$..." lines; reloaded when it changes
    auth_acl_file: Path | None = None  # YAML policy: default, super_users, rules, quotas; reloaded
    auth_cert_principal: str = "cn"  # a client certificate's principal: cn (subject CN) or san (first SAN)
    auth_reload_s: float = 10.0  # how often the auth files are checked for a change
    auth_broker_token_file: Path | None = None  # this broker's own token for its connections to peers
    admin_auth: str = "writes"  # with auth on: writes (admin writes need a principal) or all (/metrics and /v1 reads too)
    # Cluster mode (docs/cluster.md; the operator contract in docs/operator.md). "standalone": no
    # coordination at all; "kubernetes": one replicated cluster coordinated through the API server.
    cluster_mode: str = "standalone"
    cluster_name: str = "rustmq"  # prefix of every coordination object (the RustMQCluster's name)
    cluster_namespace: str = "default"  # namespace of the Leases and ConfigMaps
    internal_host: str | None = None  # address other brokers and clients use (default: advertised_host or host)
    rack: str = ""  # rack or zone of this broker: a partition's replicas are spread over racks ("" : none)
    kubeconfig: Path | None = None  # None: in-cluster service account credentials
    lease_duration_s: float = 6.0  # peers may take over this long after the last renewal they saw
    lease_renew_s: float = 1.0  # renew period of the broker and controller Leases
    api_timeout_s: float = 2.0  # bound on each API call; renew + 2 * timeout <= duration is enforced
    cluster_poll_s: float = 0.5  # how often a broker re-reads the cluster state
    replica_lag_s: float = 5.0  # a follower not caught up for this long leaves the ISR
    unclean_leader_election: bool = False  # True: elect an out-of-sync replica rather than stay offline (data loss)
    forward_timeout_s: float = 10.0  # a simple produce forwarded to its partition's leader waits at most this long
    # Scaling (docs/cluster.md "Scaling"): the reassignments the controller runs at once, the
    # byte rate of catch-up fetches of replicas being added, how long a stopping broker waits
    # for its leaderships to move, and how long a returning broker waits to lead again.
    reassign_bytes_per_s: int = 50 << 20  # 0: unthrottled
    max_reassignments: int = 4
    controlled_shutdown_s: float = 20.0
    preferred_leader_delay_s: float = 10.0
    # The internal coordination topic (docs/cluster.md "Compaction of the internal topic"): a
    # partition's tail since its last snapshot beyond which a new snapshot is written; also the
    # segment size the controller gives the topic when it creates it.
    coordination_compact_bytes: int = _SERVER_DEFAULTS.coordination_compact_bytes

    def __post_init__(self) -> None:
        for name in ("producer_port", "consumer_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"{name} must be between 0 and 65535, not {port}")
        for name in ("partitions", "max_frame_bytes", "max_connections", "max_inflight_requests",
                     "write_buffer_high_bytes", "max_fetch_bytes", "max_topics", "max_partitions",
                     "max_partitions_per_topic", "max_segment_bytes", "max_long_polls_per_connection",
                     "max_groups", "max_subscriptions"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("frame_timeout_s", "idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be above 0, not {getattr(self, name)}")
        for name in ("fd_headroom", "map_headroom"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be at least 0, not {getattr(self, name)}")
        if self.max_partitions_per_topic > 10_000:
            raise ConfigError("max_partitions_per_topic must be at most 10000 (the protocol's limit)")
        if self.max_frame_bytes > 1 << 30:
            raise ConfigError("max_frame_bytes must be at most 1 GiB")
        try:
            self.log_config()
        except Exception as exc:
            raise ConfigError(f"log: {exc}") from None
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("tls_cert_file and tls_key_file go together: give both or neither")
        if self.tls_cert_file is None and (self.tls_client_ca_file is not None or self.tls_peer_ca_file is not None
                                           or self.tls_client_auth != "none"):
            raise ConfigError("tls_client_ca_file, tls_peer_ca_file and tls_client_auth need TLS (tls_cert_file and tls_key_file)")
        if self.admin_tls and self.tls_cert_file is None:
            raise ConfigError("admin_tls needs TLS (tls_cert_file and tls_key_file)")
        try:
            self.tls_settings()
        except ValueError as exc:
            raise ConfigError(f"tls: {exc}") from None
        if self.auth_cert_principal not in ("cn", "san"):
            raise ConfigError(f"auth_cert_principal must be 'cn' or 'san', not {self.auth_cert_principal!r}")
        try:
            self.auth_settings()
        except ValueError as exc:
            raise ConfigError(f"auth: {exc}") from None
        if self.admin_auth not in ("writes", "all"):
            raise ConfigError(f"admin_auth must be 'writes' or 'all', not {self.admin_auth!r}")
        if self.cluster_mode not in ("standalone", "kubernetes"):
            raise ConfigError(f"cluster_mode must be 'standalone' or 'kubernetes', not {self.cluster_mode!r}")
        if self.cluster_mode == "kubernetes" and not 0 <= self.broker_id < 1024:
            raise ConfigError(f"broker_id must be between 0 and 1023 in cluster mode, not {self.broker_id}")
        try:
            self.lease_timing().check()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not 4096 <= self.coordination_compact_bytes <= 1 << 30:
            raise ConfigError(f"coordination_compact_bytes must be between 4096 and 1 GiB, not {self.coordination_compact_bytes}")
        if self.reassign_bytes_per_s < 0 or self.max_reassignments < 1:
            raise ConfigError("reassign_bytes_per_s must be at least 0 (0: unthrottled) and max_reassignments at least 1")
        for name in ("controlled_shutdown_s", "preferred_leader_delay_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be at least 0, not {getattr(self, name)}")
        for name in ("cluster_poll_s", "replica_lag_s", "forward_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, not {getattr(self, name)}")

    def tls_settings(self) -> TlsSettings | None:
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        return TlsSettings(
            cert_file=self.tls_cert_file,
            key_file=self.tls_key_file,
            client_ca_file=self.tls_client_ca_file,
            client_auth=self.tls_client_auth,
            reload_s=self.tls_reload_s,
            peer_ca_file=self.tls_peer_ca_file,
            io=self.tls_io,
        )

    def auth_settings(self) -> AuthSettings | None:
        if self.auth_token_file is None and self.auth_acl_file is None:
            return None
        return AuthSettings(self.auth_token_file, self.auth_acl_file, self.auth_cert_principal, self.auth_reload_s)

    def lease_timing(self) -> LeaseTiming:
        return LeaseTiming(self.lease_duration_s, self.lease_renew_s, self.api_timeout_s)

    def server_settings(self) -> ServerSettings:
        return ServerSettings(
            host=self.host,
            producer_port=self.producer_port,
            consumer_port=self.consumer_port,
            advertised_host=self.advertised_host,
            broker_id=self.broker_id,
            max_frame_bytes=self.max_frame_bytes,
            max_connections=self.max_connections,
            max_inflight_requests=self.max_inflight_requests,
            write_buffer_high_bytes=self.write_buffer_high_bytes,
            max_fetch_bytes=self.max_fetch_bytes,
            frame_timeout_s=self.frame_timeout_s,
            idle_timeout_s=self.idle_timeout_s,
            max_topics=self.max_topics,
            max_partitions=self.max_partitions,
            max_partitions_per_topic=self.max_partitions_per_topic,
            max_segment_bytes=self.max_segment_bytes,
            max_long_polls_per_connection=self.max_long_polls_per_connection,
            fd_headroom=self.fd_headroom,
            map_headroom=self.map_headroom,
            readiness_min_free_bytes=self.readiness_min_free_bytes,
            auto_create_topics=self.auto_create_topics,
            default_partitions=self.partitions,
            default_topic=self.default_topic,
            shutdown_timeout_s=self.shutdown_timeout_s,
            coordination_compact_bytes=self.coordination_compact_bytes,
        )

    def log_config(self) -> LogConfig:
        return LogConfig().merged(DEFAULT_LOG).merged(self.log)


FIELDS = {field.name: field for field in dataclasses.fields(BrokerConfig)}


def _convert(name: str, value: Any, source: str) -> Any:
    kind = FIELDS[name].type
    try:
        if name == "log":
            parsed = json.loads(value) if isinstance(value, str) else value
            if not isinstance(parsed, dict):
                raise ValueError("must be a mapping")
            return parsed
        if value is None:
            return None
        if "Path" in kind:
            return Path(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError("not an integer")
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{name} from {source}: {exc}") from None


def read_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping")
    return data


def load(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> BrokerConfig:
    """The effective config; flags with value None are treated as not given."""
    values: dict[str, Any] = {}
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if config_file is not None:
        layers.append((str(config_file), read_file(config_file)))
    if env is not None:
        layers.append(("environment", {
            name: env[ENV_PREFIX + name.upper()] for name in FIELDS if ENV_PREFIX + name.upper() in env
        }))
    layers.append(("flags", {name: value for name, value in (flags or {}).items() if value is not None}))
    for source, layer in layers:
        unknown = sorted(set(layer) - set(FIELDS))
        if unknown:
            raise ConfigError(f"unknown setting(s) in {source}: {', '.join(unknown)}")
        for name, value in layer.items():
            values[name] = _convert(name, value, source)
    try:
        return BrokerConfig(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
