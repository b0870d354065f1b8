"""Issue 3's benchmark: cold start, scale-out, density and environments held, for the jail.

Run from the repository root, as root::

    python -m bench.sandbox [--quick] [--only cold,scale,density,held,warm]

cold     (1) agent level: an in-process ``Agent`` + ``JailBackend`` (the real zygote and jail, as
         in tests/escape/conftest.py); per sample ``create_env`` then ``invoke`` of
         ``def handler(e, c): import time; return time.time()``; cold = handler entry - wall
         time just before create_env (also create_env alone). (2) full path: a real region
         (``cellcloud up --detach --port 0``), N functions deployed with the same zip (so the
         bundle is already on the agents and no warm environment matches), each invoked once
         through the router with the SDK; cold = handler entry - time just before the SDK call.
         Baseline in the same run: ``python -c`` importing the same handler module from a temp
         dir and printing time.time() at handler entry (process start -> handler running).
         Samples are spaced by 50 ms, so the zygote's pool of ready /tmp loop devices (refilled
         when idle, sandbox/ephemeral.py) is in steady state. A profile run repeats (1) with
         bench/common/zygote_prof.py as the zygote: the spawn steps timestamped in the
         environment, medians printed.
scale    1,000 concurrent create_env + invoke of one 128 MB function whose handler waits until
         a wall-clock deadline in its event; time from the first request to the 1,000th handler
         running (max handler entry - t0); with 1 agent (1 zygote) and 2 agents (2 zygotes).
density  20 idle environments (one invocation served): USS / PSS / RSS summed over each one's
         cgroup processes (Agent.status, smaps_rollup), and the host-level cost per environment
         (MemAvailable drop / n, which also counts kernel objects: namespaces, mounts, ext4 /tmp,
         loop devices, page tables, cgroups).
warm     warm invokes of an echo handler through an in-process agent and one environment:
         wall time and the agent's CPU per invoke, 100 B and 256 KiB events (the agent <-> guest
         channel's cost).
held     idle environments created in batches until 2,000, MemAvailable < 4 GiB, a create
         failure, or the time bound; held count, per-env host memory, extrapolation to the host.

Prints a table with ratios to the anchors, writes JSON under bench/results/. Benchmarks are not
tests: nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from typing import Any

from bench.common.proc import cpu_s, machine_facts, system_busy_s
from bench.common.results import run_recorded
from cellcloud.agent.server import Agent
from cellcloud.core.limits import DEFAULT_LIMITS
from cellcloud.sandbox import cgroups
from cellcloud.sandbox.backend import JailBackend

# -- anchors and goals (issue 3) ---------------------------------------------------------------
LAMBDA_COLD_MS = 50.0  # Lambda's best cold start
FIRECRACKER_BOOT_MS = 125.0  # Firecracker boots in <= 125 ms
FIRECRACKER_VMM_MIB = 5.0  # Firecracker's VMM alone is <= 5 MiB
LAMBDA_SCALE_PER_S = 100.0  # Lambda's per-function scaling rate: 1,000 per 10 s
GOAL_COLD_P50_MS = 25.0
GOAL_SCALE_S = 10.0
GOAL_USS_MIB = 8.0

COLD_HANDLER = "import time\n\ndef handler(e, c):\n    return time.time()\n"
PROFILE_HANDLER = (
    "import sys, time\n\n"
    "def handler(e, c):\n"
    "    t = time.time()\n"
    "    return {'t': t, 'marks': getattr(sys, '_cc_marks', None)}\n"
)
WAIT_HANDLER = (
    "import time\n\n"
    "def handler(e, c):\n"
    "    t = time.time()\n"
    "    time.sleep(max(0.0, e['until'] - t))\n"
    "    return t\n"
)
WAIT_PROFILE_HANDLER = (
    "import sys, time\n\n"
    "def handler(e, c):\n"
    "    t = time.time()\n"
    "    time.sleep(max(0.0, e['until'] - t))\n"
    "    return {'t': t, 'marks': getattr(sys, '_cc_marks', None)}\n"
)
TRIVIAL_HANDLER = "def handler(e, c):\n    return 1\n"
SAMPLE_GAP_S = 0.05  # lets the zygote top its /tmp device pool back up between samples
UID_BASE = 600_000  # away from the regions' 200,000+ and the escape suite's 400,000
SCALE_ABORT_S = 120.0
MIB = 2**20


# -- small helpers -----------------------------------------------------------------------------
def pct(vals: list[float], p: float) -> float:
    s = sorted(vals)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def summary_ms(vals_s: list[float]) -> dict[str, Any]:
    ms = [v * 1000 for v in vals_s]
    return {"n": len(ms), "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99),
            "min_ms": min(ms) if ms else float("nan"), "max_ms": max(ms) if ms else float("nan"),
            "mean_ms": statistics.fmean(ms) if ms else float("nan")}


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, rest = line.partition(":")
            out[k] = int(rest.split()[0]) * 1024
    return out


def machine() -> dict[str, Any]:
    return {**machine_facts(), "mem_total_gib": meminfo()["MemTotal"] / 2**30,
            "cgroup_version": cgroups.version()}


def make_zip(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return buf.getvalue()


def loop_devices_attached() -> int:
    n = 0
    with contextlib.suppress(OSError):
        for name in os.listdir("/sys/block"):
            if name.startswith("loop"):
                with contextlib.suppress(OSError), open(f"/sys/block/{name}/size") as f:
                    n += int(f.read().strip() or 0) > 0
    return n


def cleanup_group(group: str, timeout_s: float = 30.0) -> int:
    """Kill every process left in cellcloud/<group>/* and remove the cgroups (bounded wait)."""
    found = cgroups.sweep(group)
    ver = cgroups.version()
    if ver == 2:
        bases = [os.path.join(cgroups.ROOT, "cellcloud", group)]
    else:
        bases = [os.path.join(cgroups.ROOT, c, "cellcloud", group) for c in
                 ("memory", "pids", "cpu", "cpuacct")]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = 0
        for base in bases:
            with contextlib.suppress(FileNotFoundError):
                for name in os.listdir(base):
                    p = os.path.join(base, name)
                    if os.path.isdir(p):
                        try:
                            os.rmdir(p)
                        except FileNotFoundError:
                            pass
                        except OSError:
                            left += 1
                            with contextlib.suppress(OSError):
                                cgroups.Cgroup(group, name, ver).kill_all()
                with contextlib.suppress(OSError):
                    os.rmdir(base)
        if not left:
            break
        time.sleep(0.1)
    return found


def cgroup_migration_probe(n: int = 15, gap_s: float = SAMPLE_GAP_S) -> dict[str, Any]:
    """Time one process's move into a fresh cgroup (every controller the jail uses), isolated
    (gap_s apart) and back to back. On cgroup v1 without favordynmods an isolated move waits
    for an RCU grace period (percpu_down_write of cgroup_threadgroup_rwsem); in a burst the
    grace period is shared. Which mode the kernel is in shows here."""
    if cgroups.version() != 1:
        return {"skipped": "cgroup v2"}
    ctrls = [c for c in ("memory", "pids", "cpu", "cpuacct")
             if os.path.isdir(os.path.join(cgroups.ROOT, c))]
    base = f"cellcloud-bench-probe-{uuid.uuid4().hex[:6]}"
    out: dict[str, Any] = {}
    for mode, gap in (("isolated", gap_s), ("back_to_back", 0.0)):
        ts = []
        for i in range(n):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.read(r, 1)
                os._exit(0)
            try:
                for c in ctrls:
                    os.makedirs(os.path.join(cgroups.ROOT, c, base, f"{mode}{i}"))
                t = time.perf_counter()
                for c in ctrls:
                    with open(os.path.join(cgroups.ROOT, c, base, f"{mode}{i}", "cgroup.procs"), "w") as f:
                        f.write(str(pid))
                ts.append(time.perf_counter() - t)
            finally:
                os.write(w, b"x")
                os.waitpid(pid, 0)
                os.close(r)
                os.close(w)
            time.sleep(gap)
        out[mode] = summary_ms(ts)
    for c in ctrls:
        d = os.path.join(cgroups.ROOT, c, base)
        for _ in range(50):
            with contextlib.suppress(OSError):
                for name in os.listdir(d):
                    with contextlib.suppress(OSError):
                        os.rmdir(os.path.join(d, name))
                os.rmdir(d)
            if not os.path.exists(d):
                break
            time.sleep(0.05)
    with open("/proc/mounts") as f:
        out["favordynmods_mount"] = any("favordynmods" in line for line in f
                                        if " cgroup" in line)
    return out


# -- an in-process agent with the real jail -----------------------------------------------------
class ProfilingBackend(JailBackend):
    """The jail backend with bench/common/zygote_prof.py as its zygote (timing marks)."""

    def start(self) -> None:
        import socket as _socket

        os.makedirs(self.root_dir, mode=0o755, exist_ok=True)
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = repo + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.common.zygote_prof", str(theirs.fileno()),
             self.root_dir], pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            start_new_session=True, env=env, cwd=repo)
        theirs.close()
        self._ctl = ours

    async def spawn(self, spec: Any, netns_fd: int | None = None) -> Any:
        s = await super().spawn(spec, netns_fd)
        self.last_spawn_returned = time.time()
        return s


class InProcAgent:
    """One real ``Agent`` + ``JailBackend`` (its own zygote) in this process's event loop."""

    def __init__(self, work: str, name: str, uid_base: int, *, envs_max: int = 1000,
                 oversubscription: float = 4.0, profile: bool = False) -> None:
        self.group = f"bench-sbx-{name}-{uuid.uuid4().hex[:6]}"
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir, mode=0o755, exist_ok=True)
        cls = ProfilingBackend if profile else JailBackend
        self.backend = cls(os.path.join(self.dir, "jailroot"))
        self.backend.start()
        self.agent = Agent(self.group, self.dir, self.backend, uid_base=uid_base,
                           envs_max=envs_max, oversubscription=oversubscription)
        self.bundles: dict[str, str] = {}

    def bundle(self, code: str) -> str:
        data = make_zip({"app.py": code})
        sha = hashlib.sha256(data).hexdigest()
        self.agent._bundle(sha, data)
        return sha

    def body(self, sha: str, env_id: str, *, memory_mb: int = 128, timeout_s: int = 3,
             create_timeout_ms: int | None = None) -> dict[str, Any]:
        b: dict[str, Any] = {
            "env_id": env_id, "bundle_sha256": sha, "function_key": "bench",
            "function": {"name": "bench", "arn": "arn:aws:lambda:cc-local-1:1:function:bench",
                         "handler": "app.handler", "runtime": "python3.11",
                         "memory_mb": memory_mb, "timeout_s": timeout_s},
        }
        if create_timeout_ms:
            b["create_timeout_ms"] = create_timeout_ms
        return b

    async def invoke(self, env_id: str, event: Any = None, timeout_ms: int = 3000) -> Any:
        res = await self.agent.invoke({"env_id": env_id, "request_id": uuid.uuid4().hex,
                                       "payload": json.dumps(event or {}).encode(),
                                       "timeout_ms": timeout_ms})
        if res["function_error"] is not None:
            raise RuntimeError(f"invoke failed: {res['payload'][:300]!r}")
        return json.loads(res["payload"])

    @property
    def zygote_pid(self) -> int:
        return self.backend.zygote_pid

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.agent.close()  # kills every environment and the zygote
        cleanup_group(self.group)


# -- warm invoke (the agent <-> guest channel) ---------------------------------------------------
ECHO_HANDLER = "def handler(e, c):\n    return e\n"


async def warm_agent(work: str, n: int, sizes: tuple[int, ...] = (100, 256 * 1024)) -> dict[str, Any]:
    """Warm invokes through an in-process agent and one jailed environment (1,769 MB: a whole
    vCPU, so the CPU quota does not pace it): per payload size, wall time per ``invoke`` and the
    agent's CPU time per invoke (this process), i.e. the agent <-> guest channel's cost."""
    a = InProcAgent(work, "warm", UID_BASE)
    out: dict[str, Any] = {}
    try:
        sha = a.bundle(ECHO_HANDLER)
        await a.agent.create_env(a.body(sha, "warm-0", memory_mb=DEFAULT_LIMITS.memory_mb_per_vcpu))
        for size in sizes:
            event = {"pad": "x" * size}
            for _ in range(max(10, n // 10)):
                await a.invoke("warm-0", event)
            walls = []
            c0 = time.process_time()
            for _ in range(n):
                t0 = time.perf_counter()
                await a.invoke("warm-0", event)
                walls.append(time.perf_counter() - t0)
            cpu = time.process_time() - c0
            out[str(size)] = {"n": n, "wall_us_p50": round(statistics.median(walls) * 1e6, 1),
                              "wall_us_mean": round(statistics.fmean(walls) * 1e6, 1),
                              "agent_cpu_us": round(cpu / n * 1e6, 1)}
        await a.agent.destroy({"env_id": "warm-0"})
        return out
    finally:
        a.close()


# -- cold start ----------------------------------------------------------------------------------
async def cold_agent(work: str, n: int, warmup: int) -> dict[str, Any]:
    a = InProcAgent(work, "cold", UID_BASE)
    try:
        sha = a.bundle(COLD_HANDLER)
        cold, create = [], []
        for i in range(warmup + n):
            env_id = f"cold-{i}"
            t0 = time.time()
            await a.agent.create_env(a.body(sha, env_id))
            t1 = time.time()
            entered = await a.invoke(env_id)
            await a.agent.destroy({"env_id": env_id})
            if i >= warmup:
                cold.append(entered - t0)
                create.append(t1 - t0)
            await asyncio.sleep(SAMPLE_GAP_S)
        return {"cold": summary_ms(cold), "create_env": summary_ms(create),
                "samples_ms": [round(v * 1000, 3) for v in cold]}
    finally:
        a.close()


async def cold_profile(work: str, n: int, warmup: int) -> dict[str, Any]:
    """The agent-level cold start again, with the timing zygote: median of every step."""
    a = InProcAgent(work, "prof", UID_BASE + 20_000, profile=True)
    try:
        sha = a.bundle(PROFILE_HANDLER)
        segs: dict[str, list[float]] = {}
        order: list[str] = []
        totals: list[float] = []
        spawn_rt: list[float] = []
        for i in range(warmup + n):
            env_id = f"prof-{i}"
            t0 = time.time()
            await a.agent.create_env(a.body(sha, env_id))
            t_created = time.time()
            t_spawned = getattr(a.backend, "last_spawn_returned", t_created)
            out = await a.invoke(env_id)
            await a.agent.destroy({"env_id": env_id})
            await asyncio.sleep(SAMPLE_GAP_S)
            if i < warmup or not out.get("marks"):
                continue
            marks = [("agent.create_env", t0)] + [tuple(m) for m in out["marks"]]
            # agent-side points, placed on the same wall clock
            # The agent's "zygote replied" happens while B is already jailing itself, so it is
            # reported on its own (spawn round trip), not put in the timeline.
            spawn_rt.append(t_spawned - t0)
            marks += [("agent: ready received", t_created), ("handler entry", out["t"])]
            marks.sort(key=lambda m: m[1])
            totals.append(out["t"] - t0)
            # Fold repeated labels (mounts) into one segment each: "a -> b" by label pair.
            for (la, ta), (lb, tb) in zip(marks, marks[1:], strict=False):
                key = f"{la} -> {lb}"
                if key not in segs:
                    order.append(key)
                segs.setdefault(key, []).append(tb - ta)
        per_sample = max(1, len(totals))
        rows = []
        for key in order:
            vals = segs[key]
            # summed per sample (a segment may repeat, e.g. mount -> mount), median over samples
            rows.append({"step": key, "count_per_sample": len(vals) / per_sample,
                         "total_per_sample_ms": 1000 * sum(vals) / per_sample,
                         "median_each_ms": 1000 * statistics.median(vals)})
        return {"n": len(totals), "cold": summary_ms(totals), "steps": rows,
                "spawn_round_trip": summary_ms(spawn_rt)}
    finally:
        a.close()


def cold_python_c(n: int, warmup: int) -> dict[str, Any]:
    d = tempfile.mkdtemp(prefix="cellcloud-bench-pyc-")
    try:
        with open(os.path.join(d, "app.py"), "w") as f:
            f.write(COLD_HANDLER)
        code = f"import sys; sys.path.insert(0, {d!r}); import app; print(repr(app.handler({{}}, None)))"
        vals = []
        for i in range(warmup + n):
            t0 = time.time()
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=30, check=True)
            if i >= warmup:
                vals.append(float(p.stdout.strip()) - t0)
            time.sleep(SAMPLE_GAP_S)
        return {"cold": summary_ms(vals), "exe": sys.executable}
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Region:
    def __init__(self, home: str) -> None:
        self.home = home
        self.env = {**os.environ, "CELLCLOUD_HOME": home}

    def cli(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cellcloud", *args, "--state-dir", self.home],
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def start(self) -> None:
        p = self.cli("up", "--detach", "--port", "0")
        if p.returncode != 0:
            raise RuntimeError(f"cellcloud up failed: {p.stdout}{p.stderr}")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.cli("down", timeout=60)


def cold_region(work: str, n: int, warmup: int) -> dict[str, Any]:
    from cellcloud.sdk import Client

    home = os.path.join(work, "region")
    os.makedirs(home, exist_ok=True)
    r = Region(home)
    t_up = time.monotonic()
    r.start()
    up_s = time.monotonic() - t_up
    try:
        c = Client.from_region(home)
        c.timeout_s = 30
        zip_bytes = make_zip({"app.py": COLD_HANDLER})
        names = [f"cold-{i}" for i in range(warmup + n)]
        for name in names:
            c.create_function(name, zip_bytes, "app.handler")
        vals = []
        for i, name in enumerate(names):
            t0 = time.time()
            resp = c.invoke(name, {})
            entered = float(json.loads(resp.payload))
            if i >= warmup:  # the warm-up ones also push the bundle to both agents
                vals.append(entered - t0)
            time.sleep(SAMPLE_GAP_S)
        warm = []
        for _ in range(n):  # the same functions again: warm, for scale
            t0 = time.time()
            warm.append(float(json.loads(c.invoke(names[-1], {}).payload)) - t0)
        c.close()
        return {"cold": summary_ms(vals), "warm_same_path": summary_ms(warm),
                "region_up_s": up_s}
    finally:
        r.stop()


# -- scale-out -----------------------------------------------------------------------------------
def fold_marks(t0: float, marks: list[Any], extra: list[tuple[str, float]]) -> dict[str, float]:
    """One sample's timeline as {"a -> b": seconds summed}, in time order."""
    ms = sorted([("agent.create_env", t0)] + [tuple(m) for m in marks] + extra,
                key=lambda m: m[1])
    out: dict[str, float] = {}
    for (la, ta), (lb, tb) in zip(ms, ms[1:], strict=False):
        out[f"{la} -> {lb}"] = out.get(f"{la} -> {lb}", 0.0) + (tb - ta)
    return out


async def scale_out(work: str, total: int, n_agents: int, hold_s: float,
                    profile: bool = False) -> dict[str, Any]:
    host = meminfo()
    # 1,000 x 128 MB configured must fit the admission check: oversubscription x budget.
    budget = int(host["MemTotal"] * 0.8)
    over = max(4.0, 1.25 * total * 128 * MIB / budget / n_agents)
    agents = [InProcAgent(work, f"scale{n_agents}-{k}", UID_BASE + 40_000 + k * 10_000,
                          envs_max=total, oversubscription=over, profile=profile)
              for k in range(n_agents)]
    result: dict[str, Any] = {"agents": n_agents, "requested": total, "oversubscription": over,
                              "hold_s": hold_s, "profile": profile}
    try:
        shas = [a.bundle(WAIT_PROFILE_HANDLER if profile else WAIT_HANDLER) for a in agents]
        # one warm-up env per agent (template image, page cache), destroyed before t0
        for a, sha in zip(agents, shas, strict=True):
            await a.agent.create_env(a.body(sha, "warm"))
            await a.agent.destroy({"env_id": "warm"})
        await asyncio.sleep(1.0)  # let the zygotes refill their /tmp pools
        cpu0 = {k: cpu_s(a.zygote_pid) for k, a in enumerate(agents)}
        self0 = cpu_s(os.getpid())
        busy0 = system_busy_s()
        t0 = time.time()
        deadline = t0 + hold_s
        ready_at: list[float] = []
        errors: dict[str, int] = {}
        loops0 = loop_devices_attached()
        folded: list[tuple[float, dict[str, float]]] = []

        async def one(i: int) -> float:
            a = agents[i % n_agents]
            env_id = f"s-{i}"
            t_req = time.time()
            await a.agent.create_env(a.body(shas[i % n_agents], env_id, timeout_s=900,
                                            create_timeout_ms=60_000))
            t_ready = time.time()
            ready_at.append(t_ready)
            out = await a.invoke(env_id, {"until": deadline},
                                 timeout_ms=int((hold_s + 60) * 1000))
            if isinstance(out, dict):
                if out.get("marks"):
                    folded.append((out["t"], fold_marks(t_req, out["marks"], [
                        ("agent: ready received", t_ready), ("handler entry", out["t"])])))
                return float(out["t"])
            return float(out)

        tasks = [asyncio.ensure_future(one(i)) for i in range(total)]
        done, pending = await asyncio.wait(tasks, timeout=SCALE_ABORT_S)
        for t in pending:
            t.cancel()
        entries = []
        for t in done:
            if t.exception() is not None:
                e = t.exception()
                key = f"{type(e).__name__}: {str(e)[:120]}"
                errors[key] = errors.get(key, 0) + 1
            else:
                entries.append(t.result())
        busy = system_busy_s() - busy0
        result["loop_devices_in_use"] = loop_devices_attached() - loops0
        if folded:  # where the time goes, first decile vs last decile of handler entries
            folded.sort(key=lambda f: f[0])
            k = max(1, len(folded) // 10)
            steps: dict[str, dict[str, float]] = {}
            for name, part in (("first_10pct", folded[:k]), ("last_10pct", folded[-k:])):
                for f in part:
                    for key, v in f[1].items():
                        steps.setdefault(key, {}).setdefault(name, 0.0)
                        steps[key][name] += 1000 * v / len(part)
            result["steps_ms"] = steps
        env_cpu_ms: list[float] = []
        for a in agents:  # each environment's own CPU (its cgroup: A's unshare, B's jail + init)
            st = await a.agent.status()
            env_cpu_ms += [e["cpu_ns"] / 1e6 for e in st["envs"]]
        entries.sort()
        ready_at.sort()
        rel = [e - t0 for e in entries]
        result.update({
            "handlers_run": len(entries), "failed": sum(errors.values()),
            "aborted": len(pending), "errors": errors,
            "t_last_handler_s": rel[-1] if rel else None,
            "t_last_ready_s": ready_at[-1] - t0 if ready_at else None,
            "t_half_s": rel[len(rel) // 2] if rel else None,
            "concurrent_at_deadline": sum(1 for e in entries if e < deadline),
            "rate_per_s": len(rel) / rel[-1] if rel else 0.0,
            "zygote_cpu_s": [cpu_s(a.zygote_pid) - cpu0[k] for k, a in enumerate(agents)],
            "agent_process_cpu_s": cpu_s(os.getpid()) - self0,
            "host_busy_cpu_s": busy,
            "env_cpu_ms": {"p50": pct(env_cpu_ms, 50), "p90": pct(env_cpu_ms, 90),
                           "sum_s": sum(env_cpu_ms) / 1000},
            "timeline_s": {str(q): rel[min(len(rel) - 1, int(q / 100 * len(rel)))]
                           for q in (10, 25, 50, 75, 90, 100)} if rel else {},
        })
        return result
    finally:
        t_c = time.monotonic()
        for a in agents:
            a.close()
        result["teardown_s"] = time.monotonic() - t_c


# -- density and held ----------------------------------------------------------------------------
async def settle(s: float) -> dict[str, int]:
    await asyncio.sleep(s)
    return meminfo()


async def density(work: str, n: int) -> dict[str, Any]:
    a = InProcAgent(work, "density", UID_BASE + 80_000)
    try:
        sha = a.bundle(TRIVIAL_HANDLER)
        await a.agent.create_env(a.body(sha, "warm"))
        await a.agent.destroy({"env_id": "warm"})
        m0 = await settle(1.5)
        for i in range(n):
            await a.agent.create_env(a.body(sha, f"d-{i}"))
            await a.invoke(f"d-{i}")
            await asyncio.sleep(SAMPLE_GAP_S)
        m1 = await settle(1.5)
        st = await a.agent.status()
        envs = st["envs"]
        uss = [e["uss_bytes"] / MIB for e in envs]
        pss = [e["pss_bytes"] / MIB for e in envs]
        rss = [e["rss_bytes"] / MIB for e in envs]
        charged = [e["memory_bytes"] / MIB for e in envs]
        procs = [e["processes"] for e in envs]
        zfp = cgroups.footprint([a.zygote_pid])

        def d(k: str) -> float:
            return (m0[k] - m1[k]) / n / MIB if k in m0 else float("nan")

        return {
            "n": n,
            "uss_mib": {"p50": pct(uss, 50), "min": min(uss), "max": max(uss)},
            "pss_mib": {"p50": pct(pss, 50), "min": min(pss), "max": max(pss)},
            "rss_mib": {"p50": pct(rss, 50)},
            "cgroup_charge_mib": {"p50": pct(charged, 50)},
            "processes_per_env": pct([float(p) for p in procs], 50),
            "host_memavailable_drop_per_env_mib": d("MemAvailable"),
            "host_memfree_drop_per_env_mib": d("MemFree"),
            "slab_per_env_mib": -d("Slab"), "page_tables_per_env_mib": -d("PageTables"),
            "kernel_stack_per_env_mib": -d("KernelStack"),
            "shmem_per_env_mib": -d("Shmem"),
            "zygote_rss_mib": zfp.rss_bytes / MIB, "zygote_uss_mib": zfp.uss_bytes / MIB,
        }
    finally:
        a.close()


async def held(work: str, bound: int, batch: int, time_s: float,
               mem_floor: int = 4 * 2**30) -> dict[str, Any]:
    a = InProcAgent(work, "held", UID_BASE + 100_000, envs_max=bound, oversubscription=1000.0)
    out: dict[str, Any] = {"bound": bound, "batch": batch}
    try:
        sha = a.bundle(TRIVIAL_HANDLER)
        await a.agent.create_env(a.body(sha, "warm"))
        await a.agent.destroy({"env_id": "warm"})
        m0 = await settle(1.5)
        loops0 = loop_devices_attached()
        t_start = time.monotonic()
        count, stop, batches = 0, "bound", []
        while count < bound:
            if time.monotonic() - t_start > time_s:
                stop = f"time bound ({time_s:.0f} s)"
                break
            if meminfo()["MemAvailable"] < mem_floor:
                stop = "MemAvailable < 4 GiB"
                break
            k = min(batch, bound - count)
            tb = time.monotonic()
            res = await asyncio.gather(*[a.agent.create_env(a.body(sha, f"h-{count + j}"))
                                         for j in range(k)], return_exceptions=True)
            errs = [r for r in res if isinstance(r, BaseException)]
            count += k - len(errs)
            batches.append({"held": count, "batch_s": time.monotonic() - tb,
                            "mem_available_gib": meminfo()["MemAvailable"] / 2**30})
            if errs:
                stop = f"create failed: {type(errs[0]).__name__}: {str(errs[0])[:200]}"
                out["create_errors"] = len(errs)
                break
        m1 = await settle(2.0)
        per_env = (m0["MemAvailable"] - m1["MemAvailable"]) / max(1, count)
        out.update({
            "held": count, "stopped_by": stop, "create_s": time.monotonic() - t_start,
            "batches": batches, "loop_devices_added": loop_devices_attached() - loops0,
            "host_per_env_mib": per_env / MIB,
            "slab_per_env_mib": (m1["Slab"] - m0["Slab"]) / max(1, count) / MIB,
            "mem_available_start_gib": m0["MemAvailable"] / 2**30,
            "mem_available_end_gib": m1["MemAvailable"] / 2**30,
            "extrapolated_envs_in_mem_available": int(m0["MemAvailable"] / per_env) if per_env > 0 else None,
            "extrapolated_envs_in_mem_total": int(m0["MemTotal"] / per_env) if per_env > 0 else None,
        })
        # all alive? a quick status count
        st = await a.agent.status()
        out["alive_processes"] = sum(1 for e in st["envs"] if e["processes"] > 0)
        return out
    finally:
        tc = time.monotonic()
        a.close()
        out["teardown_s"] = time.monotonic() - tc


# -- driver --------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def report(res: dict[str, Any]) -> list[str]:
    lines = []
    c = res.get("cold")
    if c:
        ag, py = c["agent"]["cold"], c["python_c"]["cold"]
        lines.append("cold start (request -> handler running), ms        p50      p99")
        lines.append(f"  jail+zygote, agent level (create_env+invoke)  {ag['p50_ms']:7.2f}  {ag['p99_ms']:7.2f}")
        cr = c["agent"]["create_env"]
        lines.append(f"    of which create_env alone                   {cr['p50_ms']:7.2f}  {cr['p99_ms']:7.2f}")
        if "region" in c:
            rg = c["region"]["cold"]
            lines.append(f"  jail+zygote, full path (SDK->router->...)    {rg['p50_ms']:7.2f}  {rg['p99_ms']:7.2f}")
            wr = c["region"]["warm_same_path"]
            lines.append(f"    (warm invoke, same path, for scale)         {wr['p50_ms']:7.2f}  {wr['p99_ms']:7.2f}")
        lines.append(f"  python -c baseline                            {py['p50_ms']:7.2f}  {py['p99_ms']:7.2f}")
        lines.append(f"  ratio jail/python-c (p50): agent {ag['p50_ms'] / py['p50_ms']:.2f}"
                     + (f", full path {c['region']['cold']['p50_ms'] / py['p50_ms']:.2f}" if "region" in c else ""))
        lines.append(f"  vs Lambda ~{LAMBDA_COLD_MS:.0f} ms: agent {ag['p50_ms'] / LAMBDA_COLD_MS:.2f}x; "
                     f"vs Firecracker boot {FIRECRACKER_BOOT_MS:.0f} ms: {ag['p50_ms'] / FIRECRACKER_BOOT_MS:.2f}x")
        lines.append(f"  goal p50 <= {GOAL_COLD_P50_MS:.0f} ms (agent level): {verdict(ag['p50_ms'] <= GOAL_COLD_P50_MS)}"
                     + (f"; full path: {verdict(c['region']['cold']['p50_ms'] <= GOAL_COLD_P50_MS)}" if "region" in c else ""))
        cp = c.get("cgroup_probe", {})
        if "isolated" in cp:
            lines.append(f"  cgroup v1 move of one process into a new cgroup (4 controllers): isolated p50 "
                         f"{cp['isolated']['p50_ms']:.2f} ms, back to back {cp['back_to_back']['p50_ms']:.2f} ms "
                         f"(favordynmods mount: {cp['favordynmods_mount']})")
        if "profile" in c:
            lines.append(f"  profile (timing zygote, n={c['profile']['n']}, cold p50 "
                         f"{c['profile']['cold']['p50_ms']:.2f} ms, zygote round trip p50 "
                         f"{c['profile']['spawn_round_trip']['p50_ms']:.2f} ms); per-sample ms by step:")
            for row in c["profile"]["steps"]:
                if row["total_per_sample_ms"] >= 0.05:
                    lines.append(f"    {row['total_per_sample_ms']:7.2f}  x{row['count_per_sample']:<4.1f} {row['step']}")
    for s in res.get("scale", []):
        lines.append(f"scale-out, {s['agents']} agent(s) / zygote(s), oversubscription {s['oversubscription']:.1f}:")
        t = s.get("t_last_handler_s")
        if t is None:
            lines.append(f"  no handler ran; errors {s.get('errors')}")
            continue
        lines.append(f"  {s['handlers_run']}/{s['requested']} handlers running; last at {t:.2f} s "
                     f"(half at {s['t_half_s']:.2f} s), {s['rate_per_s']:.0f} envs/s; "
                     f"{s['concurrent_at_deadline']} in flight at once; failed {s['failed']}")
        lines.append(f"  vs Lambda 1,000 per 10 s: {s['rate_per_s'] / LAMBDA_SCALE_PER_S:.2f}x the rate; "
                     f"goal <= {GOAL_SCALE_S:.0f} s: {verdict(s['handlers_run'] >= s['requested'] and t <= GOAL_SCALE_S)}")
        lines.append(f"  CPU: zygote(s) {', '.join(f'{x:.1f}' for x in s['zygote_cpu_s'])} s, "
                     f"agent process {s['agent_process_cpu_s']:.1f} s, environments {s['env_cpu_ms']['sum_s']:.1f} s "
                     f"(p50 {s['env_cpu_ms']['p50']:.1f} ms each, incl. the invocation), "
                     f"host busy {s['host_busy_cpu_s']:.1f} s (all processes, other users too); "
                     f"teardown {s.get('teardown_s', 0):.1f} s")
        lo = s.get("loop_devices_in_use", 0)
        lines.append(f"  loop devices attached at the peak: +{lo}"
                     + (" (fewer than the environments: the rest got a tmpfs /tmp, see the doc)"
                        if lo < s["handlers_run"] else ""))
        if s["errors"]:
            lines.append(f"  errors: {s['errors']}")
        if s.get("steps_ms"):
            lines.append("  profile, mean ms per environment: first 10% vs last 10% of handlers to start")
            for key, v in sorted(s["steps_ms"].items(), key=lambda kv: -kv[1].get("last_10pct", 0)):
                if v.get("last_10pct", 0) >= 0.3 or v.get("first_10pct", 0) >= 0.3:
                    lines.append(f"    {v.get('first_10pct', 0):8.2f} {v.get('last_10pct', 0):8.2f}  {key}")
    d = res.get("density")
    if d:
        lines.append(f"density ({d['n']} idle envs, per env, MiB): USS {d['uss_mib']['p50']:.2f} "
                     f"PSS {d['pss_mib']['p50']:.2f} RSS {d['rss_mib']['p50']:.2f} "
                     f"cgroup charge {d['cgroup_charge_mib']['p50']:.2f}; host MemAvailable drop "
                     f"{d['host_memavailable_drop_per_env_mib']:.2f} (slab {d['slab_per_env_mib']:.2f}, "
                     f"page tables {d['page_tables_per_env_mib']:.2f})")
        lines.append(f"  vs Firecracker VMM <= {FIRECRACKER_VMM_MIB:.0f} MiB: USS {d['uss_mib']['p50'] / FIRECRACKER_VMM_MIB:.2f}x; "
                     f"goal USS <= {GOAL_USS_MIB:.0f} MiB: {verdict(d['uss_mib']['p50'] <= GOAL_USS_MIB)}")
    for size, w in (res.get("warm") or {}).items():
        lines.append(f"warm invoke, {size} B event: p50 {w['wall_us_p50']:.0f} us, mean "
                     f"{w['wall_us_mean']:.0f} us, agent CPU {w['agent_cpu_us']:.0f} us per invoke")
    h = res.get("held")
    if h:
        lines.append(f"held: {h['held']} idle envs (stopped by: {h['stopped_by']}) in {h['create_s']:.1f} s; "
                     f"host {h['host_per_env_mib']:.2f} MiB/env; loop devices +{h['loop_devices_added']}; "
                     f"extrapolated {h['extrapolated_envs_in_mem_available']} in MemAvailable "
                     f"({h['mem_available_start_gib']:.1f} GiB), {h['extrapolated_envs_in_mem_total']} in MemTotal; "
                     f"teardown {h.get('teardown_s', 0):.1f} s")
    return lines


async def run_async(args: argparse.Namespace, only: set[str], work: str,
                    res: dict[str, Any]) -> None:
    q = args.quick
    if "cold" in only:
        n, w = (8, 2) if q else (60, 5)
        res["cold"] = {"cgroup_probe": cgroup_migration_probe(8 if q else 20),
                       "python_c": cold_python_c(n, w)}
        res["cold"]["agent"] = await cold_agent(work, n, w)
        res["cold"]["profile"] = await cold_profile(work, 5 if q else 30, 2)
        if not q or args.region:
            res["cold"]["region"] = await asyncio.to_thread(cold_region, work, 6 if q else 40, 2)
    if "scale" in only:
        total = 30 if q else args.scale_n
        hold = 5.0 if q else args.hold_s
        res["scale"] = []
        for k in [int(x) for x in args.scale_agents.split(",") if x]:
            if q and k > 1:
                continue
            res["scale"].append(await scale_out(work, total, k, hold))
            await asyncio.sleep(2)
        if args.profile_scale:
            res["scale"].append(await scale_out(work, total, 1, hold, profile=True))
    if "density" in only:
        res["density"] = await density(work, 5 if q else 20)
    if "warm" in only:
        res["warm"] = await warm_agent(work, 200 if q else args.warm_n)
    if "held" in only:
        res["held"] = await held(work, 40 if q else args.held_max, 20 if q else 100,
                                 20 if q else 100)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.sandbox")
    p.add_argument("--quick", action="store_true", help="a tiny version of each (smoke test)")
    p.add_argument("--only", default="cold,scale,density,held")
    p.add_argument("--region", action="store_true", help="with --quick: include the full path")
    p.add_argument("--scale-n", type=int, default=1000)
    p.add_argument("--hold-s", type=float, default=40.0,
                   help="scale-out: handlers wait until t0 + this")
    p.add_argument("--scale-agents", default="1,2", help="scale-out runs: agents (zygotes) each")
    p.add_argument("--profile-scale", action="store_true",
                   help="scale-out once more, 1 agent, with the timing zygote")
    p.add_argument("--held-max", type=int, default=2000)
    p.add_argument("--warm-n", type=int, default=2000, help="warm: invokes per payload size")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench.sandbox needs root (namespaces, cgroups, mounts)")
    only = set(args.only.split(","))
    res: dict[str, Any] = {"machine": machine(), "quick": args.quick, "argv": sys.argv[1:],
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = run_recorded("sandbox", res, lambda work: run_async(args, only, work, res))
    m = res["machine"]
    print(f"machine: {m['nproc']} x {m['cpu_model']}, kernel {m['kernel']}, Python "
          f"{m['python']}, load at start {' '.join(m['loadavg_at_start'])}")
    print("functions: 128 MB unless a line says otherwise (CPU capped at 128/"
          f"{DEFAULT_LIMITS.memory_mb_per_vcpu} vCPU after init; init gets >= "
          f"{DEFAULT_LIMITS.env_init_vcpu_min} vCPU)")
    for line in report(res):
        print(line)
    print(f"wall {res['wall_s']:.1f} s; JSON: {path}")


if __name__ == "__main__":
    main()
