"""The real zygote with timing marks, for bench/sandbox.py's cold-start profile.

Run exactly like ``python -m cellcloud.sandbox.zygote <fd> <root>``; it wraps the spawn steps
(fork, cgroup, unshare, /tmp device, mounts, pivot_root, seccomp, uid drop, handler import) so
each appends ``(label, time.time())`` to ``sys._cc_marks``. The list is reset at every spawn and
inherited across both forks, so the environment's process (B) ends up holding the whole
zygote -> A -> B timeline; the profiling handler returns it. Nothing in src/ is modified: the
wrappers are installed on the module attributes the code already looks up at call time.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import types
from typing import Any

from cellcloud.sandbox import cgroups, guest, jail, linux, seccomp_policy, zygote
from cellcloud.sandbox.ephemeral import LoopPool

pyruntime: types.ModuleType
try:
    pyruntime = importlib.import_module("cellcloud.sandbox.pyruntime")
except ImportError:  # older trees load the handler in guest.py
    pyruntime = guest

sys._cc_marks = []  # type: ignore[attr-defined]


def mark(label: str) -> None:
    sys._cc_marks.append((label, time.time()))  # type: ignore[attr-defined]


def _wrap(obj: Any, attr: str, label: str) -> None:
    fn = getattr(obj, attr, None)
    if fn is None:  # src/ moved on: time what still exists
        return

    def wrapper(*a: Any, **kw: Any) -> Any:
        mark(label + ">")
        try:
            return fn(*a, **kw)
        finally:
            mark(label + "<")

    setattr(obj, attr, wrapper)


def _install() -> None:
    real_spawn = zygote.spawn

    def spawn(*a: Any, **kw: Any) -> Any:
        sys._cc_marks = []  # type: ignore[attr-defined]
        mark("zygote.recv")
        return real_spawn(*a, **kw)

    zygote.spawn = spawn

    real_fork = os.fork

    def fork() -> int:
        mark("fork>")
        pid = real_fork()
        if pid == 0:
            mark("fork<child")
        return pid

    os.fork = fork
    _wrap(LoopPool, "take", "loop.take")
    _wrap(LoopPool, "_make", "loop.make(pool miss)")
    _wrap(cgroups.Cgroup, "create", "cgroup.create")
    _wrap(cgroups.Cgroup, "join", "cgroup.join")
    _wrap(linux, "unshare", "unshare")
    _wrap(jail, "runtime_trees", "jail.runtime_trees")
    _wrap(jail, "build_root", "jail.build_root")
    _wrap(linux, "mount", "mount")
    _wrap(linux, "pivot_root", "pivot_root")
    _wrap(linux, "umount2", "umount2(old root)")
    _wrap(jail, "_limits", "rlimits")
    _wrap(jail, "_close_fds", "close_fds")
    _wrap(seccomp_policy, "load", "seccomp.load")
    _wrap(os, "setresuid", "setresuid")
    _wrap(guest, "run", "guest.run")
    _wrap(guest, "_LogCapture", "guest.log_capture")
    _wrap(guest, "load_handler", "load_handler(import)")
    if pyruntime is not guest:
        _wrap(pyruntime, "load_handler", "load_handler(import)")
        _wrap(guest, "_start_in_process", "guest.start_runtime_thread")


if __name__ == "__main__":
    _install()
    zygote.main()
