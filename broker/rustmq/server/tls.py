"""TLS for the producer and consumer ports (and, with ``admin_tls``, the admin/metrics port):
contexts from files, reloaded when the files change.

The listener accepts plain TCP and upgrades each connection with the context that is *current*
at that moment (rather than giving create_server a context fixed at start-up), through
rustmq.tlsio (``io: threads``, OpenSSL on a thread per connection) or the event loop's
``connect_accepted_socket`` (``io: loop``), which gives two things: a reload (a new context built from the files) applies to
every connection accepted afterwards while connections already open keep the one they shook
hands with and are never dropped, and a failed handshake (no client certificate, an untrusted
one, a plaintext client) is seen and logged with the peer's address instead of vanishing inside
the event loop.

The admin port's aiohttp site takes one fixed context; ``admin_listener_context`` gives it one
whose SNI hook (which OpenSSL runs for every ClientHello) moves each handshake onto the admin
context current then, so that port follows reloads the same way.

A Kubernetes Secret volume (cert-manager's, for instance) replaces its files by swapping a
symlink, so the watcher compares the resolved path, size and mtime of each file. Files that do
not load (a half-written pair, a key that does not match) are logged and the current context is
kept; the next change is tried again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import ssl
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

CLIENT_AUTH: Final = ("none", "optional", "required")
TLS_IO: Final = ("threads", "loop")


class TlsError(ValueError):
    """The TLS files given at start-up do not load; the message names them and says why."""


@dataclasses.dataclass(frozen=True, slots=True)
class TlsSettings:
    cert_file: Path  # PEM certificate chain, leaf first
    key_file: Path  # PEM private key (unencrypted)
    client_ca_file: Path | None = None  # CAs that sign client certificates (mutual TLS)
    client_auth: str = "none"  # none | optional | required
    reload_s: float = 10.0  # how often the files are checked for a change
    peer_ca_file: Path | None = None  # CAs of the other brokers' certificates (None: the system's)
    handshake_timeout_s: float = 10.0  # a client that has not finished its handshake by then is dropped
    io: str = "threads"  # threads: rustmq.tlsio (OpenSSL on a thread per connection); loop: the event loop's

    def __post_init__(self) -> None:
        if self.client_auth not in CLIENT_AUTH:
            raise ValueError(f"client_auth must be one of {', '.join(CLIENT_AUTH)}, not {self.client_auth!r}")
        if self.client_auth != "none" and self.client_ca_file is None:
            raise ValueError("client certificates need a CA file to check them against")
        if self.io not in TLS_IO:
            raise ValueError(f"io must be one of {', '.join(TLS_IO)}, not {self.io!r}")
        if self.reload_s <= 0:
            raise ValueError("reload_s must be positive")

    def files(self) -> tuple[Path, ...]:
        optional = tuple(path for path in (self.client_ca_file, self.peer_ca_file) if path is not None)
        return (self.cert_file, self.key_file, *optional)


def build_context(settings: TlsSettings) -> ssl.SSLContext:
    """A server context from the files; ssl.SSLError or OSError when they do not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.cert_file, settings.key_file)
    if settings.client_auth != "none":
        assert settings.client_ca_file is not None
        context.load_verify_locations(cafile=settings.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED if settings.client_auth == "required" else ssl.CERT_OPTIONAL
    return context


def build_admin_context(settings: TlsSettings) -> ssl.SSLContext:
    """The admin/metrics port's server context (``admin_tls``): the same certificate; client
    certificates are asked for but optional whatever ``client_auth`` says (the kubelet's probes
    and most scrapers present none), and a verified one names the request's principal."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.cert_file, settings.key_file)
    if settings.client_ca_file is not None:
        context.load_verify_locations(cafile=settings.client_ca_file)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def build_peer_context(settings: TlsSettings) -> ssl.SSLContext:
    """The client side of broker-to-broker connections (replica fetches): other brokers'
    certificates are checked against ``peer_ca_file`` and the name dialled (their internal
    host), and this broker presents its own certificate, which mutual TLS requires (so it
    needs the client-auth usage too; cert-manager's, as the operator asks for it, has it)."""
    context = ssl.create_default_context(cafile=str(settings.peer_ca_file) if settings.peer_ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


def _fingerprint(files: tuple[Path, ...]) -> tuple[tuple[str, int, int], ...]:
    found = []
    for path in files:
        try:
            real = os.path.realpath(path)
            stat = os.stat(real)
            found.append((real, stat.st_size, stat.st_mtime_ns))
        except OSError:
            found.append((str(path), -1, -1))
    return tuple(found)


class ReloadingContext:
    """The context new connections get (``current``) and the task that reloads its files."""

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self._seen = _fingerprint(settings.files())
        try:
            self.current = build_context(settings)
            self.peer = build_peer_context(settings)
            self.admin = build_admin_context(settings)
        except (OSError, ssl.SSLError) as exc:  # at start-up a broken file is an error
            raise TlsError(
                f"cannot load the TLS certificate {settings.cert_file} and key {settings.key_file}"
                + (f" or the client CA file {settings.client_ca_file}" if settings.client_ca_file else "")
            + (f" or the peer CA file {settings.peer_ca_file}" if settings.peer_ca_file else "")
                + f": {exc}"
            ) from None
        self.reloads = 0  # successful reloads, for tests and logs
        self.failures = 0  # changed files that did not load
        self.handshake_failures = 0

    async def reload_if_changed(self) -> bool:
        """Load the files again if they changed since the last look; True if a new context is current."""
        seen = _fingerprint(self.settings.files())
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            fresh = await asyncio.to_thread(build_context, self.settings)
            peer = await asyncio.to_thread(build_peer_context, self.settings)
            admin = await asyncio.to_thread(build_admin_context, self.settings)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.failures += 1
            log.error("TLS files changed but do not load (%s); still serving the previous certificate", exc)
            return False
        self.current, self.peer, self.admin = fresh, peer, admin
        self.reloads += 1
        log.info("TLS certificate reloaded from %s; new connections use it", self.settings.cert_file)
        return True

    def admin_listener_context(self) -> ssl.SSLContext:
        """A context for a server that takes one fixed context (aiohttp's site): at each
        ClientHello it hands the connection over to the admin context current then, so the
        admin port follows reloads like the other ports (OpenSSL calls this hook for every
        ClientHello, with a server name or without)."""
        base = build_admin_context(self.settings)

        def current(connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
            connection.context = self.admin

        base.sni_callback = current
        return base

    async def watch(self) -> None:
        """Check the files every ``reload_s`` until cancelled."""
        while True:
            await asyncio.sleep(self.settings.reload_s)
            await self.reload_if_changed()
