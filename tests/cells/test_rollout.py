"""Deployment in waves: `cellcloud rollout` restarts each cell's processes, cell by cell."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import make_zip
from tests.integration.conftest import Region, running_region

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_cells(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    with running_region(tmp_path_factory, "rollout", "--cells", "2",
                     "--agents-per-cell", "2") as r:
        yield r


def test_rollout_restarts_cells_in_order_and_service_continues(two_cells: Region) -> None:
    r = two_cells
    r.client.create_function("wave", make_zip({"app.py": "def handler(e, c):\n    return 7\n"}),
                             "app.handler")
    assert r.client.invoke("wave", {}).json() == 7
    before = {k: v["pid"] for k, v in r.region_json()["components"].items()}  # type: ignore[union-attr]
    out = subprocess.run([sys.executable, "-m", "cellcloud", "rollout", "--state-dir",
                          r.state_dir, "--timeout-s", "120"], capture_output=True, text=True,
                         timeout=150)
    assert out.returncode == 0, out.stderr
    with open(os.path.join(r.state_dir, "rollout.json")) as f:
        report = json.load(f)
    assert report["ok"] and [c["cell"] for c in report["cells"]] == ["cell-1", "cell-2"]
    assert all(c["healthy"] for c in report["cells"])
    after = {k: v["pid"] for k, v in r.region_json()["components"].items()}  # type: ignore[union-attr]
    for name in ("cell-1-frontend", "cell-2-frontend", "cell-1-agent-0", "cell-2-agent-1"):
        assert after[name] != before[name], name  # restarted
    assert after["router"] == before["router"] and after["control"] == before["control"]
    assert r.client.invoke("wave", {}).json() == 7  # and the region still serves
