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
