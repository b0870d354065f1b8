"""A region for one benchmark run: started detached on a free port, always stopped."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import boto3
from botocore.config import Config


@contextlib.contextmanager
def detached_region(prefix: str, *extra: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(state_dir, region.json)`` of a fresh region; stopped and removed on exit."""
    work = tempfile.mkdtemp(prefix=prefix)
    state = os.path.join(work, "region")
    subprocess.run([sys.executable, "-m", "cellcloud", "up", "--detach", "--port", "0",
                    "--state-dir", state, *extra], check=True, timeout=120)
    try:
        with open(os.path.join(state, "region.json")) as f:
            yield state, json.load(f)
    finally:
        subprocess.run([sys.executable, "-m", "cellcloud", "down", "--state-dir", state],
                       check=False, timeout=120)
        shutil.rmtree(work, ignore_errors=True)


def client(doc: dict[str, Any], service: str, **config: Any) -> Any:
    """A boto3 client of the region's default tenant; no retries unless ``config`` says."""
    return boto3.client(service, endpoint_url=doc["endpoint"], region_name=doc["region"],
                        aws_access_key_id=doc["access_key_id"],
                        aws_secret_access_key=doc["secret_access_key"],
                        config=Config(**{"retries": {"mode": "standard",
                                                     "total_max_attempts": 1}, **config}))


def web_image_archive(work: str) -> str:
    """An OCI archive of the host's Python libraries and /srv/hello.txt (tests/oci_images.py):
    a task image that serves a page with ``python -m http.server``."""
    sys.path.insert(0, os.getcwd())
    from tests.oci_images import host_python_layers, image_layout, layer_tar

    layout = os.path.join(work, "img")
    image_layout(layout, [], tag="v1", config_doc={"Cmd": ["/bin/true"]},
                 blobs=[host_python_layers()[0], layer_tar({"srv/hello.txt": b"hello\n"})])
    archive = os.path.join(work, "img.tar")
    subprocess.run(["tar", "-cf", archive, "-C", layout, "."], check=True)
    return archive


def push_image(state: str, doc: dict[str, Any], archive: str, name: str) -> str:
    """``cellcloud image push``: the image's URI in the region's registry."""
    subprocess.run([sys.executable, "-m", "cellcloud", "image", "push", archive, name,
                    "--state-dir", state], check=True, capture_output=True, timeout=600)
    return f"{doc['endpoint'].split('//', 1)[1]}/{name}"
