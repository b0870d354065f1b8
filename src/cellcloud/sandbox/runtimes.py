"""Which Lambda runtimes this host can run, and how each one starts inside an environment.

``python3.11`` is the interpreter cellcloud itself runs on: environments fork from the zygote
and run the Python runtime as a thread (the fast path). Other ``python3.x`` versions found on
the host run ``pyruntime.py`` as a process; ``provided.al2023`` runs the bundle's (or a
layer's) ``bootstrap``. Both of those speak the Runtime API over HTTP.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

PYRUNTIME = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyruntime.py")
PROVIDED = ("provided.al2023",)
IN_PROCESS = f"python{sys.version_info.major}.{sys.version_info.minor}"
_CANDIDATES = ("python3.11", "python3.12", "python3.13")


@dataclass(frozen=True)
class Runtime:
    name: str
    argv_prefix: tuple[str, ...]  # () for the in-process runtime
    trees: tuple[str, ...]  # host directories to bind read-only


def find() -> dict[str, Runtime]:
    """Probe the host once (runs each candidate interpreter: call before any lock-down)."""
    found: dict[str, Runtime] = {IN_PROCESS: Runtime(IN_PROCESS, (), ())}
    for name in _CANDIDATES:
        if name in found:
            continue
        exe = shutil.which(name)
        if exe is None:
            continue
        try:
            out = subprocess.run(
                [exe, "-c", "import sys; print(sys.executable); print(sys.base_prefix)"],
                capture_output=True, text=True, timeout=20, check=True).stdout.split("\n")
        except (OSError, subprocess.SubprocessError):
            continue
        real, prefix = os.path.realpath(out[0]), os.path.realpath(out[1])
        found[name] = Runtime(name, (real, PYRUNTIME), (prefix,))
    for name in PROVIDED:
        found[name] = Runtime(name, (), ())
    return found


def argv_for(runtime: Runtime, handler: str) -> list[str]:
    if runtime.name in PROVIDED:
        return ["bootstrap"]  # resolved inside the environment: /var/task, then /opt
    if not runtime.argv_prefix:
        return []
    return [*runtime.argv_prefix, handler]
