"""Write a one-layer OCI image archive from a few files, for images the node needs without a registry.

The real node (tools/controlplane/realnode.py) cannot pull anything, so the sandbox image
(registry.k8s.io/pause) and the CoreDNS image are made here from the static binaries that
tools/controlplane/build-node compiled, and imported with `ctr images import`.

Archive layout (OCI image layout v1, as a plain tar):

    oci-layout                      {"imageLayoutVersion": "1.0.0"}
    index.json                      one manifest descriptor, annotated with the image name twice:
                                    `io.containerd.image.name` (what ctr import names the image)
                                    and `org.opencontainers.image.ref.name` (the tag)
    blobs/sha256/<manifest>         application/vnd.oci.image.manifest.v1+json
    blobs/sha256/<config>           application/vnd.oci.image.config.v1+json (rootfs.diff_ids
                                    is the layer's own digest: the layer is stored uncompressed)
    blobs/sha256/<layer>            application/vnd.oci.image.layer.v1.tar: the files, owned by
                                    root, with fixed times, so the same inputs give the same digest

Pure apart from reading the input files and writing the archive. Standard library only.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class File:
    """One file of the layer: its path inside the image, its bytes and mode."""

    path: str
    data: bytes
    mode: int = 0o755


def _tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _entry(name: str, data: bytes | None, mode: int) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    if data is None:
        info.type = tarfile.DIRTYPE
    else:
        info.size = len(data)
    return info, data


def layer_tar(files: list[File]) -> bytes:
    """The layer: every parent directory, then the files, in path order."""
    dirs: set[str] = set()
    for f in files:
        parts = f.path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    members = [_entry(d + "/", None, 0o755) for d in sorted(dirs)]
    members += [_entry(f.path.strip("/"), f.data, f.mode) for f in sorted(files, key=lambda f: f.path)]
    return _tar_bytes(members)


def _blob(data: bytes) -> tuple[str, bytes]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def image_archive(name: str, files: list[File], config: dict) -> bytes:
    """The archive bytes of image `name` (a full reference, e.g. registry.k8s.io/pause:3.10.2).

    `config` is the OCI image config's `config` object (Entrypoint, User, Env, ...).
    """
    layer_digest, layer = _blob(layer_tar(files))
    config_digest, config_bytes = _blob(
        json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": config,
                "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
                "history": [{"created_by": "tools/controlplane/ociarchive.py"}],
            },
            sort_keys=True,
        ).encode()
    )
    manifest_digest, manifest = _blob(
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": len(config_bytes),
                },
                "layers": [
                    {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": len(layer)}
                ],
            },
            sort_keys=True,
        ).encode()
    )
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": name.rpartition(":")[2],
                },
            }
        ],
    }
    members = [
        _entry("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode(), 0o644),
        _entry("index.json", json.dumps(index, sort_keys=True).encode(), 0o644),
        _entry("blobs/", None, 0o755),
        _entry("blobs/sha256/", None, 0o755),
    ]
    for digest, data in ((layer_digest, layer), (config_digest, config_bytes), (manifest_digest, manifest)):
        members.append(_entry(f"blobs/sha256/{digest.removeprefix('sha256:')}", data, 0o644))
    return _tar_bytes(members)


def write_image_archive(path: Path, name: str, files: list[File], config: dict) -> Path:
    path.write_bytes(image_archive(name, files, config))
    return path
