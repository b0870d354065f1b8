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
