"""Fixtures of the image tests: the images, built once per session, and working containers of them.

The images are built by scripts/build-images with buildah (vfs storage, chroot isolation), the
daemonless path the project's machines have; the script reuses an image whose inputs (Dockerfile,
wheels, base image) are unchanged, so a later session pays only for the wheelhouse and the check.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

import imagesupport

REPO = imagesupport.REPO
IMAGE_TAG = imagesupport.IMAGE_TAG
BUILD_TIMEOUT_S = imagesupport.BUILD_TIMEOUT_S
BuiltImages = imagesupport.BuiltImages
Container = imagesupport.Container


@pytest.fixture(scope="session")
def built_images() -> BuiltImages:
    """Both images, built (or reused when unchanged) by scripts/build-images with buildah.

    Fails, never skips, when they cannot be built: buildah and debootstrap come from Debian's
    packages (the script installs them as root), the wheels from PyPI.
    """
    env = {**os.environ, "IMAGE_TAG": IMAGE_TAG, "CONTAINER_ENGINE": "buildah"}
    try:
        result = subprocess.run([str(REPO / "scripts" / "build-images"), "broker", "operator"], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"scripts/build-images took more than {BUILD_TIMEOUT_S} s:\n{(exc.stderr or b'')[-3000:]!r}")
    if result.returncode != 0:
        pytest.fail(
            "scripts/build-images failed, so the images cannot be tested. It needs buildah and debootstrap "
            "(Debian packages it installs itself when run as root, or `apt-get install buildah debootstrap`), "
            f"PyPI for the wheelhouse and a Debian mirror for the base.\n--- stderr (tail) ---\n{result.stderr[-4000:]}"
        )
    report = json.loads((REPO / "build" / "images.json").read_text())
    assert report["engine"] == "buildah", report
    return BuiltImages(storage_driver=report["storage_driver"], images=report["images"])


@pytest.fixture(scope="module")
def containers(built_images: BuiltImages) -> Iterator[dict[str, imagesupport.Container]]:
    made: dict[str, imagesupport.Container] = {}
    try:
        for name in ("broker", "operator"):
            made[name] = Container(built_images.storage_driver, built_images.image(name))
        yield made
    finally:
        for container in made.values():
            container.remove()
