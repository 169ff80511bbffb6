"""Start and stop real broker processes (``python -m rustmq broker`` on port 0) for tests.

Shared by tests/server and tests/client (their conftest.py files load this file by path, since
tests are imported with --import-mode=importlib and are not a package).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from rustmq.protocol import frames


class BrokerProcess:
    def __init__(self, data_dir: Path, *extra_args: str, env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None, host: str = "127.0.0.1",
                 command_prefix: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.host = host  # the address it listens on and clients dial
        self.command_prefix = command_prefix  # e.g. ("ip", "netns", "exec", name): exec'd, so pid stays the broker's
        self.preexec_fn = preexec_fn  # runs in the child before exec (e.g. to set rlimits)
        self.extra_args = extra_args
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, Any] = {}
        self.log_path = data_dir.parent / f"{data_dir.name}-broker.log"

    def start(self, timeout: float = 60.0) -> BrokerProcess:
        ports_file = self.data_dir.parent / f"{self.data_dir.name}-ports.json"
        ports_file.unlink(missing_ok=True)
        command = [
            *self.command_prefix, sys.executable, "-m", "rustmq", "broker",
            "--host", self.host, "--producer-port", "0", "--consumer-port", "0", "--metrics-port", "0",
            "--data-dir", str(self.data_dir), "--ports-file", str(ports_file), *self.extra_args,
        ]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self._log, env=self.env,
                                     preexec_fn=self.preexec_fn)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ports_file.exists():
                self.ports = json.loads(ports_file.read_text())
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"broker did not become ready in {timeout} s:\n{self.log()}")

    @property
    def producer_port(self) -> int:
        return int(self.ports["producer_port"])

    @property
    def consumer_port(self) -> int:
        return int(self.ports["consumer_port"])

    @property
    def metrics_port(self) -> int:
        return int(self.ports["metrics_port"])

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.producer_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self._log.close()
                raise AssertionError(f"broker ignored SIGTERM for {timeout} s:\n{self.log()}") from None
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class RawClient:
    """A blocking socket speaking raw frames, for byte-exact protocol tests."""

    def __init__(self, port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.corr = 0

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request_bytes(self, header: dict[str, Any], payload: bytes = b"") -> bytes:
        self.corr += 1
        header.setdefault("corr", self.corr)
        return frames.encode_frame(header, payload)

    def send(self, header: dict[str, Any], payload: bytes = b"") -> int:
        data = self.request_bytes(header, payload)
        self.sock.sendall(data)
        return int(header["corr"])

    def recv_exact(self, count: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < count:
            chunk = self.sock.recv(count - len(chunks))
            if not chunk:
                raise EOFError(f"connection closed after {len(chunks)} of {count} bytes")
            chunks += chunk
        return bytes(chunks)

    def recv(self) -> tuple[dict[str, Any], bytes]:
        (length,) = struct.unpack(">I", self.recv_exact(4))
        body = self.recv_exact(length)
        (header_length,) = struct.unpack_from(">I", body)
        header = msgpack.unpackb(body[4 : 4 + header_length], raw=False)
        return header, body[4 + header_length :]

    def call(self, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        corr = self.send(header, payload)
        response, data = self.recv()
        assert response["corr"] == corr, response
        return response, data

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
