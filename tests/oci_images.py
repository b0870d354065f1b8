"""Small OCI images written by hand (tar + gzip + JSON with their digests) for the registry's
tests and benchmark: no registry, no docker, no network."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = "application/vnd.oci.image.config.v1+json"


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(files: dict[str, bytes], level: int = 1) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=level, mtime=0)


def write_blob(layout: str, data: bytes) -> dict[str, Any]:
    d = digest(data)
    path = os.path.join(layout, "blobs", "sha256", d.split(":")[1])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return {"digest": d, "size": len(data)}


def image_layout(layout: str, layers: list[dict[str, bytes]], tag: str = "latest",
                 cmd: str = "/bin/true") -> dict[str, Any]:
    """An OCI image layout directory holding one image of ``layers`` (each a {path: bytes}),
    tagged ``tag``; returns {"manifest": digest, "layers": [digests], "config": digest}."""
    os.makedirs(layout, exist_ok=True)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    layer_descs, diff_ids = [], []
    for files in layers:
        blob = layer_tar(files)
        diff_ids.append(digest(gzip.decompress(blob)))
        layer_descs.append({"mediaType": LAYER_GZIP, **write_blob(layout, blob)})
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Cmd": [cmd]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    config_desc = {"mediaType": CONFIG, **write_blob(layout, config)}
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": config_desc, "layers": layer_descs}).encode()
    manifest_desc = {"mediaType": OCI_MANIFEST, **write_blob(layout, manifest),
                     "annotations": {"org.opencontainers.image.ref.name": tag}}
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "mediaType": OCI_INDEX,
                   "manifests": [manifest_desc]}, f)
    return {"manifest": manifest_desc["digest"], "config": config_desc["digest"],
            "layers": [d["digest"] for d in layer_descs], "manifest_bytes": manifest}
