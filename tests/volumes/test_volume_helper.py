"""The agent's volume helper (volumes/helper.py) on its own, over the socketpair the agent
uses: a volume that is the control plane's local file (no storage servers) attached as FUSE
file → loop device → ext4 at the helper's path, sized as asked; a second attach under the same
key refused; a bad request answered with its reason; closing the channel detaches every
volume (the agent is gone) and the helper exits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cellcloud.volumes.blockdev import volume_file
from cellcloud.volumes.helper_client import VolumeHelperClient

pytestmark = pytest.mark.integration

ACCOUNT = "111122223333"
VOL = "vol-0123456789abcdef0"


def _mounted(path: str) -> str | None:
    for line in open("/proc/self/mountinfo"):
        f = line.split()
        if f[4] == path:
            return f[f.index("-") + 1]
    return None


def test_the_helper_attaches_a_local_volume_and_detaches_on_close(tmp_path: Path) -> None:
    run_dir, data_dir = str(tmp_path / "run"), str(tmp_path / "data")
    helper = VolumeHelperClient(run_dir, data_dir)
    helper.start()
    try:
        with pytest.raises(RuntimeError, match="volume_id"):
            helper.attach("t1-data", ACCOUNT, "not-a-volume", 1, 1, False, "task/t1")
        path = helper.attach("t1-data", ACCOUNT, VOL, 1, 1, False, "task/t1")
        assert path == os.path.join(run_dir, "t1-data", "mnt")
        assert _mounted(path) == "ext4"
        st = os.statvfs(path)
        assert 0.9 * 1024**3 < st.f_blocks * st.f_frsize <= 1024**3
        with open(os.path.join(path, "f"), "wb") as f:
            f.write(b"kept")
            os.fsync(f.fileno())
        with pytest.raises(RuntimeError, match="attached already"):
            helper.attach("t1-data", ACCOUNT, VOL, 1, 1, False, "task/t1")
        with pytest.raises(RuntimeError, match="storage servers"):
            helper.attach("t2-data", ACCOUNT, "vol-0123456789abcdef1", 1, 1, True, "task/t2")
        # the volume's bytes are the control plane's file for it
        assert os.path.getsize(volume_file(data_dir, ACCOUNT, VOL)) == 1024**3
        helper.detach("t1-data")
        assert _mounted(path) is None
        again = helper.attach("t1-data", ACCOUNT, VOL, 1, 2, False, "task/t1")
        assert Path(again, "f").read_bytes() == b"kept"  # the filesystem was kept
    finally:
        helper.close()  # the agent is gone: everything detached, the helper exits
    assert _mounted(path) is None
