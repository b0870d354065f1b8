from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from cellcloud import sdk


@dataclass
class Region:
    state_dir: str
    doc: dict[str, object]
    client: sdk.Client

    @property
    def endpoint(self) -> str:
        return str(self.doc["endpoint"])

    def region_json(self) -> dict[str, object]:
        with open(os.path.join(self.state_dir, "region.json")) as f:
            doc: dict[str, object] = json.load(f)
            return doc

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cellcloud", *args, "--state-dir",
                               self.state_dir], capture_output=True, text=True, check=check,
                              timeout=120)


def start_region(state_dir: str, *extra: str) -> Region:
    subprocess.run([sys.executable, "-m", "cellcloud", "up", "--detach", "--port", "0",
                    "--state-dir", state_dir, *extra], check=True, timeout=120)
    with open(os.path.join(state_dir, "region.json")) as f:
        doc = json.load(f)
    # The test is the region's operator (as `cellcloud status` is): status shows everything.
    token = None
    if doc.get("operator_token_file"):
        with open(doc["operator_token_file"]) as f:
            token = json.load(f).get("token")
    return Region(state_dir, doc, sdk.Client(doc["endpoint"], doc["api_key"], timeout_s=60,
                                             operator_token=token))


def stop_region(region: Region) -> None:
    region.client.close()
    subprocess.run([sys.executable, "-m", "cellcloud", "down", "--state-dir", region.state_dir],
                   check=True, timeout=60)


@contextlib.contextmanager
def running_region(tmp_path_factory: pytest.TempPathFactory, name: str,
                   *extra: str) -> Iterator[Region]:
    """A region for the duration of a fixture: started, yielded, always stopped."""
    r = start_region(str(tmp_path_factory.mktemp(name)), *extra)
    try:
        yield r
    finally:
        stop_region(r)


@pytest.fixture(scope="session")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    with running_region(tmp_path_factory, "region", "--agents-per-cell", "2") as r:
        yield r
