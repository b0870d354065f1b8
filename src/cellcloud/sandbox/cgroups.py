"""cgroups for environments: memory, pids and CPU, on cgroup v1 or v2 (detected).

Lambda gives CPU in proportion to memory (one full vCPU at 1,769 MB,
``limits.memory_mb_per_vcpu``); we do the same twice: a hard cap (a CFS quota:
``cpu.cfs_quota_us``/``cpu.cfs_period_us`` on v1, ``cpu.max`` on v2) and a weight under
contention (``cpu.shares`` / ``cpu.weight``). During the init phase the quota is raised to at
least ``env_init_vcpu_min`` vCPUs (Lambda's init burst); the agent lowers it to the cap when the
environment reports ready (:meth:`Cgroup.set_cpu_quota`).

A task's containers (agent/tasks.py) each run in a child of the task's cgroup
(``cellcloud/<group>/task-<id>/<container>``, :meth:`Cgroup.create_child`) holding that
container's own limits (ECS's container ``memory``, ``memoryReservation``, ``cpu``); the task's
cgroup bounds them together, and its usage counts them all (memory, CPU and pids are
hierarchical; OOM kills are counted where the victim was on cgroup v1, so :meth:`Cgroup.usage`
sums the subtree's there). No process ever sits in a cgroup that has children (cgroup v2's
rule). Removal and killing walk the subtree, children first.

``CELLCLOUD_CGROUP_ROOT`` moves the hierarchy's root (tests point it at an empty directory to
see what happens on a host without cgroups: the agent refuses to start unless
``--allow-unlimited``).
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass

from ..core.limits import DEFAULT_LIMITS

ROOT = os.environ.get("CELLCLOUD_CGROUP_ROOT") or "/sys/fs/cgroup"
_V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
UNLIMITED = 1 << 62  # a Limits value at or above this writes "max"


def cpu_quota_us(memory_mb: int, *, init: bool = False,
                 period_us: int = DEFAULT_LIMITS.env_cpu_period_us) -> int:
    """The CFS quota (µs of CPU per ``period_us``) for a function of ``memory_mb``: its
    memory's share of a vCPU, as on Lambda; ``init``: at least ``env_init_vcpu_min`` vCPUs."""
    quota = period_us * memory_mb // DEFAULT_LIMITS.memory_mb_per_vcpu
    if init:
        quota = max(quota, period_us * DEFAULT_LIMITS.env_init_vcpu_min)
    return max(DEFAULT_LIMITS.env_cpu_quota_us_min, quota)


def version() -> int:
    """2 on a unified hierarchy, 1 on the legacy one, 0 if no usable cgroups are mounted."""
    if os.path.exists(os.path.join(ROOT, "cgroup.controllers")):
        return 2
    if os.path.isdir(os.path.join(ROOT, "memory")) and os.path.isdir(os.path.join(ROOT, "pids")):
        return 1
    return 0


@dataclass(frozen=True)
class Limits:
    memory_bytes: int
    pids_max: int
    memory_mb: int
    cpu_quota_us: int = UNLIMITED  # per DEFAULT_LIMITS.env_cpu_period_us; UNLIMITED: no cap
    cpu_shares: int = 0  # cpu.shares (1024 = one vCPU; cpu.weight from it); 0: from memory_mb


@dataclass
class Usage:
    memory_bytes: int = 0  # the cgroup's charge (anonymous + page cache)
    memory_peak_bytes: int = 0
    cpu_ns: int = 0
    oom_kills: int = 0
    pids: int = 0


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _int(path: str) -> int:
    text = _read(path).strip()
    return int(text) if text.isdigit() else 0


class Cgroup:
    """One environment's cgroup at ``cellcloud/<group>/<name>`` in every controller used."""

    def __init__(self, group: str, name: str, ver: int | None = None) -> None:
        self.version = version() if ver is None else ver
        self.group, self.name = group, name
        self.rel = os.path.join("cellcloud", group, name)

    def child(self, name: str) -> Cgroup:
        """The cgroup ``name`` under this one (a task's container's)."""
        return Cgroup(self.group, os.path.join(self.name, name), self.version)

    def _subtree(self, d: str) -> list[str]:
        """``d`` and every cgroup under it, children before their parent."""
        return [top for top, _, _ in os.walk(d, topdown=False)]

    def _dirs(self) -> list[str]:
        if self.version == 2:
            return [os.path.join(ROOT, self.rel)]
        if self.version == 1:
            return [os.path.join(ROOT, c, self.rel) for c in _V1_CONTROLLERS
                    if os.path.isdir(os.path.join(ROOT, c))]
        return []

    def _path(self, controller: str, file: str) -> str:
        if self.version == 2:
            return os.path.join(ROOT, self.rel, file)
        return os.path.join(ROOT, controller, self.rel, file)

    def create(self, limits: Limits) -> None:
        if self.version == 2:
            self._enable_v2_controllers()
        for d in self._dirs():
            os.makedirs(d, exist_ok=True)
        shares = max(2, limits.cpu_shares
                     or 1024 * limits.memory_mb // DEFAULT_LIMITS.memory_mb_per_vcpu)
        mem = str(limits.memory_bytes) if limits.memory_bytes < UNLIMITED else "max"
        pids = str(limits.pids_max) if limits.pids_max < UNLIMITED else "max"
        if self.version == 1:
            _write(self._path("memory", "memory.limit_in_bytes"), "-1" if mem == "max" else mem)
            # Without swap accounting the limit would leak into swap; best effort.
            sw = self._path("memory", "memory.memsw.limit_in_bytes")
            if os.path.exists(sw):
                _write(sw, "-1" if mem == "max" else mem)
            _write(self._path("pids", "pids.max"), pids)
            _write(self._path("cpu", "cpu.shares"), str(shares))
            _write(self._path("cpu", "cpu.cfs_period_us"), str(DEFAULT_LIMITS.env_cpu_period_us))
        elif self.version == 2:
            _write(self._path("", "memory.max"), mem)
            _write(self._path("", "memory.swap.max"), "0")
            _write(self._path("", "pids.max"), pids)
            weight = max(1, min(10000, shares * 100 // 1024))
            _write(self._path("", "cpu.weight"), str(weight))
        self.set_cpu_quota(limits.cpu_quota_us)

    def create_child_limits(self, memory_bytes: int = 0, soft_bytes: int = 0,
                            cpu_shares: int = 0) -> None:
        """Make this cgroup under its parent, which must exist (it is not made again: a task
        destroyed meanwhile raises FileNotFoundError), with only the limits given (0: none
        of its own, the parent's bound it): a hard memory limit (over it the kernel OOM-kills
        in this cgroup), a soft one (``memory.soft_limit_in_bytes`` / ``memory.low``) and a
        CPU weight among its siblings (``cpu.shares`` / ``cpu.weight``)."""
        if self.version == 2:
            parent = os.path.dirname(os.path.join(ROOT, self.rel))
            if not os.path.isdir(parent):
                raise FileNotFoundError(parent)
            _write(os.path.join(parent, "cgroup.subtree_control"), "+memory +pids +cpu")
        for d in self._dirs():
            if not os.path.isdir(os.path.dirname(d)):
                raise FileNotFoundError(os.path.dirname(d))
            with contextlib.suppress(FileExistsError):  # a restart: set again below
                os.mkdir(d)
        hard = str(memory_bytes) if memory_bytes else "-1"
        soft = str(soft_bytes) if soft_bytes else "-1"
        if self.version == 1:
            sw = self._path("memory", "memory.memsw.limit_in_bytes")
            if os.path.exists(sw) and not memory_bytes:  # raised first: memsw >= the limit
                _write(sw, "-1")
            _write(self._path("memory", "memory.limit_in_bytes"), hard)
            if os.path.exists(sw) and memory_bytes:
                _write(sw, hard)
            _write(self._path("memory", "memory.soft_limit_in_bytes"), soft)
            _write(self._path("cpu", "cpu.shares"), str(max(2, cpu_shares) if cpu_shares
                                                        else 1024))
        elif self.version == 2:
            _write(self._path("", "memory.max"), str(memory_bytes) if memory_bytes else "max")
            _write(self._path("", "memory.swap.max"), "0" if memory_bytes else "max")
            _write(self._path("", "memory.low"), str(soft_bytes) if soft_bytes else "0")
            weight = max(1, min(10000, cpu_shares * 100 // 1024)) if cpu_shares else 100
            _write(self._path("", "cpu.weight"), str(weight))

    def set_cpu_quota(self, quota_us: int) -> None:
        """Cap the cgroup's CPU at ``quota_us`` per period (UNLIMITED: no cap). Raises if the
        controller is missing: a cap that cannot be written is not silently skipped."""
        period = DEFAULT_LIMITS.env_cpu_period_us
        if self.version == 1:
            _write(self._path("cpu", "cpu.cfs_quota_us"),
                   "-1" if quota_us >= UNLIMITED else str(quota_us))
        elif self.version == 2:
            _write(self._path("", "cpu.max"),
                   f"max {period}" if quota_us >= UNLIMITED else f"{quota_us} {period}")

    def _enable_v2_controllers(self) -> None:
        parts = self.rel.split(os.sep)
        cur = ROOT
        for part in parts[:-1]:
            ctl = os.path.join(cur, "cgroup.subtree_control")
            try:
                _write(ctl, "+memory +pids +cpu")
            except OSError:
                pass
            cur = os.path.join(cur, part)
            os.makedirs(cur, exist_ok=True)
        try:
            _write(os.path.join(cur, "cgroup.subtree_control"), "+memory +pids +cpu")
        except OSError:
            pass

    def exists(self) -> bool:
        """Whether the cgroup is there in every controller used (a join of a missing one
        would silently leave the process where it was on cgroup v1)."""
        dirs = self._dirs()
        return bool(dirs) and all(os.path.isdir(d) for d in dirs)

    def join(self, pid: int = 0) -> None:
        """Move ``pid`` (0: the caller) into this cgroup in every controller."""
        if self.version == 2:
            _write(self._path("", "cgroup.procs"), str(pid))
            return
        for c in _V1_CONTROLLERS:
            p = self._path(c, "cgroup.procs")
            if os.path.exists(p):
                _write(p, str(pid))

    def pids(self) -> list[int]:
        """The processes in this cgroup and every cgroup under it."""
        top = os.path.dirname(self._path("pids" if self.version == 1 else "", "cgroup.procs"))
        out: list[int] = []
        for d in self._subtree(top):
            out.extend(int(x) for x in _read(os.path.join(d, "cgroup.procs")).split())
        return out

    def usage(self) -> Usage:
        u = Usage()
        if self.version == 1:
            u.memory_bytes = _int(self._path("memory", "memory.usage_in_bytes"))
            u.memory_peak_bytes = _int(self._path("memory", "memory.max_usage_in_bytes"))
            u.cpu_ns = _int(self._path("cpuacct", "cpuacct.usage"))
            # v1 counts an OOM kill only in the victim's own cgroup: the subtree's summed.
            top = os.path.dirname(self._path("memory", "memory.oom_control"))
            oom = "".join(_read(os.path.join(d, "memory.oom_control"))
                          for d in self._subtree(top))
            u.pids = _int(self._path("pids", "pids.current"))
        else:
            u.memory_bytes = _int(self._path("", "memory.current"))
            u.memory_peak_bytes = _int(self._path("", "memory.peak")) or u.memory_bytes
            stat = _read(self._path("", "cpu.stat"))
            for line in stat.splitlines():
                if line.startswith("usage_usec"):
                    u.cpu_ns = int(line.split()[1]) * 1000
            oom = _read(self._path("", "memory.events"))
            u.pids = _int(self._path("", "pids.current"))
        for line in oom.splitlines():
            if line.startswith("oom_kill "):
                u.oom_kills += int(line.split()[1])
        return u

    def kill_all(self) -> None:
        if self.version == 2 and os.path.exists(self._path("", "cgroup.kill")):
            _write(self._path("", "cgroup.kill"), "1")
            return
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def destroy(self) -> bool:
        """Remove the cgroup (its children first) once it is empty. False if processes are
        still exiting."""
        ok = True
        for top in reversed(self._dirs()):
            for d in self._subtree(top):
                if not _rmdir_empty(d):
                    ok = False
        return ok


@dataclass
class Footprint:
    """What an environment really costs, summed over its processes (from smaps_rollup):
    USS counts pages only it maps (pages still shared with the zygote are excluded), PSS
    splits shared pages among their mappers."""

    uss_bytes: int = 0
    pss_bytes: int = 0
    rss_bytes: int = 0
    processes: int = 0


def footprint(pids: list[int]) -> Footprint:
    fp = Footprint()
    for pid in pids:
        text = _read(f"/proc/{pid}/smaps_rollup")
        if not text:
            continue
        fp.processes += 1
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if not parts or not parts[0].isdigit():
                continue
            kb = int(parts[0]) * 1024
            if key in ("Private_Clean", "Private_Dirty"):
                fp.uss_bytes += kb
            elif key == "Pss":
                fp.pss_bytes += kb
            elif key == "Rss":
                fp.rss_bytes += kb
    return fp


def sweep(group: str) -> int:
    """Kill and remove every environment cgroup under ``cellcloud/<group>`` (an agent restarting
    after a crash reclaims what its previous incarnation left). Returns how many were found."""
    ver = version()
    base = os.path.join(ROOT, "cellcloud", group) if ver == 2 else os.path.join(
        ROOT, "pids", "cellcloud", group)
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return 0
    count = 0
    for name in names:
        if os.path.isdir(os.path.join(base, name)):
            cg = Cgroup(group, name, ver)
            cg.kill_all()
            count += 1
    return count


def favor_dynmods(mount_dir: str) -> str:
    """Put the host's cgroups in ``favordynmods`` mode: moving a process into a cgroup then no
    longer waits for an RCU grace period (~10–15 ms on cgroup v1 — the largest single cost of
    a cold start), at a small cost to fork and exit. A serverless host creates and joins
    cgroups all day, so agents ask for it at start (``--no-favor-dynmods`` opts out).

    cgroup v2: a remount with the option. cgroup v1 has no remount for it; mounting a named,
    controller-less hierarchy with the option turns the mode on (the kernel's switch is
    global), and it stays mounted under ``mount_dir`` so the mode lasts. Returns what it did;
    failures are reported, never fatal (older kernels do not know the option)."""
    from . import linux

    ver = version()
    try:
        if ver == 2:
            linux.mount(None, ROOT, None, linux.MS_REMOUNT, "favordynmods")
            return "cgroup2 remounted with favordynmods"
        if ver == 1:
            with open("/proc/mounts") as f:
                if any("favordynmods" in line for line in f if " cgroup " in line):
                    return "already in favordynmods mode"
            os.makedirs(mount_dir, exist_ok=True)
            linux.mount("cellcloud", mount_dir, "cgroup", 0,
                        "none,name=cellcloud-dynmods,favordynmods")
            return f"named cgroup v1 hierarchy with favordynmods mounted at {mount_dir}"
    except OSError as e:
        return f"favordynmods not available: {e}"
    return "no cgroups"


def remove_group(group: str) -> bool:
    """Remove an agent's ``cellcloud/<group>`` cgroup and every empty environment cgroup left
    under it, in every controller (an agent stopping for good leaves nothing behind). False if
    something could not be removed (processes still in it)."""
    ver = version()
    if ver == 2:
        bases = [os.path.join(ROOT, "cellcloud", group)]
    elif ver == 1:
        bases = [os.path.join(ROOT, c, "cellcloud", group) for c in _V1_CONTROLLERS]
    else:
        return True
    ok = True
    for base in bases:
        try:
            names = os.listdir(base)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            if os.path.isdir(os.path.join(base, name)):
                for d in [t for t, _, _ in os.walk(os.path.join(base, name), topdown=False)]:
                    if not _rmdir_empty(d):
                        ok = False
        if not _rmdir_empty(base):
            ok = False
    return ok


def _rmdir_empty(d: str) -> bool:
    """Remove the cgroup directory ``d`` (gone already is fine). False if it could not be
    removed (processes or child cgroups still in it)."""
    try:
        os.rmdir(d)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True
