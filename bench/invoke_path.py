"""Issue 2's benchmark: what the full cellcloud invoke path costs over a bare HTTP server.

One command, one run, three subjects, the same handler for all three::

    (a) in-process   handler(event, None) called directly
    (b) bare         uvicorn (httptools + uvloop, 1 worker, loopback) whose ASGI app decodes the
                     JSON body, calls the handler and encodes the result
    (c) cellcloud    a real region (`cellcloud up --detach --port 0` in a temp CELLCLOUD_HOME):
                     client -> router -> cell frontend -> host agent -> guest -> handler

Latency: sequential requests over one keep-alive ``http.client`` connection (same client for
(b) and (c)), after a warm-up; p50/p99. Throughput: a closed loop at fixed concurrency for a
fixed duration with ``wrk`` (installed from Debian with apt-get when missing and run as root;
a Python asyncio generator if that fails, or with --python-load); requests/s, p50/p99.
It prints ratios c/b (throughput) and c-a (p50 added latency) against issue 2's goals, the CPU
each process spent per request (with a per-hop CPU budget line: router, frontend, agent, guest
against HOP_CPU_BUDGET_MS), and writes JSON under bench/results/.

``--profile`` adds a per-hop profile: layer peeling (the same sequential load sent straight to
the agent's and the frontend's transport ops, so hop = difference of p50s) and py-spy recordings
of every process of the path during a second throughput run (py-spy must be installed).

Run from the repository root:  python -m bench.invoke_path [--profile]
Benchmarks are not tests: nothing here asserts; the numbers are compared in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from typing import Any

from bench.common.proc import cpu_s, machine_facts, system_busy_s
from cellcloud.core.limits import DEFAULT_LIMITS

HANDLER_SOURCE = '''\
def handler(event, context):
    return {"sum": event["a"] + event["b"]}
'''
_ns: dict[str, Any] = {}
exec(compile(HANDLER_SOURCE, "bench_handler.py", "exec"), _ns)
handler = _ns["handler"]

EVENT = {"a": 1, "b": 2}
BODY = json.dumps(EVENT).encode()
EXPECTED = json.dumps(handler(EVENT, None)).encode()
FUNCTION = "bench-add"
FUNCTION_MEMORY_MB = 128  # CPU is capped in proportion (core/limits.py: memory_mb_per_vcpu)
INVOKE_PATH = f"/2015-03-31/functions/{FUNCTION}/invocations"
GOAL_THROUGHPUT_RATIO = 0.3
GOAL_ADDED_P50_MS = 3.0
RUN_DEADLINE_S = 170  # the whole run, everything included, stays under 3 minutes
WRK_INSTALL_TIMEOUT_S = 240  # apt-get install wrk, before the run's own deadline starts
# CPU per request, by hop, that reaches GOAL_THROUGHPUT_RATIO on this 2-core machine (issue 13:
# about 0.15 ms in all). The frontend's share is small because warm invokes are meant to reach
# the agent on a lease without crossing it.
HOP_CPU_BUDGET_MS = {"router": 0.045, "frontend": 0.015, "agent": 0.04, "guest": 0.05}


# -- (b): the bare ASGI app uvicorn serves (imported by the uvicorn subprocess) ---------------
async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    chunks = []
    while True:
        msg = await receive()
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            break
    result = handler(json.loads(b"".join(chunks)), None)
    body = json.dumps(result).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def serve_bare(fd: int) -> None:
    """The (b) server process: uvicorn (httptools + uvloop, 1 worker) on an inherited socket."""
    import uvicorn

    sock = socket.socket(fileno=fd)  # family and type are read from the fd itself
    config = uvicorn.Config(bare_app, loop="uvloop", http="httptools", lifespan="off",
                            log_level="warning", access_log=False, server_header=False,
                            date_header=False, workers=1)
    uvicorn.Server(config).run(sockets=[sock])


# -- small helpers -------------------------------------------------------------------------
def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Counters that moved: during a warm run any cold start or agent_* means environments
    were lost (see the doc: another region on the host can sweep this one's cgroups)."""
    return {k: after.get(k, 0) - before.get(k, 0) for k in after
            if after.get(k, 0) != before.get(k, 0)}


def pct(sorted_vals: list[float], p: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, round(p / 100 * (len(sorted_vals) - 1))))
    return sorted_vals[k]


def machine() -> dict[str, Any]:
    return {**machine_facts(), "wrk": _wrk_version()}


def _wrk_version() -> str | None:
    exe = shutil.which("wrk")
    if exe is None:
        return None
    p = subprocess.run([exe, "-v"], capture_output=True, text=True, timeout=5)
    return (p.stdout + p.stderr).strip().splitlines()[0] if (p.stdout + p.stderr) else exe


def find_wrk(install: bool) -> str | None:
    """wrk on PATH; if missing and ``install``, Debian's package via apt-get (root only)."""
    exe = shutil.which("wrk")
    if exe is not None or not install:
        return exe
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        print("wrk not found and cannot be installed here (needs root and apt-get): "
              "the Python load generator is used", flush=True)
        return None
    print("wrk not found: apt-get install -y wrk ...", flush=True)
    try:
        subprocess.run([apt, "install", "-y", "--no-install-recommends", "wrk"],
                       capture_output=True, timeout=WRK_INSTALL_TIMEOUT_S,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except subprocess.TimeoutExpired:
        pass
    exe = shutil.which("wrk")
    if exe is None:
        print("apt-get could not install wrk: the Python load generator is used", flush=True)
    return exe


class CpuMeter:
    """CPU seconds spent by named groups of pids between start() and stop()."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups

    def __enter__(self) -> CpuMeter:
        self._t0 = time.monotonic()
        self._sys0 = system_busy_s()
        self._c0 = {g: sum(cpu_s(p) for p in pids) for g, pids in self.groups.items()}
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall_s = time.monotonic() - self._t0
        self.system_s = system_busy_s() - self._sys0
        self.by_group = {g: sum(cpu_s(p) for p in pids) - self._c0[g]
                         for g, pids in self.groups.items()}

    def per_request_ms(self, requests: int) -> dict[str, float]:
        out = {g: 1000 * s / max(1, requests) for g, s in self.by_group.items()}
        ours = sum(self.by_group.values())
        out["(servers)"] = 1000 * sum(v for g, v in self.by_group.items()
                                      if g != "load generator") / max(1, requests)
        out["_other_processes_cpu_pct"] = 100 * max(0.0, self.system_s - ours) / self.wall_s
        out["_system_cpu_pct"] = 100 * self.system_s / self.wall_s
        return out


# -- the client for latency (same for b and c) ------------------------------------------------
def sequential_latency(host: str, port: int, path: str, headers: dict[str, str], n: int,
                       warmup: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    hdrs = {"content-type": "application/json", **headers}
    lat: list[float] = []
    bad: list[str] = []
    try:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            conn.request("POST", path, body=BODY, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            dt = time.perf_counter() - t0
            if resp.status != 200 or data.replace(b" ", b"") != EXPECTED.replace(b" ", b""):
                bad.append(f"{resp.status} {data[:200]!r}")
                if len(bad) > max(10, (warmup + n) // 100):
                    raise RuntimeError(f"too many bad answers from {host}:{port}: {bad[:3]}")
                continue
            if i >= warmup:
                lat.append(dt * 1000)
    finally:
        conn.close()
    s = sorted(lat)
    total_s = sum(lat) / 1000
    return {"n": n, "p50_ms": pct(s, 50), "p99_ms": pct(s, 99), "mean_ms": statistics.fmean(s),
            "min_ms": s[0], "rps_sequential": len(s) / total_s, "bad_answers": len(bad),
            "bad_examples": bad[:3]}


# -- the load generator for throughput (same for b and c) -------------------------------------
_WRK_LUA = """\
wrk.method = "POST"
wrk.body = '%(body)s'
wrk.headers["Content-Type"] = "application/json"
%(headers)s
done = function(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, ' ..
    '"mean_us": %%.1f, "max_us": %%d, "err_connect": %%d, "err_read": %%d, "err_write": %%d, ' ..
    '"err_status": %%d, "err_timeout": %%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.status, summary.errors.timeout))
end
"""


class Load:
    """A closed loop of `concurrency` connections for `duration_s`; wrk if present."""

    def __init__(self, workdir: str, concurrency: int, duration_s: float, threads: int,
                 force_python: bool = False, install_wrk: bool = True) -> None:
        self.workdir = workdir
        self.concurrency = concurrency
        self.duration_s = duration_s
        self.threads = threads
        self.wrk = None if force_python else find_wrk(install_wrk)
        self.kind = f"wrk -t{threads} -c{concurrency} -d{duration_s:g}s" if self.wrk else \
            f"python asyncio closed loop, {concurrency} connections, {duration_s:g}s"
        self.pid: int | None = None

    def run(self, host: str, port: int, path: str, headers: dict[str, str],
            on_start: Any = None) -> dict[str, Any]:
        if self.wrk:
            return self._run_wrk(host, port, path, headers, on_start)
        return asyncio.run(self._run_py(host, port, path, headers, on_start))

    def _run_wrk(self, host: str, port: int, path: str, headers: dict[str, str],
                 on_start: Any) -> dict[str, Any]:
        script = os.path.join(self.workdir, f"post-{port}.lua")
        hdr_lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
        with open(script, "w") as f:
            f.write(_WRK_LUA % {"body": BODY.decode(), "headers": hdr_lines})
        argv = [self.wrk, f"-t{self.threads}", f"-c{self.concurrency}",
                f"-d{self.duration_s:g}s", "--timeout", "10s", "-s", script,
                f"http://{host}:{port}{path}"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.pid = proc.pid
        if on_start is not None:
            on_start()
        try:
            out, _ = proc.communicate(timeout=self.duration_s + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        doc = None
        for line in out.splitlines():
            if line.startswith("WRKJSON "):
                doc = json.loads(line[len("WRKJSON "):])
        if doc is None:
            raise RuntimeError(f"wrk said: {out[-2000:]}")
        errors = sum(v for k, v in doc.items() if k.startswith("err_"))
        return {"generator": self.kind, "requests": doc["requests"],
                "duration_s": doc["duration_us"] / 1e6,
                "rps": doc["requests"] / (doc["duration_us"] / 1e6),
                "p50_ms": doc["p50_us"] / 1000, "p90_ms": doc["p90_us"] / 1000,
                "p99_ms": doc["p99_us"] / 1000, "max_ms": doc["max_us"] / 1000,
                "errors": errors, "raw": doc}

    async def _run_py(self, host: str, port: int, path: str, headers: dict[str, str],
                      on_start: Any) -> dict[str, Any]:
        self.pid = os.getpid()
        hdr = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        req = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Content-Type: application/json\r\n{hdr}Content-Length: {len(BODY)}\r\n\r\n"
               ).encode() + BODY
        lat: list[float] = []
        errors = 0
        stop_at = 0.0

        async def worker() -> None:
            nonlocal errors
            r, w = await asyncio.open_connection(host, port)
            try:
                while time.perf_counter() < stop_at:
                    t0 = time.perf_counter()
                    w.write(req)
                    head = await r.readuntil(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":", 1)[1])
                    await r.readexactly(length)
                    lat.append((time.perf_counter() - t0) * 1000)
                    if not head.startswith(b"HTTP/1.1 200"):
                        errors += 1
            finally:
                w.close()

        if on_start is not None:
            on_start()
        t_start = time.perf_counter()
        stop_at = t_start + self.duration_s
        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        dur = time.perf_counter() - t_start
        s = sorted(lat)
        return {"generator": self.kind, "requests": len(s), "duration_s": dur,
                "rps": len(s) / dur, "p50_ms": pct(s, 50), "p90_ms": pct(s, 90),
                "p99_ms": pct(s, 99), "max_ms": s[-1] if s else float("nan"), "errors": errors}


# -- (b) ---------------------------------------------------------------------------------------
class BareServer:
    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> tuple[str, int]:
        # We bind and listen, uvicorn inherits the socket (--fd): no port race, and the first
        # request below simply queues in the backlog until uvicorn accepts it, a real signal.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        host, port = sock.getsockname()
        fd = sock.fileno()
        # Not `uvicorn --fd`: uvicorn wraps an inherited fd as AF_UNIX (config.py, server.py),
        # so uvloop would skip TCP_NODELAY and Nagle + delayed ACK would add ~40 ms per request.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.invoke_path", "--serve-bare", str(fd)],
            pass_fds=(fd,), stdin=subprocess.DEVNULL, cwd=os.getcwd())
        sock.close()  # uvicorn holds it now; if uvicorn dies, our probe fails instead of hanging
        conn = http.client.HTTPConnection(host, port, timeout=30)
        try:
            conn.request("POST", "/", body=BODY, headers={"content-type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"bare server answered {resp.status}")
            resp.read()
        finally:
            conn.close()
        return host, port

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class GranianServer:
    """(b'), with --granian: the same bare app under granian (Rust HTTP server, 1 worker), to
    see whether a compiled HTTP server pays. A bench option only; granian is not a
    dependency: install it where this interpreter finds it (``pip install granian``)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return subprocess.run([sys.executable, "-c", "import granian"],
                              capture_output=True).returncode == 0

    def start(self) -> tuple[str, int]:
        # granian binds by itself: a free port picked here (a benchmark, not a service).
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1", "--runtime-threads", "1",
             "--loop", "uvloop", "--http", "1", "--no-ws", "--log-level", "warning",
             "bench.invoke_path:bare_app"], stdin=subprocess.DEVNULL, cwd=os.getcwd())
        deadline = time.monotonic() + 60
        while True:  # answered once granian's worker is up
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("POST", "/", body=BODY, headers={"content-type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                conn.close()
                if resp.status != 200:
                    raise RuntimeError(f"granian answered {resp.status}")
                return "127.0.0.1", port
            except ConnectionRefusedError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("granian did not start") from None
                time.sleep(0.1)  # polling for a port to open, bounded by the deadline above

    def pids(self) -> list[int]:
        """granian's main process and its worker(s)."""
        assert self.proc is not None
        pids, frontier = [self.proc.pid], [self.proc.pid]
        while frontier:
            pid = frontier.pop()
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        kids = [int(k) for k in f.read().split()]
                    pids += kids
                    frontier += kids
        return pids

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- (c) ---------------------------------------------------------------------------------------
class Region:
    def __init__(self, home: str, insecure: bool = False) -> None:
        self.home = home
        self.insecure = insecure
        self.doc: dict[str, Any] = {}
        self.env = {**os.environ, "CELLCLOUD_HOME": home}

    def start(self) -> None:
        exe = [sys.executable, "-m", "cellcloud"]
        p = subprocess.run([*exe, "up", "--detach", "--port", "0",
                            *(["--insecure"] if self.insecure else [])], env=self.env,
                           capture_output=True, text=True, timeout=90)
        if p.returncode != 0:
            raise RuntimeError(f"cellcloud up failed: {p.stdout}{p.stderr}")
        with open(os.path.join(self.home, "region.json")) as f:
            self.doc = json.load(f)

    @property
    def endpoint(self) -> tuple[str, int]:
        hostport = self.doc["endpoint"].split("//", 1)[1]
        host, port = hostport.rsplit(":", 1)
        return host, int(port)

    def client(self) -> Any:
        from cellcloud.sdk import Client

        c = Client.from_region(self.home)
        c.timeout_s = 30
        return c

    def auth_headers(self) -> dict[str, str]:
        """Headers of one SigV4-signed invoke (valid for 5 minutes). The router verifies the
        signature of every request in full; replaying one signed request keeps the client's
        signing cost out of the measurement, as a client that signs in parallel would."""
        from cellcloud.security import sigv4

        host, port = self.endpoint
        hdrs = sigv4.sign("POST", f"http://{host}:{port}{INVOKE_PATH}",
                          {"content-type": "application/json"}, BODY,
                          access_key_id=self.doc["access_key_id"],
                          secret_access_key=self.doc["secret_access_key"],
                          region=self.doc.get("region", "cc-local-1"))
        return {k: v for k, v in hdrs.items() if k.lower() != "content-type"}

    def deploy(self) -> None:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("bench_handler.py", HANDLER_SOURCE)
        c = self.client()
        try:
            c.create_function(FUNCTION, buf.getvalue(), "bench_handler.handler",
                              memory_mb=FUNCTION_MEMORY_MB)
        finally:
            c.close()

    def status(self) -> dict[str, Any]:
        c = self.client()
        try:
            return c.status()  # type: ignore[no-any-return]
        finally:
            c.close()

    def warm(self, concurrency: int, rounds_max: int = 8) -> int:
        """Invoke in waves of `concurrency` simultaneous requests until the cell holds that many
        warm environments; returns the count."""
        host, port = self.endpoint
        headers = {**self.auth_headers(), "content-type": "application/json"}

        def one(barrier: threading.Barrier, errs: list[str]) -> None:
            conn = http.client.HTTPConnection(host, port, timeout=30)
            try:
                barrier.wait(10)
                for _ in range(3):
                    conn.request("POST", INVOKE_PATH, body=BODY, headers=headers)
                    r = conn.getresponse()
                    r.read()
                    if r.status != 200:
                        errs.append(str(r.status))
            except Exception as e:  # reported below; the wave's count decides
                errs.append(repr(e))
            finally:
                conn.close()

        warm = 0
        for _ in range(rounds_max):
            barrier = threading.Barrier(concurrency)
            errs: list[str] = []
            ts = [threading.Thread(target=one, args=(barrier, errs)) for _ in range(concurrency)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(60)
            if errs:
                print(f"  warm-up errors: {errs[:3]}", file=sys.stderr)
            st = self.status()["cells"]
            warm = sum(c["placement"]["envs"]["idle"] for c in st.values())
            if warm >= concurrency:
                break
        return warm

    def counters(self) -> dict[str, int]:
        """Cold starts and environment failures so far, summed over cells and agents."""
        out: collections.Counter[str] = collections.Counter()
        for cell in self.status()["cells"].values():
            out["cold_starts"] += cell["counters"].get("cold_starts", 0)
            out["function_errors"] += cell["counters"].get("function_errors", 0)
            for a in cell["agents"].values():
                for k in ("crashes", "timeouts", "create_failed", "destroyed"):
                    out[f"agent_{k}"] += a.get("counters", {}).get(k, 0)
        return dict(out)

    def pids(self) -> dict[str, list[int]]:
        comps = self.doc["components"]
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for c in comps.values():
            groups[c["kind"] if c["kind"] != "agent" else "agent"].append(int(c["pid"]))
        st = self.status()
        for cell in st["cells"].values():
            for agent in cell["agents"].values():
                for env in agent.get("envs", []):
                    groups["guest"].append(int(env["pid"]))
        groups["supervisor"].append(int(self.doc["supervisor_pid"]))
        return dict(groups)

    def stop(self) -> None:
        if not self.doc:
            return
        try:
            subprocess.run([sys.executable, "-m", "cellcloud", "down"], env=self.env,
                           capture_output=True, timeout=40)
        except subprocess.TimeoutExpired:
            pass
        # Belt and braces: anything of ours still alive goes, by pid.
        pids = [int(self.doc["supervisor_pid"])] + [
            int(c["pid"]) for c in self.doc.get("components", {}).values() if c.get("pid")]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


# -- (a) ---------------------------------------------------------------------------------------
def in_process(n: int) -> dict[str, Any]:
    ev = dict(EVENT)
    for _ in range(10_000):
        handler(ev, None)
    pc = time.perf_counter_ns
    lat = []
    for _ in range(n):
        t0 = pc()
        handler(ev, None)
        lat.append(pc() - t0)
    # Throughput without per-call timer overhead: a tight loop.
    loops = 1_000_000
    t0 = time.perf_counter()
    for _ in range(loops):
        handler(ev, None)
    dt = time.perf_counter() - t0
    s = sorted(x / 1e6 for x in lat)
    # The same with the JSON decode/encode every HTTP subject does (for reference).
    t1 = time.perf_counter()
    for _ in range(100_000):
        json.dumps(handler(json.loads(BODY), None)).encode()
    dtj = time.perf_counter() - t1
    return {"n": n, "p50_ms": pct(s, 50), "p99_ms": pct(s, 99), "rps": loops / dt,
            "with_json_us": dtj / 100_000 * 1e6}


# -- --profile: layer peeling and py-spy -------------------------------------------------------
async def _peel(region: Region, n: int, warmup: int) -> dict[str, Any]:
    from cellcloud.core.messages import HttpRequest
    from cellcloud.transport import Client as TClient

    st = region.status()
    cell = next(iter(st["cells"].values()))
    comps = region.doc["components"]
    agent_id, env_id = None, None
    for aid, a in cell["agents"].items():
        for env in a.get("envs", []):
            if not env["busy"]:
                agent_id, env_id = aid, env["env_id"]
                break
        if env_id:
            break
    if env_id is None:
        raise RuntimeError("no idle environment to peel with")
    fe = comps[f"{cell['cell_id']}-frontend"]
    ag = comps[agent_id]
    arn = f"arn:aws:lambda:{region.doc['region']}:{region.doc['account_id']}:function:{FUNCTION}"
    out: dict[str, Any] = {}

    async def series(client: Any, op: str, make_body: Any) -> tuple[list[float], list[float]]:
        lat, inner = [], []
        for i in range(warmup + n):
            body = make_body(i)
            t0 = time.perf_counter()
            res = await client.call(op, body, timeout_s=30)
            dt = (time.perf_counter() - t0) * 1000
            if i >= warmup:
                lat.append(dt)
                if isinstance(res, dict) and "duration_ms" in res:
                    inner.append(float(res["duration_ms"]))
        return sorted(lat), sorted(inner)

    agent = TClient(ag["host"], ag["port"], protocol="agent")
    lat, inner = await series(agent, "invoke", lambda i: {
        "env_id": env_id, "request_id": f"peel-{i}", "payload": BODY, "timeout_ms": 3000,
        "arn": arn})
    await agent.close()
    out["agent_direct"] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
    out["guest_handler"] = {"p50_ms": pct(inner, 50), "p99_ms": pct(inner, 99)}
    front = TClient(fe["host"], fe["port"], protocol="frontend")
    lat, _ = await series(front, "http", lambda i: HttpRequest(
        method="POST", path=INVOKE_PATH, headers={"content-type": "application/json"},
        body=BODY, account=region.doc["account_id"]).to_wire())
    await front.close()
    out["frontend_direct"] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
    return out


class Spy:
    """py-spy recordings of the given processes while a load runs."""

    def __init__(self, workdir: str, targets: dict[str, int], duration_s: int, rate: int) -> None:
        self.exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable),
                                                            "py-spy")
        self.workdir = workdir
        self.targets = targets
        self.duration_s = duration_s
        self.rate = rate
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def available(self) -> bool:
        return os.path.exists(self.exe)

    def start(self) -> None:
        for name, pid in self.targets.items():
            argv = [self.exe, "record", "--pid", str(pid), "--duration", str(self.duration_s),
                    "--rate", str(self.rate), "--format", "raw", "--nonblocking", "--function",
                    "--output", os.path.join(self.workdir, f"{name}.txt")]
            if name.startswith("guest"):
                # Idle detection does not see through the guest's pid namespace; a blocked
                # recv() releases the GIL, so "holding the GIL" = "running Python".
                argv.append("--gil")
            self.procs[name] = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)

    def wait(self) -> dict[str, Any]:
        out = {}
        for name, p in self.procs.items():
            try:
                p.wait(self.duration_s + 20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            out[name] = summarise_raw(os.path.join(self.workdir, f"{name}.txt"))
        return out

    def kill(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


_LOOP_FRAMES = ("Runner.run (asyncio/runners.py", "run (uvloop/__init__.py")


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py:123)"
    name, _, loc = frame.partition(" (")
    loc = loc.rstrip(")")
    return f"{name} ({loc.rsplit('/', 1)[-1]})" if loc else name


def summarise_raw(path: str, top: int = 12) -> dict[str, Any]:
    stacks: list[tuple[list[str], int]] = []
    try:
        with open(path) as f:
            for line in f:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not stack:
                    continue
                frames = [fr for fr in stack.split(";") if not fr.startswith(("process ",
                                                                               "thread "))]
                stacks.append((frames, int(count)))
    except OSError as e:
        return {"error": str(e)}
    total = sum(c for _, c in stacks)
    if not total:
        return {"samples": 0}
    self_c: collections.Counter[str] = collections.Counter()
    incl_c: collections.Counter[str] = collections.Counter()
    for frames, c in stacks:
        leaf = frames[-1] if frames else "?"
        # With no Python frame above the loop's run(), the time is uvloop/libuv C code:
        # polling, socket reads and writes, callbacks' C parts.
        if leaf.startswith(_LOOP_FRAMES):
            leaf = "[event loop C code: epoll, socket I/O, scheduling]"
        self_c[_short(leaf)] += c
        seen = set()
        for fr in frames:
            s = _short(fr)
            if s not in seen and not fr.startswith(_LOOP_FRAMES) and "<module>" not in s \
                    and not s.startswith(("_run_code", "_run_module_as_main", "main (", "run (")):
                seen.add(s)
                incl_c[s] += c
    return {"samples": total,
            "self": [(f, round(100 * c / total, 1)) for f, c in self_c.most_common(top)],
            "inclusive": [(f, round(100 * c / total, 1)) for f, c in incl_c.most_common(top)]}


# -- the run -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.invoke_path", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="sequential requests (latency)")
    ap.add_argument("--warmup", type=int, default=200, help="sequential warm-up requests")
    ap.add_argument("--concurrency", type=int, default=16, help="closed-loop connections")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per throughput run")
    ap.add_argument("--wrk-threads", type=int, default=1,
                    help="wrk threads (1 leaves the most CPU to the servers on 2 cores)")
    ap.add_argument("--python-load", action="store_true", help="use the asyncio generator")
    ap.add_argument("--no-install-wrk", action="store_true",
                    help="do not apt-get install wrk when it is missing")
    ap.add_argument("--profile", action="store_true",
                    help="add layer peeling and a py-spy profile of every process of (c)")
    ap.add_argument("--spy-rate", type=int, default=200, help="py-spy samples/s")
    ap.add_argument("--tls-compare", action="store_true",
                    help="also run (c) with --insecure (plain-text internal links), same run: "
                         "the cost of mTLS")
    ap.add_argument("--granian", action="store_true",
                    help="also serve the bare app with granian (b'), same run: does a compiled "
                         "HTTP server pay? (granian must be importable; not a dependency)")
    ap.add_argument("--json", default=None, help="result file (default bench/results/...)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (region logs)")
    ap.add_argument("--serve-bare", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_bare is not None:
        serve_bare(args.serve_bare)
        return 0

    def deadline(*_: Any) -> None:
        raise TimeoutError(f"benchmark exceeded {RUN_DEADLINE_S}s")

    work = tempfile.mkdtemp(prefix="cc-bench-")
    load = Load(work, args.concurrency, args.duration, args.wrk_threads, args.python_load,
                not args.no_install_wrk)  # may install wrk: before the deadline starts
    signal.signal(signal.SIGALRM, deadline)
    signal.alarm(RUN_DEADLINE_S)

    bare = BareServer()
    region = Region(os.path.join(work, "home"))
    spy: Spy | None = None
    result: dict[str, Any] = {"command": "python -m bench.invoke_path " + " ".join(
        argv if argv is not None else sys.argv[1:]), "machine": machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    result["generator"] = load.kind
    T0 = time.monotonic()
    import builtins
    _print = builtins.print

    def print(*a: Any, **k: Any) -> None:  # noqa: A001 - timestamps on progress lines
        if k.get("file") is None and a:
            a = (f"[{time.monotonic() - T0:6.1f}s] {a[0]}", *a[1:])
        _print(*a, **k)

    try:
        print(f"machine: {result['machine']}")
        print(f"function: {FUNCTION_MEMORY_MB} MB (CPU capped at "
              f"{FUNCTION_MEMORY_MB / DEFAULT_LIMITS.memory_mb_per_vcpu:.3f} vCPU)")
        print("(a) in-process ...", flush=True)
        result["a"] = in_process(args.requests)

        print("(b) starting bare uvicorn ...", flush=True)
        bhost, bport = bare.start()
        granian = GranianServer() if args.granian else None
        if granian is not None and not granian.available():
            raise SystemExit("--granian: granian is not importable here (pip install granian)")
        if granian is not None:
            print("(b') starting bare granian ...", flush=True)
            ghost, gport = granian.start()
        print("(c) starting a region ...", flush=True)
        t0 = time.monotonic()
        region.start()
        region.deploy()
        warm = region.warm(args.concurrency)
        result["c_setup"] = {"region_up_deploy_warm_s": time.monotonic() - t0,
                             "warm_envs": warm}
        print(f"    region at {region.doc['endpoint']}, {warm} warm environments "
              f"({result['c_setup']['region_up_deploy_warm_s']:.1f}s)", flush=True)
        chost, cport = region.endpoint
        ckey = region.auth_headers()
        rpids = region.pids()
        assert bare.proc is not None
        bgroups = {"uvicorn": [bare.proc.pid]}

        print("latency: sequential, one keep-alive connection ...", flush=True)
        with CpuMeter(bgroups) as m:
            result["b_latency"] = sequential_latency(bhost, bport, INVOKE_PATH, ckey,
                                                     args.requests, args.warmup)
        result["b_latency"]["cpu_ms_per_req"] = m.per_request_ms(args.requests + args.warmup)
        k0 = region.counters()
        with CpuMeter(rpids) as m:
            result["c_latency"] = sequential_latency(chost, cport, INVOKE_PATH, ckey,
                                                     args.requests, args.warmup)
        result["c_latency"]["cpu_ms_per_req"] = m.per_request_ms(args.requests + args.warmup)
        result["c_latency"]["region_counters_delta"] = _delta(k0, region.counters())

        print(f"throughput: {load.kind} ...", flush=True)

        def run_load(host: str, port: int, groups: dict[str, list[int]],
                     on_start: Any = None) -> dict[str, Any]:
            meter = CpuMeter(groups)

            def started() -> None:
                meter.__enter__()
                if on_start is not None:
                    on_start()

            # wrk is a child we reap: its CPU is the children's rusage delta; the Python
            # generator runs in this process.
            ru0 = os.times()
            r = load.run(host, port, INVOKE_PATH, region.auth_headers(), started)
            meter.__exit__()
            ru1 = os.times()
            if load.wrk:
                gen = (ru1.children_user + ru1.children_system
                       - ru0.children_user - ru0.children_system)
            else:
                gen = ru1.user + ru1.system - ru0.user - ru0.system
            meter.by_group["load generator"] = gen
            r["cpu_ms_per_req"] = meter.per_request_ms(r["requests"])
            return r

        result["b_load"] = run_load(bhost, bport, bgroups)
        if granian is not None:
            ggroups = {"granian": granian.pids()}
            with CpuMeter(ggroups) as m:
                result["g_latency"] = sequential_latency(ghost, gport, INVOKE_PATH, ckey,
                                                         args.requests, args.warmup)
            result["g_latency"]["cpu_ms_per_req"] = m.per_request_ms(args.requests + args.warmup)
            result["g_load"] = run_load(ghost, gport, ggroups)
            granian.stop()
        k0 = region.counters()
        result["c_load"] = run_load(chost, cport, rpids)
        result["c_load"]["region_counters_delta"] = _delta(k0, region.counters())

        if args.tls_compare:
            print("(c') the same region with plain-text internal links ...", flush=True)
            region.stop()
            plain = Region(os.path.join(work, "home-plain"), insecure=True)
            region = plain
            plain.start()
            plain.deploy()
            plain.warm(args.concurrency)
            phost, pport = plain.endpoint
            pkey = plain.auth_headers()
            ppids = plain.pids()
            result["p_latency"] = sequential_latency(phost, pport, INVOKE_PATH, pkey,
                                                     args.requests, args.warmup)
            result["p_load"] = run_load(phost, pport, ppids)

        if args.profile:
            print("profile: layer peeling ...", flush=True)
            if not region.insecure:  # talk to agents and frontends as the control plane does
                from cellcloud import transport
                from cellcloud.security import pki

                transport.enable_mtls(pki.tls_config(region.home, "cc-local-1", "control",
                                                     "region", "bench"), "control")
            result["peel"] = asyncio.run(_peel(region, args.requests // 2, args.warmup))
            st = region.status()
            targets: dict[str, int] = {
                name: int(c["pid"]) for name, c in region.doc["components"].items()}
            # The busiest guest of each agent.
            for cell in st["cells"].values():
                for aid, a in cell["agents"].items():
                    envs = sorted(a.get("envs", []), key=lambda e: -e["invocations"])
                    if envs:
                        targets[f"guest@{aid}"] = int(envs[0]["pid"])
            spy = Spy(work, targets, max(1, int(args.duration) - 1), args.spy_rate)
            if spy.available():
                print(f"profile: py-spy on {len(targets)} processes during a second "
                      "throughput run ...", flush=True)
                result["c_load_under_pyspy"] = run_load(chost, cport, rpids, spy.start)
                result["pyspy"] = spy.wait()
                result["pyspy_targets"] = targets
            else:
                print("profile: py-spy not found (pip install py-spy); skipping", flush=True)
    finally:
        signal.alarm(0)
        if spy is not None:
            spy.kill()
        bare.stop()
        region.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    report(result)
    out = args.json or os.path.join("bench", "results", time.strftime(
        "invoke_path-%Y%m%dT%H%M%SZ.json", time.gmtime()))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nresults: {out}")
    return 0


def report(r: dict[str, Any]) -> None:
    a, bl, cl, bt, ct = r["a"], r["b_latency"], r["c_latency"], r["b_load"], r["c_load"]
    print()
    print(f"{'subject':<34} {'seq p50':>9} {'seq p99':>9} {'seq req/s':>10} | "
          f"{'load req/s':>10} {'load p50':>9} {'load p99':>9} {'errors':>6}")
    print(f"{'(a) in-process handler call':<34} {a['p50_ms'] * 1000:>7.2f}us "
          f"{a['p99_ms'] * 1000:>7.2f}us {a['rps']:>10.0f} | {'-':>10} {'-':>9} {'-':>9} {'-':>6}")
    for label, lat, ld in (("(b) bare uvicorn + handler", bl, bt),
                           ("(c) cellcloud full path (warm)", cl, ct)):
        print(f"{label:<34} {lat['p50_ms']:>7.3f}ms {lat['p99_ms']:>7.3f}ms "
              f"{lat['rps_sequential']:>10.0f} | {ld['rps']:>10.0f} {ld['p50_ms']:>7.2f}ms "
              f"{ld['p99_ms']:>7.2f}ms {ld['errors']:>6}")
    if "g_load" in r:
        gl, gt = r["g_latency"], r["g_load"]
        label = "(b') bare granian + handler"
        print(f"{label:<34} {gl['p50_ms']:>7.3f}ms {gl['p99_ms']:>7.3f}ms "
              f"{gl['rps_sequential']:>10.0f} | {gt['rps']:>10.0f} {gt['p50_ms']:>7.2f}ms "
              f"{gt['p99_ms']:>7.2f}ms {gt['errors']:>6}")
    ratio = ct["rps"] / bt["rps"]
    added = cl["p50_ms"] - a["p50_ms"]
    r["ratios"] = {"c_over_b_throughput": ratio, "c_minus_a_p50_ms": added,
                   "c_minus_b_p50_ms": cl["p50_ms"] - bl["p50_ms"],
                   "goal_throughput_ratio": GOAL_THROUGHPUT_RATIO,
                   "goal_added_p50_ms": GOAL_ADDED_P50_MS,
                   "throughput_goal_met": ratio >= GOAL_THROUGHPUT_RATIO,
                   "latency_goal_met": added <= GOAL_ADDED_P50_MS}
    print()
    print(f"c/b throughput  = {ratio:.3f}   (goal >= {GOAL_THROUGHPUT_RATIO}: "
          f"{'MET' if ratio >= GOAL_THROUGHPUT_RATIO else 'NOT MET'})")
    print(f"c-a p50 latency = {added:.3f} ms (goal <= {GOAL_ADDED_P50_MS} ms: "
          f"{'MET' if added <= GOAL_ADDED_P50_MS else 'NOT MET'}); "
          f"c-b p50 = {cl['p50_ms'] - bl['p50_ms']:.3f} ms")
    print(f"load generator: {r['generator']} (on the same {r['machine']['nproc']} cores as the "
          "servers: it competes with them for CPU)")
    if "p_load" in r:
        pl, pt = r["p_latency"], r["p_load"]
        cost = 1 - ct["rps"] / pt["rps"]
        r["ratios"]["mtls_throughput_cost"] = cost
        r["ratios"]["mtls_p99_load_ms"] = {"mtls": ct["p99_ms"], "plain": pt["p99_ms"]}
        print(f"(c') plain-text internal links        {pl['p50_ms']:>7.3f}ms {pl['p99_ms']:>7.3f}ms "
              f"{pl['rps_sequential']:>10.0f} | {pt['rps']:>10.0f} {pt['p50_ms']:>7.2f}ms "
              f"{pt['p99_ms']:>7.2f}ms {pt['errors']:>6}")
        print(f"mTLS cost: throughput {cost * 100:+.1f} % (goal <= 10 %: "
              f"{'MET' if cost <= 0.10 else 'NOT MET'}), load p99 {ct['p99_ms']:.2f} ms "
              f"vs {pt['p99_ms']:.2f} ms plain")
    for label, d in (("c sequential", cl), ("c load", ct)):
        moved = {k: v for k, v in d.get("region_counters_delta", {}).items()
                 if k != "function_errors" or v}
        if moved or d.get("bad_answers"):
            print(f"WARNING {label}: region counters moved during a warm run {moved}, "
                  f"bad answers {d.get('bad_answers', 0)} (environments were lost; see doc)")
    print("\nCPU per request (ms), by process group:")
    rows = [("b sequential", bl), ("c sequential", cl), ("b load", bt), ("c load", ct)]
    if "g_load" in r:
        rows += [("b' sequential", r["g_latency"]), ("b' load", r["g_load"])]
    for label, d in rows:
        cpu = d["cpu_ms_per_req"]
        parts = ", ".join(f"{k} {v:.3f}" for k, v in cpu.items() if not k.startswith("_"))
        print(f"  {label:<13} {parts}; system busy {cpu['_system_cpu_pct']:.0f}%, "
              f"other processes {cpu['_other_processes_cpu_pct']:.0f}%")
    if "g_load" in r:
        g, b = r["g_load"], bt
        r["ratios"]["granian_over_uvicorn_throughput"] = g["rps"] / b["rps"]
        print(f"granian/uvicorn (bare, load, run back to back): throughput "
              f"{g['rps'] / b['rps']:.2f}x, server CPU {g['cpu_ms_per_req']['(servers)']:.3f} vs "
              f"{b['cpu_ms_per_req']['(servers)']:.3f} ms/request")
    cpu = ct["cpu_ms_per_req"]
    hops = {h: cpu.get(h, 0.0) for h in HOP_CPU_BUDGET_MS}
    r["hop_cpu_budget_ms"] = {"budget": HOP_CPU_BUDGET_MS, "c_load": hops}
    print(f"per-hop CPU budget, c load (ms/request, /proc utime+stime over the run / requests; "
          f"budget {sum(HOP_CPU_BUDGET_MS.values()):.3f} in all for "
          f"{GOAL_THROUGHPUT_RATIO}x):")
    print("  " + ", ".join(
        f"{h} {v:.3f}/{HOP_CPU_BUDGET_MS[h]:.3f}{'' if v <= HOP_CPU_BUDGET_MS[h] else ' OVER'}"
        for h, v in hops.items())
        + f"; total {sum(hops.values()):.3f}/{sum(HOP_CPU_BUDGET_MS.values()):.3f}")
    if "peel" in r:
        p = r["peel"]
        print("\nlayer peeling (sequential p50, ms; each line adds one hop):")
        rows = [("handler inside guest (guest-timed)", p["guest_handler"]["p50_ms"]),
                ("agent op 'invoke' -> guest -> back", p["agent_direct"]["p50_ms"]),
                ("frontend op 'http' -> agent -> ...", p["frontend_direct"]["p50_ms"]),
                ("HTTP -> router -> frontend -> ...", cl["p50_ms"])]
        prev = 0.0
        for label, v in rows:
            print(f"  {label:<40} {v:7.3f}   (+{v - prev:.3f})")
            prev = v
    if "pyspy" in r:
        print(f"\npy-spy (throughput run under py-spy: {r['c_load_under_pyspy']['rps']:.0f} req/s)")
        for name, s in r["pyspy"].items():
            if "self" not in s:
                print(f"  {name}: {s}")
                continue
            print(f"  {name} ({s['samples']} samples), top self time:")
            for f, v in s["self"][:8]:
                print(f"      {v:5.1f}%  {f}")


if __name__ == "__main__":
    sys.exit(main())
