"""Authentication, authorisation and quotas at the broker: the files, their reload, and the
per-connection state the request path consults.

``AuthState`` (one per broker, None when neither ``auth_token_file`` nor ``auth_acl_file`` is
set, so a broker without auth does no per-request work beyond one ``is None`` test) holds the
hashed tokens, the policy (rustmq.auth.acl), the per-principal limiters and the connection
counts, and re-reads the files when they change (same fingerprint watch as the TLS files: a
Kubernetes Secret or ConfigMap swapping its ``..data`` symlink counts as a change). A file that
does not load at start-up stops the broker; later, it is logged and the previous content kept.

``ConnectionAuth`` is one connection's principal and its cache of decisions, keyed by
(resource, name, verb) and dropped when the policy's generation changes: a reloaded ACL file
applies to open connections at their next request. Tokens are checked on a worker thread
(scrypt); a successful check is remembered until the token file changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Final

import yaml

from rustmq.auth import acl, tokens
from rustmq.auth.quotas import Limiter, Quota
from rustmq.protocol.api import ErrorCode, RequestError

log = logging.getLogger(__name__)

CERT_PRINCIPAL: Final = ("cn", "san")
_MAX_VERIFIED: Final = 4096


class AuthError(ValueError):
    """An auth file given at start-up does not load; the message names it and says why."""


@dataclasses.dataclass(frozen=True, slots=True)
class AuthSettings:
    token_file: Path | None = None
    acl_file: Path | None = None
    cert_principal: str = "cn"  # cn: the subject's common name; san: the first DNS/URI/email SAN
    reload_s: float = 10.0

    def __post_init__(self) -> None:
        if self.cert_principal not in CERT_PRINCIPAL:
            raise ValueError(f"cert_principal must be one of {', '.join(CERT_PRINCIPAL)}, not {self.cert_principal!r}")
        if self.reload_s <= 0:
            raise ValueError("reload_s must be positive")


def _fingerprint(path: Path | None) -> tuple[str, int, int] | None:
    if path is None:
        return None
    try:
        real = path.resolve()
        stat = real.stat()
        return (str(real), stat.st_size, stat.st_mtime_ns)
    except OSError:
        return (str(path), -1, -1)


def _load_tokens(path: Path | None) -> dict[str, tuple[tokens.StoredToken, ...]]:
    if path is None:
        return {}
    return tokens.parse_file(path.read_text())


def _load_policy(path: Path | None) -> acl.Policy:
    if path is None:
        return acl.ALLOW_ALL
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise acl.AclFileError(f"not YAML: {exc}") from None
    return acl.parse_policy(data)


def cert_principal(peercert: dict[str, Any] | None, mapping: str) -> str | None:
    """The principal a verified client certificate names (ssl's getpeercert() dict), or None."""
    if not peercert:
        return None
    if mapping == "cn":
        for rdn in peercert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName" and value:
                    return str(value)
        return None
    for kind, value in peercert.get("subjectAltName", ()):
        if kind in ("DNS", "URI", "email") and value:
            return str(value)
    return None


class AuthState:
    """The broker's tokens, policy, limiters and connection counts."""

    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        self._seen = (_fingerprint(settings.token_file), _fingerprint(settings.acl_file))
        try:
            self.tokens = _load_tokens(settings.token_file)
        except (OSError, UnicodeDecodeError, tokens.TokenFileError) as exc:
            raise AuthError(f"cannot load the token file {settings.token_file}: {exc}") from None
        try:
            self.policy = _load_policy(settings.acl_file)
        except (OSError, UnicodeDecodeError, acl.AclFileError) as exc:
            raise AuthError(f"cannot load the ACL file {settings.acl_file}: {exc}") from None
        self.generation = 0  # bumped when the policy changes: connections drop their caches
        self._verified: dict[bytes, str] = {}
        self._limiters: dict[str, Limiter] = {}
        self.by_principal: Counter[str] = Counter()
        self.by_address: Counter[str] = Counter()
        self.reloads = 0
        self.failures = 0  # changed files that did not load
        self.authentication_failures = 0
        self.authorization_failures = 0
        self.throttled_ms = 0

    # -- files ----------------------------------------------------------------------------------

    async def reload_if_changed(self) -> bool:
        token_seen, acl_seen = _fingerprint(self.settings.token_file), _fingerprint(self.settings.acl_file)
        changed = False
        if token_seen != self._seen[0]:
            try:
                fresh_tokens = await asyncio.to_thread(_load_tokens, self.settings.token_file)
            except (OSError, UnicodeDecodeError, tokens.TokenFileError) as exc:
                self.failures += 1
                log.error("token file %s changed but does not load (%s); keeping the previous tokens",
                          self.settings.token_file, exc)
            else:
                self.tokens, self._verified = fresh_tokens, {}
                log.info("token file %s reloaded: %d principals", self.settings.token_file, len(fresh_tokens))
                changed = True
        if acl_seen != self._seen[1]:
            try:
                fresh_policy = await asyncio.to_thread(_load_policy, self.settings.acl_file)
            except (OSError, UnicodeDecodeError, acl.AclFileError) as exc:
                self.failures += 1
                log.error("ACL file %s changed but does not load (%s); keeping the previous policy",
                          self.settings.acl_file, exc)
            else:
                self.policy = fresh_policy
                self.generation += 1
                self._limiters.clear()
                log.info("ACL file %s reloaded: %d rules, default %s", self.settings.acl_file,
                         len(fresh_policy.rules), "allow" if fresh_policy.default_allow else "deny")
                changed = True
        self._seen = (token_seen, acl_seen)
        if changed:
            self.reloads += 1
        return changed

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_s)
            try:
                await self.reload_if_changed()
            except Exception:  # never let the watcher die
                log.exception("checking the auth files failed")

    # -- authentication -------------------------------------------------------------------------

    async def authenticate(self, token: str) -> str | None:
        """The principal the token proves, or None (scrypt on a worker thread; successes cached)."""
        key = tokens.cache_key(token)
        known = self._verified.get(key)
        if known is not None:
            return known
        stored = self.tokens
        principal = await asyncio.to_thread(tokens.check, stored, token)
        if principal is None:
            self.authentication_failures += 1
            return None
        if stored is self.tokens:  # not reloaded meanwhile
            if len(self._verified) >= _MAX_VERIFIED:
                self._verified.clear()
            self._verified[key] = principal
        return principal

    # -- quotas -----------------------------------------------------------------------------------

    def quota(self, principal: str) -> Quota:
        return self.policy.quotas.for_principal(principal)

    def limiter(self, principal: str) -> Limiter | None:
        limiter = self._limiters.get(principal)
        if limiter is None:
            quota = self.quota(principal)
            if not quota.limits_rates:
                return None
            limiter = self._limiters[principal] = Limiter(quota, time.monotonic())
        return limiter

    def admit_address(self, address: str) -> str | None:
        """Count a new connection from ``address``; the refusal reason when over the limit."""
        limit = self.policy.quotas.connections_per_address
        if limit is not None and self.by_address[address] >= limit:
            return f"{address} already has {limit} connections (quotas.connections_per_address)"
        self.by_address[address] += 1
        return None

    def release_address(self, address: str) -> None:
        self.by_address[address] -= 1
        if self.by_address[address] <= 0:
            del self.by_address[address]

    def admit_principal(self, principal: str) -> str | None:
        limit = self.quota(principal).connections
        if limit is not None and self.by_principal[principal] >= limit:
            return f"principal {principal} already has {limit} connections (its quota)"
        self.by_principal[principal] += 1
        return None

    def release_principal(self, principal: str) -> None:
        self.by_principal[principal] -= 1
        if self.by_principal[principal] <= 0:
            del self.by_principal[principal]


class ConnectionAuth:
    """One connection's principal, decisions cache and limiter."""

    __slots__ = ("_cache", "_generation", "address", "counted", "limiter", "principal", "state")

    def __init__(self, state: AuthState, address: str) -> None:
        self.state = state
        self.address = address
        self.principal = acl.ANONYMOUS
        self.counted = False  # whether this connection counts towards its principal's limit
        self._cache: dict[tuple[str, str, str], bool] = {}
        self._generation = state.generation
        self.limiter: Limiter | None = state.limiter(self.principal)

    def become(self, principal: str) -> str | None:
        """Switch to ``principal`` (a certificate's at connect, a token's later); the refusal
        reason when the principal is at its connection limit (nothing changes then)."""
        if principal == self.principal and self.counted:
            return None
        refusal = self.state.admit_principal(principal)
        if refusal is not None:
            return refusal
        if self.counted:
            self.state.release_principal(self.principal)
        self.principal, self.counted = principal, True
        self._cache.clear()
        self.limiter = self.state.limiter(principal)
        return None

    def release(self) -> None:
        if self.counted:
            self.state.release_principal(self.principal)
            self.counted = False

    def allowed(self, resource: str, name: str, verb: str) -> bool:
        state = self.state
        if self._generation != state.generation:
            self._cache.clear()
            self._generation = state.generation
            self.limiter = state.limiter(self.principal)
        key = (resource, name, verb)
        decision = self._cache.get(key)
        if decision is None:
            decision = self._cache[key] = state.policy.allowed(self.principal, resource, name, verb)
            if len(self._cache) > 10_000:  # a client cycling through names: bounded
                self._cache.clear()
        return decision

    def check(self, api_key: int, header: dict[str, Any]) -> None:
        """RequestError(AUTHORIZATION_FAILED) naming the first verb the principal lacks."""
        for resource, name, verb in acl.requirements(api_key, header):
            if not self.allowed(resource, name, verb):
                self.refuse(resource, name, verb)

    def refuse(self, resource: str, name: str, verb: str) -> None:
        self.state.authorization_failures += 1
        hint = " (authenticate with a token or a client certificate)" if self.principal == acl.ANONYMOUS else ""
        target = "the cluster" if resource == "cluster" else f"{resource} '{name}'"
        raise RequestError(ErrorCode.AUTHORIZATION_FAILED,
                           f"principal {self.principal} may not {verb} {target}{hint}")
