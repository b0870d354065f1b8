import subprocess
import sys

import pytest


@pytest.mark.parametrize("component", ["router", "frontend", "agent", "control", "dispatcher",
                                       "storage"])
def test_every_component_can_be_served_on_its_own(component: str) -> None:
    out = subprocess.run([sys.executable, "-m", "cellcloud", component, "serve", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--listen" in out.stdout


def test_storage_servers_need_a_store_colony(tmp_path) -> None:
    """``up --storage-servers N`` without ``--store-colony`` is refused before anything starts
    (replicated volumes keep their configuration in a store colony)."""
    out = subprocess.run([sys.executable, "-m", "cellcloud", "up", "--storage-servers", "4",
                          "--state-dir", str(tmp_path / "region")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--store-colony" in out.stderr
    assert not (tmp_path / "region" / "region.json").exists()
