"""The built images, run for real with buildah: their configuration, what is (not) inside, a
broker image serving a produce/consume round trip on loopback and stopping cleanly on SIGTERM,
the operator image's command, and the broker image's size budget.

The first test pays for building the images (scripts/build-images: a few minutes cold, the
debootstrap base included; seconds when nothing changed), hence the long timeouts.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from imagesupport import (
    IMAGE_UID,
    BrokerProcess,
    BuiltImages,
    Container,
    assert_clean_shutdown,
    inspect_image,
    loopback_broker_env,
    round_trip,
)

pytestmark = [pytest.mark.images, pytest.mark.slow, pytest.mark.timeout(1500)]

BROKER_ADDED_BUDGET_BYTES = 80 * 1000 * 1000
COMPILERS_AND_INSTALLERS = ("gcc", "cc", "c++", "make", "ld")


def image_config(built_images: BuiltImages, name: str) -> dict:
    return inspect_image(built_images.storage_driver, built_images.image(name))["OCIv1"]["config"]


def test_broker_image_config(built_images: BuiltImages) -> None:
    config = image_config(built_images, "broker")
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert config["Entrypoint"] == ["/opt/rustmq/bin/rustmq", "broker"]
    assert not config.get("Cmd"), "the base's CMD must not be appended to the entrypoint"
    assert set(config["ExposedPorts"]) == {"9092/tcp", "9093/tcp", "9094/tcp"}
    assert set(config["Volumes"]) == {"/data/rustmq"}
    assert "RUSTMQ_DATA_DIR=/data/rustmq" in config["Env"]


def test_operator_image_config(built_images: BuiltImages) -> None:
    config = image_config(built_images, "operator")
    assert config["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert config["Entrypoint"] == ["/opt/rustmq/bin/rustmq-operator"]
    assert not config.get("Cmd")
    assert any(entry.startswith("PATH=/opt/rustmq/bin:") for entry in config["Env"]), "the chart runs `rustmq-operator` by name"


@pytest.mark.parametrize("name", ["broker", "operator"])
def test_no_build_tools_in_the_final_image(containers: dict[str, Container], name: str) -> None:
    container = containers[name]
    probe = "; ".join(f"command -v {tool} || true" for tool in COMPILERS_AND_INSTALLERS)
    found = container.run(["sh", "-c", probe])
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == [], f"build tools in the image: {found.stdout.split()}"
    venv_bin = container.run(["ls", "/opt/rustmq/bin"])
    assert "pip" not in venv_bin.stdout.split() and "rustmq" in venv_bin.stdout.split()
    assert container.run(["test", "-e", "/wheelhouse"]).returncode != 0, "the wheelhouse stays in the install stage"


def test_broker_image_serves_and_stops_cleanly(containers: dict[str, Container], tmp_path: Path) -> None:
    """`buildah run` of the image's entrypoint as uid 10001 with the data volume bound to a host
    directory: a produce/consume round trip through loopback ports, SIGTERM to the broker's
    process (what `docker stop` sends), exit status 0 and every partition's clean-shutdown marker."""
    container = containers["broker"]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    os.chown(data_dir, IMAGE_UID, IMAGE_UID)  # what fsGroup does for the pod's volume
    argv = container.command([], env=loopback_broker_env(), volumes={data_dir: "/data/rustmq"})
    broker = BrokerProcess(argv, dict(os.environ), data_dir)
    ready = broker.start(timeout=120)
    try:
        assert ready["data_dir"] == "/data/rustmq"
        with open(f"/proc/{ready['pid']}/status") as status:
            uid_line = next(line for line in status if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(IMAGE_UID)] * 4, uid_line
        with open(f"/proc/{ready['pid']}/cmdline", "rb") as cmdline:
            program = cmdline.read().split(b"\0")
        assert program[:3] == [b"/opt/rustmq/bin/python3", b"/opt/rustmq/bin/rustmq", b"broker"], (
            "signals must reach Python itself, not a shell")
        round_trip(broker)
        assert broker.terminate(timeout=60) == 0, broker.stderr()
    finally:
        if broker.process.poll() is None:
            broker.kill()
    assert "stopped cleanly" in broker.stderr()
    assert_clean_shutdown(data_dir)
    assert {path.stat().st_uid for path in data_dir.rglob("*")} == {IMAGE_UID}


def test_operator_image_command(containers: dict[str, Container]) -> None:
    container = containers["operator"]
    helped = subprocess.run(container.command(["--help"]), capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: rustmq-operator")
    # --help stops before kopf is imported; the handlers module pulls in kopf, kubernetes, jinja2.
    imported = container.run(["/opt/rustmq/bin/python3", "-c", "import rustmq_operator.handlers, kubernetes, jinja2"],
                             timeout=120)
    assert imported.returncode == 0, imported.stderr


def test_broker_image_size_budget(built_images: BuiltImages) -> None:
    """What the broker image adds on top of its base (its own layers, uncompressed) stays < 80 MB."""
    driver = built_images.storage_driver
    image_layers = inspect_image(driver, built_images.image("broker"))["OCIv1"]["rootfs"]["diff_ids"]
    base_layers = inspect_image(driver, built_images.base("broker"))["OCIv1"]["rootfs"]["diff_ids"]
    assert image_layers[:len(base_layers)] == base_layers, "the image is not built on the reported base"
    manifest = inspect_image(driver, built_images.image("broker"))["Manifest"]
    sizes = [layer["size"] for layer in json.loads(manifest)["layers"]]
    added = sum(sizes[len(base_layers):])
    assert added == built_images.images["broker"]["added_bytes"]
    assert 0 < added < BROKER_ADDED_BUDGET_BYTES, f"the broker image adds {added / 1e6:.1f} MB to its base"
