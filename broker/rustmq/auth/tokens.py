"""Tokens: random secrets a client presents as ``<principal>:<secret>``, stored only hashed.

Token file (one line per token; ``#`` comments and blank lines ignored)::

    <principal>:scrypt$<log2 N>$<r>$<p>$<salt, base64>$<hash, base64>

``rustmq token create <principal>`` makes a 32-byte random secret and prints the token for the
client and the line for the file. A principal may have several lines (several valid tokens),
which is how a token is rotated without a gap.

Why scrypt and a bearer token rather than SCRAM: the token travels inside TLS (docs/security.md
says to use both), so SCRAM's protection of the secret on the wire adds little, while a bearer
token is one request that any client can send. What must not leak is the file at rest, and a
salted memory-hard hash (hashlib.scrypt, N=2^14, r=8, p=1: ~16 MiB and tens of ms per check)
makes a stolen file useless against random 256-bit secrets and expensive against weak
hand-chosen ones. The broker checks a token on a worker thread and remembers the outcome of a
successful check (keyed by the token's SHA-256, dropped when the file changes), so a client that
reconnects costs one hash lookup, not one scrypt.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Final

PRINCIPAL: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@=+-]{0,254}")
SCRYPT_LOG_N: Final = 14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
_MAXMEM: Final = 64 << 20
MAX_TOKEN_CHARS: Final = 1024


class TokenFileError(ValueError):
    """A token file line that does not parse; the message names the line."""


@dataclass(frozen=True, slots=True)
class StoredToken:
    principal: str
    log_n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def matches(self, secret: str) -> bool:
        computed = _scrypt(secret.encode(), self.salt, self.log_n, self.r, self.p, len(self.digest))
        return hmac.compare_digest(computed, self.digest)


def _scrypt(secret: bytes, salt: bytes, log_n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(secret, salt=salt, n=1 << log_n, r=r, p=p, dklen=length, maxmem=_MAXMEM)


def hash_line(principal: str, secret: str, *, log_n: int = SCRYPT_LOG_N) -> str:
    """The token file line for ``secret`` (a fresh salt each time)."""
    if not PRINCIPAL.fullmatch(principal):
        raise ValueError(f"principal {principal!r} must be 1-255 characters of [A-Za-z0-9._@=+-], starting alphanumeric")
    salt = secrets.token_bytes(16)
    digest = _scrypt(secret.encode(), salt, log_n, SCRYPT_R, SCRYPT_P, 32)
    b64 = base64.b64encode
    return f"{principal}:scrypt${log_n}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def new_token(principal: str, *, log_n: int = SCRYPT_LOG_N) -> tuple[str, str]:
    """(token for the client, line for the token file)."""
    secret = secrets.token_urlsafe(32)
    return f"{principal}:{secret}", hash_line(principal, secret, log_n=log_n)


def parse_file(text: str) -> dict[str, tuple[StoredToken, ...]]:
    """Principal -> its stored tokens; TokenFileError naming the first bad line."""
    found: dict[str, list[StoredToken]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        principal, sep, stored = line.partition(":")
        fields = stored.split("$")
        try:
            if not sep or not PRINCIPAL.fullmatch(principal):
                raise ValueError("expected <principal>:scrypt$...")
            if len(fields) != 6 or fields[0] != "scrypt":
                raise ValueError("the hash must be scrypt$<log2 N>$<r>$<p>$<salt>$<hash> (plaintext tokens are refused)")
            log_n, r, p = int(fields[1]), int(fields[2]), int(fields[3])
            if not (1 <= log_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
                raise ValueError("scrypt parameters out of range (log2 N 1..20, r 1..32, p 1..16)")
            salt, digest = base64.b64decode(fields[4], validate=True), base64.b64decode(fields[5], validate=True)
            if len(salt) < 8 or len(digest) < 16:
                raise ValueError("salt or hash too short")
        except ValueError as exc:
            raise TokenFileError(f"line {number}: {exc}") from None
        found.setdefault(principal, []).append(StoredToken(principal, log_n, r, p, salt, digest))
    return {principal: tuple(entries) for principal, entries in found.items()}


def split_token(token: str) -> tuple[str, str]:
    """'<principal>:<secret>' -> (principal, secret); ValueError when it is not of that form."""
    principal, sep, secret = token.partition(":")
    if not sep or not secret or not PRINCIPAL.fullmatch(principal) or len(token) > MAX_TOKEN_CHARS:
        raise ValueError("a token is '<principal>:<secret>' as `rustmq token create` prints it")
    return principal, secret


_DUMMY = StoredToken("-", SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P, b"rustmq-no-such-principal", bytes(32))


def check(stored: dict[str, tuple[StoredToken, ...]], token: str) -> str | None:
    """The principal the token proves, or None. Slow on purpose (scrypt): run it off the loop.
    An unknown principal costs one hash too, so timing does not tell which principals exist."""
    try:
        principal, secret = split_token(token)
    except ValueError:
        return None
    entries = stored.get(principal)
    if not entries:
        _DUMMY.matches(secret)
        return None
    return principal if any(entry.matches(secret) for entry in entries) else None


def cache_key(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
