"""Helpers of the image tests (importable as ``imagesupport`` through pytest's pythonpath): run commands in
the built images, and drive a broker, in an image or on the host, through a produce/consume
round trip and a SIGTERM.

`buildah run --isolation chroot` shares the host's network and process namespaces: the broker
binds 127.0.0.1 ports the host reaches, and the pid it reports is the host's pid of the Python
process, which is what a container runtime signals on `docker stop`.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from rustmq.storage import partition as storage_partition

REPO = Path(__file__).resolve().parents[2]
IMAGE_TAG = "test"
IMAGE_UID = 10001
LOOPBACK = "127.0.0.1"
BUILD_TIMEOUT_S = 1200


@dataclass(frozen=True)
class BuiltImages:
    """What scripts/build-images reported (build/images.json) for the session's images."""

    storage_driver: str
    images: dict[str, dict]

    def image(self, name: str) -> str:
        return self.images[name]["image"]

    def base(self, name: str) -> str:
        return self.images[name]["base"]


def buildah(driver: str, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["buildah", "--storage-driver", driver, *args], capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"buildah {shlex.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def inspect_image(driver: str, image: str) -> dict:
    return json.loads(buildah(driver, "inspect", "--type", "image", image).stdout)


class Container:
    """A buildah working container of an image; `run` starts a command in it like the image would."""

    def __init__(self, driver: str, image: str) -> None:
        self.driver = driver
        self.image = image
        self.name = f"rustmq-test-{uuid.uuid4().hex[:12]}"
        buildah(driver, "from", "--pull=false", "--name", self.name, image, timeout=300)
        self.config = inspect_image(driver, image)["OCIv1"]["config"]

    def command(self, args: list[str], *, env: dict[str, str] | None = None, volumes: dict[Path, str] | None = None,
                entrypoint: bool = True) -> list[str]:
        """The `buildah run` argv for the image's entrypoint followed by args (or args alone)."""
        argv = ["buildah", "--storage-driver", self.driver, "run", "--isolation", "chroot"]
        for host, inside in (volumes or {}).items():
            argv += ["--volume", f"{host}:{inside}"]
        for key, value in (env or {}).items():
            argv += ["--env", f"{key}={value}"]
        program = [*self.config.get("Entrypoint", []), *args] if entrypoint else args
        return [*argv, self.name, "--", *program]

    def run(self, args: list[str], *, entrypoint: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(args, entrypoint=entrypoint), capture_output=True, text=True,
                              timeout=timeout)

    def remove(self) -> None:
        buildah(self.driver, "rm", self.name, check=False)


@dataclass
class BrokerProcess:
    """A broker started from a command line (in an image or on the host) on loopback port 0."""

    argv: list[str]
    env: dict[str, str]
    data_dir: Path
    process: subprocess.Popen[str] = field(init=False)
    ready: dict = field(init=False, default_factory=dict)

    @property
    def stderr_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.stderr"

    def start(self, timeout: float = 60) -> dict:
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        lines: queue.Queue[str | None] = queue.Queue()
        self._pump_thread = threading.Thread(target=self._pump, args=(lines,), daemon=True)
        self._pump_thread.start()
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            if line.startswith("{") and json.loads(line).get("event") == "ready":
                self.ready = json.loads(line)
                return self.ready
        self.kill()
        raise AssertionError(f"the broker did not report ready; stdout {seen!r}\nstderr:\n{self.stderr()}")

    def _pump(self, lines: queue.Queue[str | None]) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                lines.put(line.strip())
        lines.put(None)

    def stderr(self) -> str:
        return self.stderr_path.read_text()[-4000:] if self.stderr_path.exists() else ""

    @property
    def bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.ready['producer_port']}"

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM the broker's own Python process (the pid it reported) and wait for the command."""
        os.kill(self.ready["pid"], signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self._close_stdout()

    def _close_stdout(self) -> None:
        self._pump_thread.join(timeout=10)  # it closes stdout once the process has closed its end

    def kill(self) -> None:
        if self.ready.get("pid"):
            try:
                os.kill(self.ready["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        self._close_stdout()


def loopback_broker_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """RUSTMQ_* variables that make a broker listen on loopback only, on ports the OS picks."""
    return {
        **(base or {}),
        "RUSTMQ_HOST": LOOPBACK,
        "RUSTMQ_PRODUCER_PORT": "0",
        "RUSTMQ_CONSUMER_PORT": "0",
        "RUSTMQ_METRICS_PORT": "0",
    }


def rustmq_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """The project's `rustmq` CLI from the host venv."""
    return subprocess.run([sys.executable, "-m", "rustmq", *args], capture_output=True, text=True, timeout=timeout)


def round_trip(broker: BrokerProcess) -> None:
    """Produce a unique message with durable acks and consume it back, both with the host's CLI."""
    value = f"image-test-{uuid.uuid4().hex}"
    produced = rustmq_cli("produce", "images", value, "--acks", "durable", "--json", "--bootstrap", broker.bootstrap)
    assert produced.returncode == 0, produced.stderr
    ack = json.loads(produced.stdout.splitlines()[0])
    consumed = rustmq_cli("consume", "images", "--partition", str(ack["partition"]), "--from", str(ack["offset"]),
                          "--max-messages", "1", "--timeout", "10", "--json", "--bootstrap", broker.bootstrap)
    assert consumed.returncode == 0, consumed.stderr
    message = json.loads(consumed.stdout.splitlines()[0])
    assert message["value"] == value and message["offset"] == ack["offset"]


def assert_clean_shutdown(data_dir: Path) -> None:
    """Every partition directory of every topic holds the clean-shutdown marker."""
    partitions = [p for p in (data_dir / "topics").glob("*/*") if p.is_dir()]
    assert partitions, f"no partitions under {data_dir}"
    marker = storage_partition.CLEAN_SHUTDOWN_FILE
    missing = [str(p.relative_to(data_dir)) for p in partitions if not (p / marker).is_file()]
    assert not missing, f"partitions without a clean-shutdown marker: {missing}"
    assert (data_dir / "topics" / "images").is_dir()
