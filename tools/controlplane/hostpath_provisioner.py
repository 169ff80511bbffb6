"""Volumes for the real node: one directory on the host per claim, as `local` PersistentVolumes.

`scripts/local-cluster up --runtime containerd` runs this for the StorageClass `standard`
(provisioner `rustmq.io/hostpath`, WaitForFirstConsumer, expansion allowed). It does the three
jobs of an external provisioner and resizer, by polling the API every second (a handful of
objects on a test cluster; no watch bookkeeping to get wrong):

- **provision**: a pending claim of ours whose pod the scheduler has placed (annotation
  `volume.kubernetes.io/selected-node`) gets a directory `<root>/<pv name>` (mode 0770, owned by
  root: kubelet's `local` volume plugin hands it to the pod's fsGroup, as on a real disk) and a
  `local` PV with that node's affinity, pre-bound to the claim; the controller-manager binds them;
- **delete**: a Released PV of ours with reclaim policy Delete loses its directory, then the PV;
- **expand**: when a claim asks for more than its PV holds (the controller-manager marks it
  `volume.kubernetes.io/storage-resizer: rustmq.io/hostpath`), the PV's capacity and the claim's
  status are raised to the request. Online, since a directory needs no resize, but also not
  enforced: a directory on the shared ext4 has no size of its own (enforcing one would need
  project quotas, which these machines' root filesystem is not mounted with). Capacity is
  bookkeeping here, the data is real.

The directories live under the cluster's state directory, so `down` removes them with it; data
outlives pods and restarts of the broker, as on a real disk.

    .venv/bin/python tools/controlplane/hostpath_provisioner.py --kubeconfig K --root DIR/ --node NODE
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

PROVISIONER = "rustmq.io/hostpath"
PROVISIONER_ANNOTATIONS = ("volume.kubernetes.io/storage-provisioner", "volume.beta.kubernetes.io/storage-provisioner")
SELECTED_NODE = "volume.kubernetes.io/selected-node"
RESIZER_ANNOTATION = "volume.kubernetes.io/storage-resizer"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"

logger = logging.getLogger("hostpath-provisioner")

_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
          "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def quantity_bytes(value: str) -> int:
    """Bytes of a storage quantity such as 10Gi or 500M (the forms claims use)."""
    for suffix in sorted(_UNITS, key=len, reverse=True):
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * _UNITS[suffix])
    return int(float(value))


class Provisioner:
    def __init__(self, api_client: client.ApiClient, root: Path, node: str) -> None:
        self.core = client.CoreV1Api(api_client)
        self.storage = client.StorageV1Api(api_client)
        self.root = root
        self.node = node

    def our_classes(self) -> dict[str, client.V1StorageClass]:
        return {c.metadata.name: c for c in self.storage.list_storage_class().items if c.provisioner == PROVISIONER}

    def pass_once(self) -> None:
        classes = self.our_classes()
        pvs = {pv.metadata.name: pv for pv in self.core.list_persistent_volume().items}
        for claim in self.core.list_persistent_volume_claim_for_all_namespaces().items:
            if claim.spec.storage_class_name not in classes:
                continue
            if claim.status.phase == "Pending" and not claim.spec.volume_name:
                self.provision(claim, classes[claim.spec.storage_class_name], pvs)
            elif claim.status.phase == "Bound" and claim.spec.volume_name in pvs:
                self.expand(claim, pvs[claim.spec.volume_name])
        for pv in pvs.values():
            annotations = pv.metadata.annotations or {}
            if (annotations.get(PROVISIONED_BY) == PROVISIONER and pv.status.phase == "Released"
                    and pv.spec.persistent_volume_reclaim_policy == "Delete"):
                self.delete(pv)

    def provision(self, claim: client.V1PersistentVolumeClaim, storage_class: client.V1StorageClass, pvs: dict) -> None:
        annotations = claim.metadata.annotations or {}
        if not any(annotations.get(a) == PROVISIONER for a in PROVISIONER_ANNOTATIONS):
            return  # the controller-manager has not handed it to an external provisioner yet
        node = annotations.get(SELECTED_NODE)
        if storage_class.volume_binding_mode == "WaitForFirstConsumer" and not node:
            return
        if node and node != self.node:
            return
        name = f"pvc-{claim.metadata.uid}"
        if name in pvs:
            return
        path = self.root / name
        path.mkdir(mode=0o770, parents=True, exist_ok=True)
        os.chmod(path, 0o770)
        size = claim.spec.resources.requests["storage"]
        pv = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name, "annotations": {PROVISIONED_BY: PROVISIONER}},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": claim.spec.access_modes,
                "persistentVolumeReclaimPolicy": storage_class.reclaim_policy or "Delete",
                "storageClassName": storage_class.metadata.name,
                "volumeMode": claim.spec.volume_mode or "Filesystem",
                "local": {"path": str(path)},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [self.node]},
                ]}]}},
                "claimRef": {
                    "apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": claim.metadata.namespace,
                    "name": claim.metadata.name, "uid": claim.metadata.uid,
                },
            },
        }
        try:
            self.core.create_persistent_volume(pv)
            logger.info("provisioned %s for %s/%s at %s (%s)", name, claim.metadata.namespace, claim.metadata.name, path, size)
        except ApiException as err:
            if err.status != 409:
                raise

    def expand(self, claim: client.V1PersistentVolumeClaim, pv: client.V1PersistentVolume) -> None:
        if (pv.metadata.annotations or {}).get(PROVISIONED_BY) != PROVISIONER:
            return
        wanted = claim.spec.resources.requests["storage"]
        have = pv.spec.capacity["storage"]
        status_size = (claim.status.capacity or {}).get("storage", have)
        if quantity_bytes(wanted) > quantity_bytes(have):
            self.core.patch_persistent_volume(pv.metadata.name, {"spec": {"capacity": {"storage": wanted}}})
            have = wanted
            logger.info("expanded %s to %s", pv.metadata.name, wanted)
        if quantity_bytes(status_size) < quantity_bytes(have):
            self.core.patch_namespaced_persistent_volume_claim_status(
                claim.metadata.name, claim.metadata.namespace,
                {"status": {"capacity": {"storage": have}, "allocatedResources": {"storage": have},
                            "allocatedResourceStatuses": None, "conditions": None}},
            )

    def delete(self, pv: client.V1PersistentVolume) -> None:
        path = Path(pv.spec.local.path) if pv.spec.local else None
        if path is not None and path.parent == self.root:
            shutil.rmtree(path, ignore_errors=True)
        try:
            self.core.delete_persistent_volume(pv.metadata.name)
            logger.info("deleted %s and %s", pv.metadata.name, path)
        except ApiException as err:
            if err.status != 404:
                raise

    def run(self, period: float = 1.0) -> None:
        while True:
            try:
                self.pass_once()
            except ApiException as err:
                logger.warning("API error %s: %s", err.status, err.reason)
            except Exception:  # noqa: BLE001 - keep serving; the next pass retries
                logger.exception("provisioner pass failed")
            time.sleep(period)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--root", type=Path, required=True, help="directory the volumes are made in")
    parser.add_argument("--node", required=True, help="the node the directories are on")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.root.mkdir(parents=True, exist_ok=True)
    api_client = config.new_client_from_config(config_file=args.kubeconfig)
    try:
        Provisioner(api_client, args.root.resolve(), args.node).run()
    except KeyboardInterrupt:
        pass
    finally:
        api_client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
