"""A task container's own cgroup (issue #17) as laid out on cgroup v2, checked on a directory
standing in for the hierarchy (the host here runs v1; tests/escape/test_tasks.py runs the real
thing): the child holds only the limits given, the parent's subtree_control hands the
controllers down, and a parent that is gone is not made again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cellcloud.sandbox import cgroups


def _read(path: Path) -> str:
    return path.read_text().strip()


def test_a_child_on_cgroup_v2_gets_its_own_limits(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups, "ROOT", str(tmp_path))
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    task = cgroups.Cgroup("agent-1", "task-t1", ver=2)
    base = tmp_path / "cellcloud" / "agent-1" / "task-t1"
    base.mkdir(parents=True)
    hog = task.child("hog")
    assert hog.rel == os.path.join("cellcloud", "agent-1", "task-t1", "hog")
    hog.create_child_limits(64 * 2**20, 32 * 2**20, 256)
    assert _read(base / "cgroup.subtree_control") == "+memory +pids +cpu"
    assert _read(base / "hog" / "memory.max") == str(64 * 2**20)
    assert _read(base / "hog" / "memory.low") == str(32 * 2**20)
    assert _read(base / "hog" / "memory.swap.max") == "0"
    assert _read(base / "hog" / "cpu.weight") == "25"
    free = task.child("free")
    free.create_child_limits()  # none of its own: the task's bound it
    assert _read(base / "free" / "memory.max") == "max"
    assert _read(base / "free" / "memory.low") == "0"
    assert _read(base / "free" / "cpu.weight") == "100"
    assert not (base / "free" / "pids.max").exists()


def test_a_child_of_a_task_cgroup_that_is_gone_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups, "ROOT", str(tmp_path))
    for c in ("memory", "pids", "cpu", "cpuacct"):  # cgroup v1's controllers, mounted
        (tmp_path / c).mkdir()
    for ver in (1, 2):
        with pytest.raises(FileNotFoundError):
            cgroups.Cgroup("agent-1", "task-gone", ver=ver).child("web").create_child_limits()
    assert not (tmp_path / "cellcloud").exists()
    assert os.listdir(tmp_path / "memory") == []
