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


def layer_tar(files: dict[str, bytes], level: int = 1, modes: dict[str, int] | None = None) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = (modes or {}).get(name, 0o644)
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
                 cmd: str = "/bin/true", config_doc: dict[str, Any] | None = None,
                 blobs: list[bytes] | None = None) -> dict[str, Any]:
    """An OCI image layout directory holding one image of ``layers`` (each a {path: bytes};
    or ready layer ``blobs``), tagged ``tag``, with the image config ``config_doc`` (default:
    Cmd only); returns {"manifest": digest, "layers": [digests], "config": digest}."""
    os.makedirs(layout, exist_ok=True)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    layer_descs, diff_ids = [], []
    for blob in [layer_tar(files) for files in layers] + list(blobs or []):
        diff_ids.append(digest(gzip.decompress(blob)))
        layer_descs.append({"mediaType": LAYER_GZIP, **write_blob(layout, blob)})
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": config_doc or {"Cmd": [cmd]},
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


def _ldd(paths: list[str]) -> set[str]:
    import subprocess

    libs: set[str] = set()
    for p in paths:
        out = subprocess.run(["ldd", p], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            for tok in parts:
                if tok.startswith("/") and os.path.exists(tok):
                    libs.add(tok)
    return libs


def host_python_layers() -> list[bytes]:
    """Layers of a Lambda image for this host's Python: the shared libraries the interpreter
    and its extension modules load (a minimal base, as the AWS base image's /lib), and
    awslambdaric (AWS's runtime interface client) under /opt/ric. The interpreter itself is
    the one the guest agent's tree brings (bound read-only at its host path in every
    environment); the image's ENTRYPOINT names it."""
    import glob
    import sys

    import awslambdaric

    site = os.path.dirname(os.path.dirname(os.path.abspath(awslambdaric.__file__)))
    # The client, its native module and its dependencies, as pip would install them.
    wanted = ["awslambdaric", "simplejson", "snapshot_restore_py.py",
              *[os.path.basename(p) for p in glob.glob(os.path.join(site, "runtime_client*.so"))]]
    dynload = glob.glob(os.path.join(sys.base_prefix, "lib", "python3.*", "lib-dynload",
                                     "*.so"))
    natives = [os.path.join(site, w) for w in wanted if w.endswith(".so")]
    natives += glob.glob(os.path.join(site, "simplejson", "*.so"))
    base: dict[str, bytes] = {}
    modes: dict[str, int] = {}
    for lib in sorted(_ldd([sys.executable, *dynload, *natives])):
        if lib.startswith(sys.base_prefix) or lib.startswith(sys.prefix):
            continue  # in the bound interpreter tree already
        with open(lib, "rb") as f:
            base[lib.lstrip("/")] = f.read()
        modes[lib.lstrip("/")] = os.stat(lib).st_mode & 0o777  # ld.so must stay executable
    base["etc/image-release"] = b"cellcloud test base\n"
    base["etc/doomed"] = b"removed by a later layer's whiteout\n"
    runtime: dict[str, bytes] = {}
    for top in wanted:
        top_path = os.path.join(site, top)
        walk = ([(site, [], [top])] if os.path.isfile(top_path) else os.walk(top_path))
        for dirpath, _dirs, files in walk:
            if "__pycache__" in dirpath:
                continue
            for name in files:
                full = os.path.join(dirpath, name)
                with open(full, "rb") as f:
                    runtime["opt/ric/" + os.path.relpath(full, site)] = f.read()
    runtime["etc/.wh.doomed"] = b""
    return [layer_tar(base, modes=modes), layer_tar(runtime)]


def lambda_image(layout: str, handler: str, tag: str = "latest", env: dict[str, str] | None = None,
                 base: list[bytes] | None = None) -> dict[str, Any]:
    """A Lambda container image of this host's Python: ``host_python_layers()`` plus a handler
    layer (/var/task/app.py holding ``handler``); ENTRYPOINT python -m awslambdaric, CMD
    app.handler, WORKDIR /var/task, ENV PYTHONPATH and ``env``."""
    import sys

    layers = list(base if base is not None else host_python_layers())
    layers.append(layer_tar({"var/task/app.py": handler.encode()}))
    config = {"Entrypoint": [sys.executable, "-m", "awslambdaric"], "Cmd": ["app.handler"],
              "WorkingDir": "/var/task", "User": "1000",
              "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "PYTHONPATH=/opt/ric:/var/task",
                      "LAMBDA_TASK_ROOT=/var/task",
                      *[f"{k}={v}" for k, v in (env or {}).items()]]}
    return image_layout(layout, [], tag, config_doc=config, blobs=layers)


def debian_python_layers() -> list[bytes]:
    """A self-contained Python image base: Debian's /usr/bin/python3.11 with its standard
    library (without tests, dist-packages and caches) and the shared libraries it loads, then
    the awslambdaric layer of ``host_python_layers``. About 40 MB unpacked (slow tests)."""
    import glob

    exe = "/usr/bin/python3.11"
    stdlib = "/usr/lib/python3.11"
    files: dict[str, bytes] = {}
    modes: dict[str, int] = {}

    def add(path: str) -> None:
        with open(path, "rb") as f:
            files[path.lstrip("/")] = f.read()
        modes[path.lstrip("/")] = os.stat(path).st_mode & 0o777

    add(exe)
    for dirpath, dirs, names in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in ("test", "dist-packages", "__pycache__",
                                                "idlelib", "tkinter", "ensurepip")]
        for name in names:
            full = os.path.join(dirpath, name)
            if os.path.isfile(full) and not os.path.islink(full):
                add(full)
    import awslambdaric

    site = os.path.dirname(os.path.dirname(os.path.abspath(awslambdaric.__file__)))
    natives = [*glob.glob(os.path.join(site, "runtime_client*.so")),
               *glob.glob(os.path.join(site, "simplejson", "*.so"))]
    for lib in sorted(_ldd([exe, *glob.glob(os.path.join(stdlib, "lib-dynload", "*.so")),
                            *natives])):
        if not lib.startswith(site):
            add(lib)
    return [layer_tar(files, modes=modes), host_python_layers()[1]]
