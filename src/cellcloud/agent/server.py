"""The agent server. A fixed set of operations, nothing else: ``create_env``, ``invoke``,
``destroy``, ``status``, ``attest``, ``forget_bundles``, ``image_blob``, … and the task ops
(agent/tasks.py). It never opens a connection (``lockdown``); it reaches each environment over the
socketpair it created for it, and no environment can reach it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import select
import shutil
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import eventlog
from ..core import messages as m
from ..core import tracing
from ..core.bundle import sha256_hex
from ..core.errors import LambdaError
from ..core.limits import DEFAULT_LIMITS
from ..metrics import process_registry
from ..network.client import NetConfig, NetHelperClient
from ..sandbox import cgroups, runtimes
from ..sandbox.backend import Backend, JailBackend, Spawned, Unsupported
from ..sandbox.spec import ISOLATION_VARIABLE, ISOLATIONS, EnvSpec
from ..sandbox.unpack import extract_zip
from ..security import attestation, pki
from ..transport import OpError, Server, Stream, protocol_stats
from ..transport.codec import FrameReader, frame_read_bytes, pack_parts
from ..volumes.helper_client import VolumeHelperClient
from . import lockdown
from .images import LayerCache
from .tasks import TaskRunner

log = logging.getLogger("cellcloud.agent")

channel_frame_bytes_max = 8 * 1024 * 1024
remeasure_interval_s = 30
reset_logs_envs_max = 1000  # environments whose reset logs are kept for a later call
env_baseline_bytes = 8 * 1024 * 1024  # what a new idle environment adds, roughly (density bench)


def _is_digest(value: object) -> bool:
    return (isinstance(value, str) and len(value) == 64
            and all(c in "0123456789abcdef" for c in value))


def snapstart_id(req: m.CreateEnvRequest) -> str:
    """A SnapStart version's identity, what its snapshot is keyed by: the version's ARN and
    a digest of what its init depends on (the code, layers and configuration; not the
    environment's own log stream), so a function deleted and created again under the same
    name never restores the old one's snapshot."""
    fn = req.function
    what = {k: v for k, v in fn.to_wire().items() if k not in ("log_group", "log_stream")}
    digest = hashlib.sha256(json.dumps([req.bundle_sha256, what], sort_keys=True).encode())
    return f"{fn.arn}:{fn.version} {digest.hexdigest()}"


def _disk(path: str) -> dict[str, Any]:
    """Free and total bytes of the filesystem holding ``path`` (the unpacked bundles)."""
    st = os.statvfs(path)
    return {"path": path, "free_bytes": st.f_bavail * st.f_frsize,
            "total_bytes": st.f_blocks * st.f_frsize}


def _host_memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 8 * 2**30


def _exited(pid: int) -> bool:
    """True once the environment's pid 1 has exited, even while its other threads are still
    tearing down (a killed thread-group leader shows as a zombie before the last thread drops
    the shared file table, so its end of the channel can look open for a moment)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in (b"Z", b"X")


# One read buffer for every environment channel of the agent: the event loop reads one channel
# at a time and the frames are decoded out of it before the next read (BufferedProtocol), so
# a thousand environments cost one buffer, and a read allocates nothing.
_read_buffer = memoryview(bytearray(frame_read_bytes))


class _EnvChannel(asyncio.BufferedProtocol):
    """The agent's end of one environment's channel: frames in, one future at a time.

    ``on_lost`` is called when the channel closes while nobody waits on it (the environment
    died idle, e.g. killed from outside), so the agent can forget it before placing work on it.
    """

    def __init__(self, on_lost: Callable[[_EnvChannel], None] | None = None) -> None:
        self.on_lost = on_lost
        self.unpacker = FrameReader(channel_frame_bytes_max)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[dict[str, Any]] | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.garbage = False
        # A frame that came before anyone waited for it: the end of an Invoke phase can come
        # in the same read as its early result. One is kept; a second one is garbage.
        self.early: dict[str, Any] | None = None
        #: a streamed invocation's receiver of GuestChunk frames (None: none is streamed)
        self.chunk_sink: Callable[[dict[str, Any]], None] | None = None
        # The running invocation's lines the guest sent ahead of its result (GuestLogs): the
        # frontend pulls them with ``live_logs`` (``live_pulled`` bytes so far); the reply
        # then carries them all, saying how many were pulled. Bounded: the tail wins.
        self.live = bytearray()
        self.live_pulled = 0
        self.live_request_id: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_read_buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        try:
            for doc in self.unpacker.feed(data):
                if not isinstance(doc, dict):
                    raise ValueError("not a frame")
                if doc.get("t") == "chunk":  # GuestChunk: a streamed response's bytes
                    if self.chunk_sink is not None:
                        self.chunk_sink(doc)
                    continue  # nobody streams now (a late chunk of a timed-out one): dropped
                if doc.get("t") == "logs":
                    self._live(m.GuestLogs.from_wire(doc))
                    continue
                if self.waiter is not None and not self.waiter.done():
                    self.waiter.set_result(doc)
                elif self.early is None:
                    self.early = doc
                else:
                    raise ValueError("unexpected frame")
        except Exception:
            # A guest that writes garbage on its channel is broken; it gets no second chance.
            self.garbage = True
            if self.transport is not None:
                self.transport.close()

    def _live(self, frame: m.GuestLogs) -> None:
        if frame.request_id != self.live_request_id:
            return  # not the running invocation's (late, or a guest out of turn): dropped
        self.live += frame.logs
        over = len(self.live) - DEFAULT_LIMITS.invocation_log_bytes_max
        if over > 0:
            del self.live[:over]
            self.live_pulled = max(0, self.live_pulled - over)

    def live_begin(self, request_id: str) -> None:
        self.live.clear()
        self.live_pulled = 0
        self.live_request_id = request_id

    def live_end(self) -> tuple[bytes, int]:
        """The running invocation's lines sent ahead and how many bytes of them were pulled;
        nothing more is kept for it."""
        out, pulled = bytes(self.live), self.live_pulled
        self.live.clear()
        self.live_pulled = 0
        self.live_request_id = None
        return out, pulled

    def live_pull(self, bytes_max: int) -> bytes:
        """Lines not pulled yet (at most ``bytes_max``, whole lines where it cuts)."""
        out = bytes(self.live[self.live_pulled:self.live_pulled + bytes_max])
        if self.live_pulled + len(out) < len(self.live):
            cut = out.rfind(b"\n") + 1
            out = out[:cut] if cut > 0 else out
        self.live_pulled += len(out)
        return out

    def connection_lost(self, exc: Exception | None) -> None:
        idle = self.waiter is None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("environment channel closed"))
        if not self.closed.done():
            self.closed.set_result(None)
        if idle and self.on_lost is not None:
            self.on_lost(self)

    def gone(self) -> bool:
        """True if the environment's end of the channel is closed (it died), checked with the
        kernel now rather than waiting for the event loop to notice the hang-up."""
        if self.closed.done() or self.transport is None or self.transport.is_closing():
            return True
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return True
        p = select.poll()
        p.register(sock.fileno(), select.POLLRDHUP)
        return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
                   for _fd, ev in p.poll(0))

    async def request(self, doc: dict[str, Any] | None, timeout_s: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        if self.closed.done():  # it died before anyone asked
            raise ConnectionError("environment channel closed")
        waiter: asyncio.Future[dict[str, Any]] = loop.create_future()
        if doc is not None:
            if self.transport is None or self.transport.is_closing():
                raise ConnectionError("environment channel closed")
            self.transport.writelines(pack_parts(doc))
        if self.early is not None:
            early, self.early = self.early, None
            return early
        self.waiter = waiter
        # A timer instead of asyncio.wait_for: no extra task per invocation on the hot path.
        timer = loop.call_later(timeout_s, _expire, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            self.waiter = None


    async def shutdown(self, reason: str, timeout_s: float) -> bytes:
        """Ask the guest to run Lambda's SHUTDOWN phase; its last logs, once it said goodbye
        (or nothing, when it closed, sent something else or overran ``timeout_s``)."""
        if self.transport is None or self.transport.is_closing():
            return b""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        doc: dict[str, Any] | None = {"t": "shutdown", "reason": reason}  # GuestShutdown
        while True:
            try:
                frame = await self.request(doc, max(0.0, deadline - loop.time()))
            except (TimeoutError, ConnectionError):
                return b""
            doc = None
            if frame.get("t") == "bye":
                logs = frame.get("logs")
                return logs[-DEFAULT_LIMITS.invocation_log_bytes_max:] if isinstance(
                    logs, bytes) else b""
            # a late result of an invocation that timed out: not the goodbye, keep waiting


def _with_live(logs: bytes, live: bytes, pulled: int) -> tuple[bytes, int]:
    """An invocation's whole log (the lines sent ahead, then the rest), bounded (the tail
    wins), and how many of its leading bytes the frontend pulled already."""
    whole = live + logs
    over = len(whole) - DEFAULT_LIMITS.invocation_log_bytes_max
    if over > 0:
        return whole[over:], max(0, pulled - over)
    return whole, pulled


def _expire(fut: asyncio.Future[dict[str, Any]]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


@dataclass
class EnvRecord:
    spec: EnvSpec
    function_key: str
    spawned: Spawned
    channel: _EnvChannel
    cgroup: cgroups.Cgroup
    created_ms: int
    slot: int
    busy: bool = False
    invocations: int = 0
    init_error: dict[str, Any] | None = None
    init_ms: float = 0.0
    extensions: int = 0  # extensions registered in it (its SHUTDOWN phase is theirs)
    # The Invoke phase that goes on after the response went back (extensions still at work):
    # the next invocation waits for it; its logs (END/REPORT and theirs) wait for a reply.
    phase: asyncio.Future[None] | None = None
    phase_task: asyncio.Task[None] | None = None
    late_logs: bytes = b""
    last_used_ms: int = 0
    max_rss_kb: int = 0
    measurements: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    guest_wire: int = m.GUEST_WIRE  # the channel's dialect this guest speaks (core/messages)


class _AgentCollector(Collector):
    """The agent's own view, read at scrape time: environments by state, its admission
    limits and memory, its event counters."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterable[Metric]:
        a = self.agent
        envs = GaugeMetricFamily("cellcloud_agent_environments",
                                 "Environments this agent holds, by state (idle, busy)",
                                 labels=["state"])
        busy = sum(1 for r in a.envs.values() if r.busy)
        envs.add_metric(["idle"], len(a.envs) - busy)
        envs.add_metric(["busy"], busy)
        cap = GaugeMetricFamily("cellcloud_agent_environments_max",
                                "Environments this agent admits at once", value=a.envs_max)
        mem = GaugeMetricFamily("cellcloud_agent_memory_bytes",
                                "Environments' memory on this agent: budget, used (cgroup "
                                "charge), committed (configured)", labels=["kind"])
        mem.add_metric(["budget"], a.memory_budget_bytes)
        mem.add_metric(["used"], a.memory_used_bytes)
        mem.add_metric(["committed"], sum(r.spec.memory_mb for r in a.envs.values()) * 2**20)
        events = CounterMetricFamily("cellcloud_agent_events",
                                     "Environment events on this agent (created, "
                                     "create_failed, invocations, timeouts, crashes, ...)",
                                     labels=["event"])
        for name, value in sorted(a.counters.items()):
            events.add_metric([name], value)
        return [envs, cap, mem, events]


class _Lease:
    __slots__ = ("env_id", "expires", "ended", "running", "idle", "invocations")

    def __init__(self, env_id: str, expires: float) -> None:
        self.env_id = env_id
        self.expires = expires  # time.monotonic()
        self.ended = False
        self.running = False
        self.idle = asyncio.Event()
        self.idle.set()
        self.invocations = 0


class Agent:
    def __init__(self, agent_id: str, state_dir: str, backend: Backend, *, uid_base: int,
                 envs_max: int = DEFAULT_LIMITS.envs_per_agent_max, region: str = "cc-local-1",
                 pids_max: int = 1024, memory_budget_mb: int | None = None,
                 oversubscription: float = 4.0, cgroup_group: str | None = None,
                 runtimes_found: dict[str, runtimes.Runtime] | None = None,
                 identity: pki.TlsConfig | None = None, cell: str = "cell-1",
                 allow_unlimited: bool = False, network: NetHelperClient | None = None,
                 layer_cache_bytes_max: int | None = None):
        self.agent_id = agent_id
        self.state_dir = state_dir
        self.bundles_dir = os.path.join(state_dir, "bundles")
        os.makedirs(self.bundles_dir, exist_ok=True)
        self.backend = backend
        self.uid_base = uid_base
        self.envs_max = envs_max
        self.region = region
        self.pids_max = pids_max
        # Unique per agent *and* region: two regions on one host must never sweep each
        # other's environments.
        self.cgroup_group = cgroup_group or agent_id
        self.runtimes = runtimes_found if runtimes_found is not None else runtimes.find()
        # Memory admission (Lambda's soft allocation): configured memory may exceed the
        # budget by the oversubscription ratio, memory actually used may not exceed it.
        self.memory_budget_bytes = (memory_budget_mb * 2**20 if memory_budget_mb
                                    else int(_host_memory_bytes() * 0.8))
        self.oversubscription = oversubscription
        # Without a cgroup hierarchy, environments would run without memory/pids/CPU limits:
        # only with --allow-unlimited (serve() refuses to start otherwise; the zygote too).
        self.allow_unlimited = allow_unlimited
        # The network helper (started before the lock-down); None: environments get only
        # their own loopback.
        self.network = network
        # The volume helper (volumes/helper.py; started before the lock-down with
        # --volumes-run-dir): None: a task with managed volumes is refused.
        self.volumes: VolumeHelperClient | None = None
        self.memory_used_bytes = 0  # refreshed by housekeeping from the cgroups
        # Tests only (negative controls): isolation layers to switch off. Never set from the
        # API: create_env builds every EnvSpec itself.
        self.unsafe_disabled_layers: list[str] = []
        self.envs: dict[str, EnvRecord] = {}
        # Environments that died while idle, so that an invoke placed on one is answered
        # EnvGone ("no handler code ran") rather than EnvNotFound; bounded, oldest forgotten.
        self._gone: OrderedDict[str, None] = OrderedDict()
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._zombie_cgroups: list[cgroups.Cgroup] = []
        self.started_ms = int(time.time() * 1000)
        self._rng = random.Random(os.urandom(16))  # span ids (core/tracing.py)
        self.counters = {"created": 0, "create_failed": 0, "invocations": 0, "timeouts": 0,
                         "crashes": 0, "destroyed": 0, "attestation_failures": 0,
                         "envs_gone": 0}
        self.server_stats: Any = None  # the transport server's, for refused-op counts
        # Live update (handover.py): while draining, new work is refused with AgentDraining.
        self.draining = False
        self._idle = asyncio.Event()
        # The key attestation documents are signed with: the agent's own certificate from the
        # region CA (a CA of its own when it runs outside a region, as in tests).
        self.identity = identity or pki.tls_config(state_dir, region, "agent", cell, agent_id)
        self._measured: dict[str, str] = {}  # bundle/layer dir -> digest recorded at unpack
        # Digests a create_env is using right now (not to be forgotten under it), and digests
        # the frontend no longer wants that an environment still runs from (dropped when the
        # last such environment goes).
        self._bundle_pins: dict[str, int] = {}
        self._forget_later: set[str] = set()
        self.sweep_bundles()
        # Image layers, unpacked once, bounded (agent/images.py).
        self.images = LayerCache(state_dir, DEFAULT_LIMITS if layer_cache_bytes_max is None
                                 else dataclasses.replace(
                                     DEFAULT_LIMITS,
                                     agent_layer_cache_bytes_max=layer_cache_bytes_max))
        self._shutdowns: set[asyncio.Task[bytes]] = set()  # graceful ends under way
        self._net_counters: asyncio.Future[dict[str, Any]] | None = None  # a read under way
        # Logs of environments reset because their extensions overran an Invoke phase, for
        # the next invoke or destroy that names them (bounded; the oldest go first).
        self._reset_logs: dict[str, tuple[str, bytes]] = {}  # env -> (function key, logs)
        # Leases the frontend registered (issue #13): a router may run invocations on the
        # leased environment, one at a time, until the lease expires or is ended.
        self._leases: dict[str, _Lease] = {}
        # Fargate-style tasks (agent/tasks.py): their containers are environments too.
        self.tasks = TaskRunner(self)
        self.ops: dict[str, Callable[[Any], Awaitable[Any]]]
        self.ops = {"create_env": self.create_env, "invoke": self.invoke,
                    "destroy": self.destroy, "status": self.status, "attest": self.attest,
                    "forget_bundles": self.forget_bundles, "image_blob": self.image_blob,
                    "lease_grant": self.lease_grant, "lease_end": self.lease_end,
                    "leased_invoke": self.leased_invoke, "metrics": self.metrics,
                    "live_logs": self.live_logs,
                    "task_create": self.tasks.task_create,
                    "task_container_start": self.tasks.container_start,
                    "task_container_stop": self.tasks.container_stop,
                    "task_exec": self.tasks.task_exec, "task_poll": self.tasks.task_poll,
                    "task_destroy": self.tasks.task_destroy}
        # Prometheus (docs/observability.md): the process's CPU, memory, fds and TLS
        # handshakes, and the environments as this agent sees them; read by its frontend.
        self.metrics_registry = process_registry()
        self.metrics_registry.register(_AgentCollector(self))

    # -- operations -------------------------------------------------------------------------
    async def create_env(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.draining:
            raise OpError("AgentDraining", "the agent is being replaced; retry")
        try:
            req = m.CreateEnvRequest.from_wire(body)
        except m.MessageError as e:
            raise OpError("InvalidRequest", str(e)) from e
        env_id = req.env_id
        if env_id in self.envs:
            raise OpError("EnvExists", env_id)
        if len(self.envs) >= self.envs_max:
            raise OpError("AgentFull", f"{len(self.envs)} environments; the maximum is {self.envs_max}")
        isolation = req.function.environment.get(ISOLATION_VARIABLE, "")
        if isolation and isolation not in ISOLATIONS:
            raise OpError("EnvUnsupported", f"{ISOLATION_VARIABLE}={isolation!r}: the isolation "
                          f"a function may ask for is one of {', '.join(ISOLATIONS)}")
        if isolation and isolation != self.backend.name:
            raise OpError("EnvUnsupported", f"the function asks for {isolation} isolation "
                          f"({ISOLATION_VARIABLE}={isolation}); agent {self.agent_id} runs the "
                          f"{self.backend.name} backend")
        memory_mb = req.function.memory_mb
        committed = (sum(r.spec.memory_mb for r in self.envs.values()) + memory_mb
                     + self.tasks.memory_committed_mb())
        if committed * 2**20 > self.oversubscription * self.memory_budget_bytes:
            raise OpError("AgentFull", f"{committed} MB configured would exceed "
                          f"{self.oversubscription}x the {self.memory_budget_bytes >> 20} MB budget")
        if self.memory_used_bytes + env_baseline_bytes > self.memory_budget_bytes:
            raise OpError("HostMemoryExhausted", f"{self.memory_used_bytes >> 20} MB in use of a "
                          f"{self.memory_budget_bytes >> 20} MB budget")
        digests = {req.bundle_sha256, *req.function.layers} if req.image is None else set()
        for sha in digests:
            self._bundle_pins[sha] = self._bundle_pins.get(sha, 0) + 1
            self._forget_later.discard(sha)  # wanted again
        try:
            return (await self._create_env_pinned(req)).to_wire()
        except BaseException:
            if env_id not in self.envs:  # never started: the image layers it held go back
                self.images.release(env_id)
            raise
        finally:
            for sha in digests:
                self._bundle_pins[sha] -= 1
                if not self._bundle_pins[sha]:
                    del self._bundle_pins[sha]
            self._forget_unused()

    async def _create_env_pinned(self, req: m.CreateEnvRequest) -> m.CreateEnvReply:
        env_id, pushed, fn, image = req.env_id, req.bundles, req.function, req.image
        image_layers: list[str] = []
        if image:
            # An image-rooted environment: its layers must be in the cache (the frontend
            # streams a missing one with image_blob on LayerMissing, then asks again).
            image_layers = self._image_layers(env_id, image)
            bundle_dir, layer_dirs = "", []
            runtime = runtimes.Runtime("image", (), ())
            runtime_argv = [str(a) for a in [*(image.get("entrypoint") or []),
                                             *(image.get("cmd") or [])]]
            if not runtime_argv:
                raise OpError("InvalidImage", "the image has neither ENTRYPOINT nor CMD")
        else:
            bundle_dir = self._bundle(req.bundle_sha256, pushed.get(req.bundle_sha256))
            found = self.runtimes.get(fn.runtime)
            if found is None:
                raise OpError("RuntimeNotSupported", f"{fn.runtime} is not available on this host")
            runtime = found
            layer_dirs = [self._bundle(sha, pushed.get(sha)) for sha in fn.layers]
            runtime_argv = runtimes.argv_for(runtime, fn.handler)
        wire_fn = fn.to_wire()
        config = {k: wire_fn.get(k) for k in ("name", "handler", "runtime", "memory_mb",
                                               "timeout_s",
                                          "ephemeral_mb", "environment", "version")}
        if image:
            config["image"] = {k: image.get(k) for k in ("digest", "entrypoint", "cmd",
                                                          "workdir", "env")}
        # The function's network setting (core/vpc.py): "" the agent's policy, "none" no
        # pooled network namespace at all (an empty one: only loopback).
        network_setting = fn.network
        if network_setting not in ("", "egress", "none"):
            raise OpError("InvalidNetwork", f"unknown network setting {network_setting!r}")
        if network_setting == "egress" and self.network is None:
            raise OpError("NetworkUnavailable", "the function asks for egress (VpcConfig "
                          "cellcloud-egress) but this agent runs with --network none")
        net_allow = list(fn.net_allow)
        if net_allow and network_setting != "egress":
            raise OpError("InvalidNetwork", "an allow-list needs the egress mode")
        if network_setting:
            config["network"] = network_setting
        if net_allow:
            config["net_allow"] = net_allow
        # Re-measure what is about to run; a bundle or layer changed on disk since it was
        # unpacked (and measured) is refused, not run.
        measurements = {
            "runtime": attestation.measure_runtime(["bootstrap"] if image else runtime_argv),
            "bundle": await self._verified_measure(bundle_dir) if not image else "",
            "layers": [await self._verified_measure(d) for d in layer_dirs]
            + [self._image_measure(d) for d in image_layers],
            "config": attestation.measure_config(config),
        }
        document = attestation.sign(
            {"env_id": env_id, "agent_id": self.agent_id, "function_arn": fn.arn,
             "time_ms": int(time.time() * 1000), "nonce": None, "measurements": measurements},
            self.identity.cert_path, self.identity.key_path)
        slot = self._alloc_slot()
        uid = self.uid_base + slot
        spec = EnvSpec(
            env_id=env_id, function_name=fn.name, function_version=fn.version,
            function_arn=fn.arn, handler=fn.handler, runtime=fn.runtime,
            memory_mb=fn.memory_mb, timeout_s=fn.timeout_s, bundle_dir=bundle_dir,
            uid=uid, gid=uid, cgroup_group=self.cgroup_group, region=self.region,
            ephemeral_mb=(fn.ephemeral_mb if fn.ephemeral_mb is not None
                          else DEFAULT_LIMITS.ephemeral_mb_default),
            environment=dict(fn.environment),
            log_group=fn.log_group or f"/aws/lambda/{fn.name}",
            log_stream=fn.log_stream or f"{time.strftime('%Y/%m/%d')}/[{fn.version}]{env_id}",
            layer_dirs=layer_dirs, pids_max=self.pids_max,
            runtime_argv=runtime_argv,
            extra_trees=list(runtime.trees),
            attestation=json.dumps(document),
            disabled_layers=list(self.unsafe_disabled_layers),
            allow_unlimited=self.allow_unlimited,
            image_layers=image_layers,
            image_workdir=str((image or {}).get("workdir") or ""),
            image_env={str(k): str(v) for k, v in ((image or {}).get("env") or {}).items()},
            snapstart=snapstart_id(req) if fn.snapstart else "",
        )
        cg = cgroups.Cgroup(self.cgroup_group, env_id)
        netns_fd: int | None = None
        try:
            if (self.network is not None and "net_ns" not in spec.disabled_layers
                    and network_setting != "none"):
                # A microVM's namespace holds a tap for its guest (network/helper.py).
                lease = await asyncio.to_thread(self.network.acquire, env_id, net_allow, None,
                                                self.backend.name == "microvm")
                spec.network, netns_fd = lease.info, lease.netns_fd
            spawned = await (self.backend.spawn(spec) if netns_fd is None
                             else self.backend.spawn(spec, netns_fd=netns_fd))
        except Exception as e:
            self._free_slots.append(slot)
            self.counters["create_failed"] += 1
            self._release_network(spec)
            raise OpError("EnvUnsupported" if isinstance(e, Unsupported) else "EnvCreateFailed",
                          str(e)) from e
        finally:
            if netns_fd is not None:
                os.close(netns_fd)
        loop = asyncio.get_running_loop()
        _, channel = await loop.connect_accepted_socket(self._channel, spawned.channel)
        now_ms = int(time.time() * 1000)
        rec = EnvRecord(spec, req.function_key, spawned, channel, cg, now_ms, slot,
                        last_used_ms=now_ms, measurements=measurements)
        self.envs[env_id] = rec
        timeout_s = (req.create_timeout_ms if req.create_timeout_ms is not None
                     else DEFAULT_LIMITS.env_create_timeout_ms) / 1000
        try:
            ready = m.GuestReady.from_wire(await channel.request(None, timeout_s))
        except (TimeoutError, ConnectionError, m.MessageError) as e:
            self._remove(env_id)
            self.counters["create_failed"] += 1
            raise OpError("EnvCreateFailed", f"environment did not start: {e!r}") from e
        rec.init_error = ready.init_error
        rec.init_ms = ready.init_ms
        rec.extensions = ready.extensions
        rec.guest_wire = ready.wire
        if rec.init_error and rec.init_error.get("errorType") == "Runtime.SandboxSetupError":
            self._remove(env_id)
            self.counters["create_failed"] += 1
            raise OpError("EnvCreateFailed", rec.init_error["errorMessage"])
        if cg.version and "cgroup_cpu" not in spec.disabled_layers:
            try:  # the init burst is over: from now on the memory's share of a vCPU
                cg.set_cpu_quota(cgroups.cpu_quota_us(spec.memory_mb))
            except OSError as e:
                self._remove(env_id)
                self.counters["create_failed"] += 1
                raise OpError("EnvCreateFailed", f"could not cap the CPU: {e}") from e
        self.counters["created"] += 1
        return m.CreateEnvReply(env_id, spawned.pid, rec.init_ms, rec.init_error)

    async def invoke(self, body: dict[str, Any]) -> dict[str, Any] | Stream:
        if self.draining:
            raise OpError("AgentDraining", "the agent is being replaced; retry")
        try:
            req = m.InvokeRequest.from_wire(body)
        except m.MessageError as e:
            raise OpError("InvalidRequest", str(e)) from e
        if req.stream:
            return Stream(self._invoke_streamed(req))
        try:
            return (await self._invoke(req)).to_wire()
        finally:
            self._idle.set()

    async def _invoke_streamed(self, req: m.InvokeRequest) -> AsyncIterator[dict[str, Any]]:
        """A streamed invocation's answer: ``{"c": bytes, "ct": content type}`` for each piece
        of the response as the guest sends it, then ``{"r": InvokeReply}``."""
        chunks: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def sink(doc: dict[str, Any]) -> None:
            if doc.get("request_id") == req.request_id and isinstance(doc.get("data"), bytes):
                chunks.put_nowait(doc)

        task = asyncio.ensure_future(self._invoke(req, sink))
        try:
            while not task.done():
                getter = asyncio.ensure_future(chunks.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                doc = getter.result()
                yield {"c": doc["data"], "ct": str(doc.get("content_type") or "")}
            while not chunks.empty():  # sent before the result: already here
                doc = chunks.get_nowait()
                yield {"c": doc["data"], "ct": str(doc.get("content_type") or "")}
            yield {"r": (await task).to_wire()}
        finally:
            self._idle.set()

    # -- leases (issue #13) ------------------------------------------------------------------
    async def lease_grant(self, body: dict[str, Any]) -> dict[str, Any]:
        """The frontend leases ``env_id`` to a router for ``ttl_ms`` (its own clock here)."""
        lease_id, env_id = str(body["lease_id"]), str(body["env_id"])
        if env_id not in self.envs:
            raise OpError("EnvNotFound", env_id)
        self._leases[lease_id] = _Lease(env_id, time.monotonic() + int(body["ttl_ms"]) / 1000)
        self.counters["leases_granted"] = self.counters.get("leases_granted", 0) + 1
        return {"lease_id": lease_id}

    async def lease_end(self, body: dict[str, Any]) -> dict[str, Any]:
        """The lease is over: no invocation under it starts from now on; answered once none
        runs, with whether its environment is still alive. Idempotent. (The logs of its
        invocations went back to the router in each answer; it files them with the frontend.)"""
        lease = self._leases.get(str(body["lease_id"]))
        if lease is None:
            return {"known": False, "env_alive": True, "invocations": 0}
        lease.ended = True
        if body.get("wait") is False:  # refused from now on; the caller asks again to wait
            return {"known": True, "env_alive": lease.env_id in self.envs, "invocations": 0}
        while lease.running:
            await lease.idle.wait()
        self._leases.pop(str(body["lease_id"]), None)
        rec = self.envs.get(lease.env_id)
        return {"known": True, "env_alive": rec is not None,
                "function_key": rec.function_key if rec is not None else "",
                "invocations": lease.invocations}

    async def leased_invoke(self, body: dict[str, Any]) -> dict[str, Any]:
        """An invocation from a router under a lease: refused (nothing ran) unless the lease
        is known, live, names this environment and runs nothing else."""
        lease = self._leases.get(str(body.get("lease_id")))
        env_id = str(body.get("env_id"))
        if lease is None or lease.ended or lease.env_id != env_id:
            self.counters["lease_refused"] = self.counters.get("lease_refused", 0) + 1
            raise OpError("LeaseInvalid", f"no live lease on {env_id}; nothing ran")
        if time.monotonic() >= lease.expires:
            self.counters["lease_refused"] = self.counters.get("lease_refused", 0) + 1
            raise OpError("LeaseInvalid", f"the lease on {env_id} expired; nothing ran")
        if lease.running:
            raise OpError("EnvBusy", f"{env_id} is already running an invocation")
        lease.running = True
        lease.idle.clear()
        try:
            res = await self.invoke({"env_id": env_id, "request_id": str(body["request_id"]),
                                     "payload": body["payload"],
                                     "timeout_ms": int(body["timeout_ms"]),
                                     "arn": str(body.get("arn", "")),
                                     "trace_id": str(body.get("trace_id") or ""),
                                     "spans": body.get("spans") is True})
            lease.invocations += 1
            assert isinstance(res, dict)  # never streamed: the body named no "stream"
            return res
        finally:
            lease.running = False
            lease.idle.set()

    async def wait_idle(self, timeout_s: float = 1.0) -> None:
        """Wait (bounded) until an invocation finishes."""
        self._idle.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            pass

    async def adopt(self, envs: list[tuple[dict[str, Any], Any]]) -> int:
        """Take over environments handed over by the previous agent process (handover.py)."""
        loop = asyncio.get_running_loop()
        for doc, sock in envs:
            spec = EnvSpec.from_wire(doc["spec"])
            _, channel = await loop.connect_accepted_socket(self._channel, sock)
            rec = EnvRecord(spec, doc["function_key"], Spawned(int(doc["pid"]), sock), channel,
                            cgroups.Cgroup(self.cgroup_group, spec.env_id),
                            int(doc["created_ms"]), int(doc["slot"]),
                            invocations=int(doc["invocations"]), init_error=doc["init_error"],
                            init_ms=float(doc["init_ms"]), last_used_ms=int(doc["last_used_ms"]),
                            max_rss_kb=int(doc["max_rss_kb"]),
                            extensions=int(doc.get("extensions", 0)),
                            guest_wire=int(doc.get("guest_wire", 1)),
                            measurements=dict(doc["measurements"]))
            self.envs[spec.env_id] = rec
            if spec.image_layers:
                self.images.adopt(spec.env_id, list(spec.image_layers))
        used = {rec.slot for rec in self.envs.values()}
        self._next_slot = max(used, default=-1) + 1
        self._free_slots = sorted(set(range(self._next_slot)) - used, reverse=True)
        return len(envs)

    def _channel(self) -> _EnvChannel:
        return _EnvChannel(self._channel_lost)

    def _channel_lost(self, channel: _EnvChannel) -> None:
        """An idle environment's channel closed: it is dead. Forget it now (its cgroup, uid
        slot and memory go back), unless this agent is handing its environments over."""
        if self.draining:
            return
        env_id = next((e for e, r in self.envs.items() if r.channel is channel), None)
        if env_id is not None and not self.envs[env_id].busy:
            self._forget_gone(env_id)

    def _forget_gone(self, env_id: str) -> None:
        log.warning("environment %s died while idle; removed", env_id,
                    extra=eventlog.fields(event="env_died_idle", env=env_id))
        self.counters["envs_gone"] += 1
        self._remove(env_id)
        self._gone[env_id] = None
        while len(self._gone) > DEFAULT_LIMITS.gone_env_ids_remembered_max:
            self._gone.popitem(last=False)

    async def _invoke(self, req: m.InvokeRequest,
                      chunk_sink: Callable[[dict[str, Any]], None] | None = None
                      ) -> m.InvokeReply:
        env_id = req.env_id
        rec = self.envs.get(env_id)
        if rec is not None and not rec.busy and (rec.channel.gone()
                                                 or _exited(rec.spawned.pid)):
            self._forget_gone(env_id)
            rec = None
        if rec is None:
            if env_id in self._reset_logs:  # reset after its response went back
                raise OpError("EnvReset", f"{env_id} was reset: an extension overran the "
                              "previous invocation's timeout",
                              logs=self._reset_logs.pop(env_id)[1])
            if env_id in self._gone:
                raise OpError("EnvGone", f"{env_id} died before this invocation reached it; "
                              "no handler code ran")
            raise OpError("EnvNotFound", env_id)
        if rec.busy:
            raise OpError("EnvBusy", f"{env_id} is already running an invocation")
        rec.busy = True
        if rec.phase is not None:
            # The previous invocation's Invoke phase (its extensions) is still going: it ends
            # by the previous deadline at the latest, with the environment reset if overrun.
            await asyncio.shield(rec.phase)
            if self.envs.get(env_id) is not rec:  # reset: nothing of this invocation ran
                raise OpError("EnvReset", f"{env_id} was reset: an extension overran the "
                              "previous invocation's timeout",
                              logs=self._reset_logs.pop(env_id, ("", b""))[1])
        rec.invocations += 1
        self.counters["invocations"] += 1
        request_id = req.request_id
        timeout_ms = req.timeout_ms
        started = time.monotonic()
        # Tracing: the environment gets the caller's X-Ray header, with Parent = this agent's
        # span when the caller exports spans (then both spans go back in the reply).
        trace = tracing.parse(req.trace_id) if req.trace_id else None
        span_id = ""
        started_ns = time.time_ns()
        guest_trace = req.trace_id if trace is not None else ""
        if trace is not None and req.spans:
            span_id = tracing.new_span_id(self._rng)
            guest_trace = trace.child(span_id).format()
        ask = m.GuestInvoke(request_id, req.payload, timeout_ms, req.arn,
                            legacy=rec.guest_wire < 2, stream=chunk_sink is not None,
                            trace_id=guest_trace, span=bool(span_id))
        rec.channel.chunk_sink = chunk_sink
        try:
            return await self._invoke_on(rec, env_id, request_id, timeout_ms, started, ask,
                                         trace if span_id else None, span_id, started_ns)
        finally:
            rec.channel.chunk_sink = None

    async def _invoke_on(self, rec: EnvRecord, env_id: str, request_id: str, timeout_ms: int,
                         started: float, ask: m.GuestInvoke,
                         trace: tracing.TraceHeader | None = None, span_id: str = "",
                         started_ns: int = 0) -> m.InvokeReply:
        rec.channel.live_begin(request_id)
        try:
            frame = await rec.channel.request(
                ask.to_wire(int(time.time() * 1000) if ask.legacy else 0), timeout_ms / 1000)
            while frame.get("t") == "done":  # an earlier Invoke phase's end (a predecessor
                # agent was waiting for it when it handed over): its logs, then ours
                logs = frame.get("logs")
                rec.late_logs = (rec.late_logs + (logs if isinstance(logs, bytes) else b""))[
                    -DEFAULT_LIMITS.invocation_log_bytes_max:]
                frame = await rec.channel.request(
                    None, max(0.0, started + timeout_ms / 1000 - time.monotonic()))
        except TimeoutError:
            self.counters["timeouts"] += 1
            live = rec.channel.live_end()
            if rec.extensions:  # SHUTDOWN (reason "timeout") for them, then the kill
                self._shutdown_soon(env_id, "timeout")
            else:  # nothing to tell: no shutdown phase, as on Lambda
                self._remove(env_id)
            return self._failure(
                "Sandbox.Timedout",
                f"RequestId: {request_id} Error: Task timed out after {timeout_ms / 1000:.2f} seconds",
                started, live=live)
        except ConnectionError:
            self.counters["crashes"] += 1
            live = rec.channel.live_end()
            usage = rec.cgroup.usage()
            garbage = rec.channel.garbage
            self._remove(env_id)
            if garbage:
                msg = f"RequestId: {request_id} Error: Runtime wrote an invalid frame to its channel"
            elif usage.oom_kills:
                msg = (f"RequestId: {request_id} Error: Runtime exited with error: signal: killed "
                       f"(out of memory: {rec.spec.memory_mb} MB)")
            else:
                msg = f"RequestId: {request_id} Error: Runtime exited without providing a reason"
            return self._failure("Runtime.ExitError", msg, started, oom=bool(usage.oom_kills),
                                 live=live)
        live_logs, live_pulled = rec.channel.live_end()
        rec.busy = False
        rec.last_used_ms = int(time.time() * 1000)
        try:
            result = m.GuestResult.from_wire(frame) if frame.get("t") == "result" else None
        except m.MessageError:
            result = None
        if result is None or result.request_id != request_id:
            self._remove(env_id)
            return self._failure("Runtime.InvalidResponse", "the runtime answered out of turn",
                                 started)
        rec.max_rss_kb = max(rec.max_rss_kb, result.max_rss_kb)
        alive = result.env_alive
        if not alive:  # the runtime (or an extension) exited: no other invoke here
            if rec.extensions:
                self._shutdown_soon(env_id, "failure")
            else:
                self._remove(env_id)
        elif result.phase_pending:
            rec.phase = asyncio.get_running_loop().create_future()
            rec.phase_task = asyncio.ensure_future(
                self._invoke_phase(rec, request_id, started + timeout_ms / 1000))
        previous, rec.late_logs = rec.late_logs, b""
        spans: tuple[m.Span, ...] = ()
        if span_id and trace is not None:
            ended_ns = time.time_ns()
            spans = (m.Span("agent", span_id, trace.parent or "", started_ns, ended_ns),)
            env = result.span
            if env is not None and tracing.valid_span_id(env.span_id):
                # What the environment says is only its span id and times (its code may have
                # written the frame): name and parent are the agent's, times within its span.
                start = min(max(env.start_ns, started_ns), ended_ns)
                spans += (m.Span("environment", env.span_id, span_id, start,
                                 min(max(env.end_ns, start), ended_ns)),)
        logs, live_bytes = _with_live(result.logs, live_logs, live_pulled)
        return m.InvokeReply(
            result.payload, result.function_error, logs, result.duration_ms,
            result.max_rss_kb, alive,
            # the previous invocation's logs from after its response (END/REPORT, extensions)
            previous_logs=previous, spans=spans, logs_live_bytes=live_bytes)

    async def _invoke_phase(self, rec: EnvRecord, request_id: str, deadline: float) -> None:
        """Wait for the end of an Invoke phase whose response already went back: every
        extension that got the event asked for the next one. Overrunning the function's
        timeout resets the environment (SHUTDOWN, reason "timeout"), as on Lambda."""
        env_id = rec.spec.env_id
        try:
            while True:
                frame = await rec.channel.request(None, max(0.0, deadline - time.monotonic()))
                if frame.get("t") == "done":
                    done = m.GuestPhaseDone.from_wire(frame)
                    if done.request_id == request_id:
                        break
            rec.late_logs = (rec.late_logs + done.logs)[-DEFAULT_LIMITS.invocation_log_bytes_max:]
            rec.max_rss_kb = max(rec.max_rss_kb, done.max_rss_kb)
            if not done.env_alive:  # an extension crashed after the response
                self._keep_reset_logs(rec, rec.late_logs + await self._shutdown(
                    env_id, "failure", from_phase=True))
        except TimeoutError:
            self.counters["timeouts"] += 1
            self._keep_reset_logs(rec, rec.late_logs + await self._shutdown(
                env_id, "timeout", from_phase=True))
        except (ConnectionError, m.MessageError):
            self.counters["crashes"] += 1
            if self.envs.get(env_id) is rec:
                self._remove(env_id)
            self._keep_reset_logs(rec, rec.late_logs)
        finally:
            phase, rec.phase, rec.phase_task = rec.phase, None, None
            if phase is not None and not phase.done():
                phase.set_result(None)

    def _keep_reset_logs(self, rec: EnvRecord, logs: bytes) -> None:
        self._reset_logs[rec.spec.env_id] = (
            rec.function_key, logs[-DEFAULT_LIMITS.invocation_log_bytes_max:])
        while len(self._reset_logs) > reset_logs_envs_max:
            del self._reset_logs[next(iter(self._reset_logs))]

    def _failure(self, type_: str, message: str, started: float,
                 oom: bool = False, live: tuple[bytes, int] = (b"", 0)) -> m.InvokeReply:
        logs, live_bytes = _with_live(f"{message}\n".encode(), *live)
        return m.InvokeReply(
            json.dumps({"errorType": type_, "errorMessage": message}).encode(), "Unhandled",
            logs, (time.monotonic() - started) * 1000, env_alive=False,
            oom=oom, logs_live_bytes=live_bytes)

    async def live_logs(self, body: Any = None) -> dict[str, Any]:
        """Running invocations' lines that their guests sent ahead of the result, not pulled
        yet (the frontend calls this every second: agents never dial out). Bounded per
        answer; what does not fit comes with the next pull or the invocation's reply."""
        budget = DEFAULT_LIMITS.logs_live_answer_bytes_max
        out = []
        for env_id, rec in self.envs.items():
            ch = rec.channel
            if ch.live_request_id is None or ch.live_pulled >= len(ch.live) or budget <= 0:
                continue
            chunk = ch.live_pull(budget)
            if chunk:
                budget -= len(chunk)
                out.append({"env_id": env_id, "function_key": rec.function_key,
                            "request_id": ch.live_request_id, "logs": chunk})
        return {"envs": out}

    async def destroy(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            env_id = m.DestroyRequest.from_wire(body).env_id
        except m.MessageError as e:
            raise OpError("InvalidRequest", str(e)) from e
        rec = self.envs.get(env_id)
        if rec is not None and rec.busy:
            # Never cut an invocation short (a frontend that just replaced another destroys
            # what it does not know, a router's lease may be running there): its leases end
            # now — none starts another invocation — and the running one finishes first
            # (the agent holds it to its own deadline).
            for lease in self._leases.values():
                if lease.env_id == env_id:
                    lease.ended = True
            while rec.busy and self.envs.get(env_id) is rec:
                await self.wait_idle()
            rec = self.envs.get(env_id)
        if rec is None:
            key, logs = self._reset_logs.pop(env_id, ("", b""))
            return m.DestroyReply(False, key, logs).to_wire()
        # Lambda's SHUTDOWN phase first (extensions get their event), then the kill; the
        # environment's last logs go back to the caller, which files them with the function's.
        logs = rec.late_logs + await self._shutdown(env_id, "spindown")
        return m.DestroyReply(True, rec.function_key, logs).to_wire()

    async def forget_bundles(self, body: dict[str, Any]) -> dict[str, Any]:
        """The frontend no longer holds these digests: drop their unpacked copies now, or,
        for one an environment still runs from (or is being created from), when the last such
        environment goes."""
        try:
            digests = m.ForgetBundlesRequest.from_wire(body).sha256
        except m.MessageError:
            digests = None
        if digests is None or len(digests) > DEFAULT_LIMITS.forget_bundles_digests_max:
            raise OpError("InvalidRequest", "sha256 must be a list of at most "
                          f"{DEFAULT_LIMITS.forget_bundles_digests_max} digests")
        for sha in digests:
            if not _is_digest(sha):
                raise OpError("InvalidBundle", "each digest must be 64 hex digits")
        in_use = self._bundles_in_use()
        forgotten, deferred = [], []
        for sha in digests:
            if sha in in_use:
                self._forget_later.add(sha)
                deferred.append(sha)
            else:
                self._drop_bundle(sha)
                forgotten.append(sha)
        return m.ForgetBundlesReply(tuple(forgotten), tuple(deferred)).to_wire()

    async def metrics(self, body: Any = None) -> bytes:
        """This process's Prometheus text exposition (no function names: operator only)."""
        return generate_latest(self.metrics_registry)

    async def status(self, body: Any = None) -> dict[str, Any]:
        try:
            light = m.StatusRequest.from_wire(body).light
        except m.MessageError as e:
            raise OpError("InvalidRequest", str(e)) from e
        if light:
            # The frontend's liveness poll: no per-environment cgroup or smaps reads.
            # envs_max and memory_mb_max (configured memory it accepts in all): the frontend's
            # placement counts against them instead of learning them from AgentFull.
            return {"agent_id": self.agent_id, "pid": os.getpid(),
                    "envs": [{"env_id": e} for e in self.envs], "counters": dict(self.counters),
                    "envs_max": self.envs_max,
                    "memory_mb_max": int(self.oversubscription * self.memory_budget_bytes) >> 20}
        net: dict[str, Any] = {}
        if self.network is not None:
            net = await self._network_counters()
        envs = []
        for env_id, rec in self.envs.items():
            u = rec.cgroup.usage()
            fp = cgroups.footprint(rec.cgroup.pids() or [rec.spawned.pid])
            envs.append({
                "env_id": env_id, "function": rec.spec.function_name,
                "function_key": rec.function_key, "pid": rec.spawned.pid, "busy": rec.busy,
                "invocations": rec.invocations, "memory_mb": rec.spec.memory_mb,
                "memory_bytes": u.memory_bytes, "memory_peak_bytes": u.memory_peak_bytes,
                "cpu_ns": u.cpu_ns, "uid": rec.spec.uid, "created_ms": rec.created_ms,
                "uss_bytes": fp.uss_bytes, "pss_bytes": fp.pss_bytes, "rss_bytes": fp.rss_bytes,
                "processes": fp.processes, "max_rss_kb": rec.max_rss_kb,
            })
            if rec.spec.network:
                env_net: dict[str, Any] = {"address": rec.spec.network.get("address"),
                                           "interface": rec.spec.network.get("interface"),
                                           **net.get("envs", {}).get(env_id, {})}
                if rec.spec.network.get("allow"):  # the function's allow-list (VpcConfig)
                    env_net["allow"] = list(rec.spec.network["allow"])
                envs[-1]["network"] = env_net
        return {
            "agent_id": self.agent_id, "backend": self.backend.name, "pid": os.getpid(),
            "envs_max": self.envs_max, "envs": envs, "counters": dict(self.counters),
            "tasks": self.tasks.summary(), "task_counters": dict(self.tasks.counters),
            "seccomp": lockdown.seccomp_mode(), "started_ms": self.started_ms,
            "ops": sorted(self.ops),
            "unknown_ops_refused": self.server_stats.unknown_ops if self.server_stats else 0,
            # internal protocol versions spoken and peers refused (core/protocols.py)
            "protocols": protocol_stats.snapshot(),
            "cgroup_version": cgroups.version(),
            "limits": "enforced" if cgroups.version() else "unlimited",
            "memory_budget_bytes": self.memory_budget_bytes,
            "memory_used_bytes": self.memory_used_bytes,
            "memory_committed_bytes": sum(r.spec.memory_mb for r in self.envs.values()) * 2**20,
            "oversubscription": self.oversubscription,
            "disk": _disk(self.state_dir),
            "bundles": len([e for e in os.listdir(self.bundles_dir) if _is_digest(e)]),
            "bundles_to_forget": len(self._forget_later),
            # image layers unpacked here (agent/images.py), and what streaming them did
            "image_layers": self.images.statistics(),
            # the microvm backend's acceleration (kvm or tcg; docs/microvm.md), else absent
            **({"accel": accel} if (accel := getattr(self.backend, "accel", None)) else {}),
            # the microvm backend's snapshots (--microvm-snapshots: the guest memory sizes
            # that start restored, others boot cold; SnapStart versions) and how
            # environments started
            **({"microvm_snapshots": self.backend.snapshot_info()}
               if hasattr(self.backend, "snapshot_info") else {}),
            "zygote_pid": getattr(self.backend, "zygote_pid", 0),
            "zygote_restarts": getattr(self.backend, "zygote_restarts", 0),
            "network": ({**self.network.info, "helper": net.get("helper", {}),
                         "dns": net.get("dns", {}), "alive": self.network.alive(),
                         **({"error": net["error"]} if "error" in net else {})}
                        if self.network is not None
                        else {"mode": "none"}),
        }

    async def _network_counters(self) -> dict[str, Any]:
        """The network helper's counters, waited for at most agent_status_network_wait_ms:
        the helper answers one call at a time, and one wiring a namespace (seconds on a busy
        host) must not hold up the status the region and its console are waiting for. One
        read at a time: a status that finds one under way waits for that one."""
        assert self.network is not None
        if self._net_counters is None or self._net_counters.done():
            fut = asyncio.ensure_future(asyncio.to_thread(self.network.counters))
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
            self._net_counters = fut
        try:
            return dict(await asyncio.wait_for(
                asyncio.shield(self._net_counters),
                DEFAULT_LIMITS.agent_status_network_wait_ms / 1000))
        except TimeoutError:
            return {"error": "the network helper is busy: counters not read"}
        except (OSError, RuntimeError) as e:
            return {"error": str(e)}

    async def image_blob(self, body: dict[str, Any]) -> dict[str, Any]:
        """One chunk (at most ``registry_chunk_bytes_max``) of an image layer the frontend
        streams after a ``LayerMissing``; the last one is verified and unpacked (a thread)."""
        data = body.get("data")
        if not isinstance(data, bytes):
            raise OpError("InvalidChunk", "data must be bytes")
        return await asyncio.to_thread(self.images.put, str(body.get("digest")),
                                       int(body.get("offset", 0)), data, bool(body.get("last")))

    def _image_measure(self, path: str) -> str:
        """An image layer's measurement as recorded at unpack. Not re-hashed on every create
        (an image may be gigabytes): the periodic ``remeasure`` hashes image layers in use
        and stops every environment on one that changed, as it does for bundles."""
        recorded = self._recorded(path)
        if recorded is None:
            self._alert(f"image layer {os.path.basename(path)} has no recorded measurement")
            raise OpError("AttestationFailed", "an image layer has no measurement; the "
                          "environment was not started")
        return recorded

    def _image_layers(self, env_id: str, image: dict[str, Any]) -> list[str]:
        """The image's layer dirs, held for ``env_id`` (released when the environment goes, or
        by ``create_env`` if it never starts), so the cache cannot evict them under it."""
        layers = image.get("layers") or []
        if not isinstance(layers, list) or not layers:
            raise OpError("InvalidImage", "an image needs at least one layer")
        if len(layers) > DEFAULT_LIMITS.image_layers_max:
            raise OpError("InvalidImage", f"more than {DEFAULT_LIMITS.image_layers_max} layers")
        digests = [str(d) for d in layers]
        dirs = self.images.acquire(env_id, digests)  # LayerMissing: the frontend streams it
        self.images.check_image_size(digests)
        return dirs

    # -- internals --------------------------------------------------------------------------
    def _bundle(self, sha: str, data: bytes | None) -> str:
        if not _is_digest(sha):
            raise OpError("InvalidBundle", "bundle_sha256 must be 64 hex digits")
        path = os.path.join(self.bundles_dir, sha)
        if os.path.isdir(path):
            return path
        if data is None:
            raise OpError("BundleMissing", sha, sha256=sha)
        if sha256_hex(data) != sha:
            raise OpError("BundleDigestMismatch", "the bundle does not hash to bundle_sha256")
        # Unpacked under a temp name and renamed into place only when complete; on any
        # failure (a malformed member, a full disk) the temp tree is removed.
        tmp = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        try:
            extract_zip(data, tmp)
            digest = attestation.measure_tree(tmp)
            with open(tmp + ".measure", "w") as f:
                f.write(digest)
            try:
                os.rename(tmp + ".measure", path + ".measure")
                os.rename(tmp, path)
            except OSError:  # a concurrent create won the race; theirs is identical
                pass
        except LambdaError as e:
            raise OpError("InvalidBundle", e.message) from e
        except OSError as e:
            raise OpError("BundleUnpackFailed", f"could not unpack the bundle on this host: "
                          f"{e.strerror or e}") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp + ".measure")
        return path

    def sweep_bundles(self) -> list[str]:
        """At start: unpack temp trees a previous process left (it crashed or failed mid-
        unpack). A temp tree of a process still alive (the predecessor during a live update)
        is left to it. What it removed."""
        removed = []
        for entry in sorted(os.listdir(self.bundles_dir)):
            _, sep, rest = entry.partition(".tmp-")
            if not sep:
                continue
            pid = rest.split("-", 1)[0].split(".", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and os.path.exists(f"/proc/{pid}"):
                continue
            target = os.path.join(self.bundles_dir, entry)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(target)
            removed.append(entry)
        if removed:
            log.warning("removed %d partly unpacked bundles left by a previous agent process",
                        len(removed))
        return removed

    def _bundles_in_use(self) -> set[str]:
        used = set(self._bundle_pins)
        for rec in self.envs.values():
            for d in [rec.spec.bundle_dir, *rec.spec.layer_dirs]:
                used.add(os.path.basename(d))
        return used

    def _drop_bundle(self, sha: str) -> None:
        path = os.path.join(self.bundles_dir, sha)
        self._forget_later.discard(sha)
        self._measured.pop(path, None)
        if os.path.isdir(path):
            # Out of sight first (one rename), then removed: a crash in between leaves a temp
            # tree that the next start sweeps.
            doomed = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + ".measure")

    def _forget_unused(self) -> None:
        if self._forget_later:
            for sha in self._forget_later - self._bundles_in_use():
                self._drop_bundle(sha)

    def _recorded(self, path: str) -> str | None:
        if path not in self._measured:
            try:
                with open(path + ".measure") as f:
                    self._measured[path] = f.read().strip()
            except OSError:
                return None
        return self._measured[path]

    async def _verified_measure(self, path: str) -> str:
        now = await asyncio.to_thread(attestation.measure_tree, path)
        recorded = self._recorded(path)
        if recorded is None or now != recorded:
            self._alert(f"bundle {os.path.basename(path)} changed on disk since it was unpacked "
                        f"(measured {now[:16]}…, recorded {(recorded or 'nothing')[:16]}…)")
            raise OpError("AttestationFailed", "the code on disk does not match its measurement; "
                          "the environment was not started")
        return now

    def _alert(self, message: str) -> None:
        self.counters["attestation_failures"] += 1
        log.error("ATTESTATION ALERT on %s: %s", self.agent_id, message)

    async def attest(self, body: dict[str, Any]) -> dict[str, Any]:
        """A fresh document for a running environment, bound to the caller's nonce."""
        try:
            req = m.AttestRequest.from_wire(body)
        except m.MessageError as e:
            raise OpError("InvalidRequest", str(e)) from e
        rec = self.envs.get(req.env_id)
        if rec is None:
            raise OpError("EnvNotFound", req.env_id)
        nonce = req.nonce
        if not 8 <= len(nonce) <= 128:
            raise OpError("InvalidNonce", "the nonce must be 8 to 128 characters")
        return attestation.sign(
            {"env_id": rec.spec.env_id, "agent_id": self.agent_id,
             "function_arn": rec.spec.function_arn, "time_ms": int(time.time() * 1000),
             "nonce": nonce, "measurements": rec.measurements},
            self.identity.cert_path, self.identity.key_path)

    async def remeasure(self) -> None:
        """The periodic check: every environment's code is measured again while it runs; an
        environment whose code changed under it is stopped."""
        dirs: dict[str, list[str]] = {}
        for env_id, rec in self.envs.items():
            for d in [rec.spec.bundle_dir, *rec.spec.layer_dirs, *rec.spec.image_layers]:
                if d:
                    dirs.setdefault(d, []).append(env_id)
        containers = self.tasks.running_layers()  # task containers' image layers too
        for d in containers:
            dirs.setdefault(d, [])
        for d, env_ids in dirs.items():
            now = await asyncio.to_thread(attestation.measure_tree, d)
            if now != self._recorded(d):
                self._alert(f"{os.path.basename(d)} changed while running; stopping "
                            f"{env_ids + [f'{t}/{c}' for t, c in containers.get(d, [])]}")
                for env_id in env_ids:
                    if env_id in self.envs:
                        self._remove(env_id)
                for task_id, name in containers.get(d, []):
                    self.tasks.kill_container(task_id, name, "an image layer it runs from "
                                              "changed on the host")

    def alloc_slot(self) -> int:
        """A uid slot (uid_base + slot) for an environment; :meth:`free_slot` gives it back."""
        return self._alloc_slot()

    def free_slot(self, slot: int) -> None:
        self._free_slots.append(slot)

    def reserve_slot(self, slot: int) -> None:
        """An adopted process runs as this slot's uid: it is not handed out again."""
        if slot in self._free_slots:
            self._free_slots.remove(slot)
        while self._next_slot <= slot:
            if self._next_slot != slot:
                self._free_slots.append(self._next_slot)
            self._next_slot += 1

    def remove_cgroup_later(self, cg: cgroups.Cgroup) -> None:
        """A cgroup whose processes are still exiting: housekeeping removes it once empty."""
        self._zombie_cgroups.append(cg)

    def _alloc_slot(self) -> int:
        if self._free_slots:
            return self._free_slots.pop()
        self._next_slot += 1
        return self._next_slot - 1

    def _shutdown_soon(self, env_id: str, reason: str) -> None:
        task = asyncio.ensure_future(self._shutdown(env_id, reason))
        self._shutdowns.add(task)
        task.add_done_callback(self._shutdowns.discard)

    async def _shutdown(self, env_id: str, reason: str, from_phase: bool = False) -> bytes:
        """End an environment the way Lambda does: SHUTDOWN (``spindown``, ``timeout`` or
        ``failure``) with its budget — 2 s with extensions registered, 500 ms for the runtime
        without (the guest keeps to it) — then kill whatever is left."""
        rec = self.envs.pop(env_id, None)
        if rec is None:
            return b""
        if rec.phase_task is not None and not from_phase:
            rec.phase_task.cancel()  # its wait on the channel gives way to the goodbye
            try:
                await rec.phase_task
            except asyncio.CancelledError:
                pass
        budget_s = DEFAULT_LIMITS.env_shutdown_ms_with_extensions / 1000
        try:
            # A margin over the guest's own budget for its goodbye frame; never more.
            return await rec.channel.shutdown(reason, budget_s + 1.0)
        finally:
            self._stop(rec)

    def _remove(self, env_id: str) -> None:
        rec = self.envs.pop(env_id, None)
        if rec is not None:  # else already ended by another path (a destroy, a timeout)
            self._stop(rec)

    def _stop(self, rec: EnvRecord) -> None:
        self.backend.kill(rec.spawned.pid)
        if rec.channel.transport is not None:
            rec.channel.transport.close()
        rec.cgroup.kill_all()
        if not rec.cgroup.destroy():
            self._zombie_cgroups.append(rec.cgroup)
        self._free_slots.append(rec.slot)
        self._release_network(rec.spec)
        self.images.release(rec.spec.env_id)
        self.counters["destroyed"] += 1
        self._forget_unused()

    def _release_network(self, spec: EnvSpec) -> None:
        if self.network is not None and spec.network:
            try:
                self.network.release(spec.env_id)
            except (OSError, RuntimeError) as e:
                log.warning("network helper: release %s: %s", spec.env_id, e)

    async def housekeeping(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(1.0)  # a periodic timer, not a wait for a condition
            ticks += 1
            if ticks % remeasure_interval_s == 0:
                await self.remeasure()
            self._zombie_cgroups = [cg for cg in self._zombie_cgroups if not cg.destroy()]
            self.memory_used_bytes = (sum(r.cgroup.usage().memory_bytes
                                          for r in self.envs.values())
                                      + self.tasks.memory_used_bytes())

    def close(self, cgroups_wait_s: float = 5.0) -> None:
        """Stop for good: every environment is killed and its cgroup removed, then the agent's
        own cgroup directory (bounded wait: killed processes take a moment to exit)."""
        for env_id in list(self.envs):
            self._remove(env_id)
        self.tasks.close()
        self.backend.close()
        deadline = time.monotonic() + cgroups_wait_s
        while True:
            self._zombie_cgroups = [cg for cg in self._zombie_cgroups if not cg.destroy()]
            if (not self._zombie_cgroups and cgroups.remove_group(self.cgroup_group)) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.02)  # polling a condition (processes gone), bounded by the deadline
        if self.network is not None:
            self.network.close()  # the helper removes the bridge, veths, netns and tables
        if self.volumes is not None:
            self.volumes.close()  # the helper detaches every task volume still attached


async def serve(args: argparse.Namespace) -> None:
    from .. import runtime
    from . import handover

    state_dir = os.path.abspath(args.state_dir)
    os.makedirs(state_dir, exist_ok=True)
    import hashlib

    group = f"{args.agent_id}-{hashlib.sha256(state_dir.encode()).hexdigest()[:8]}"
    if not cgroups.version():
        if not args.allow_unlimited:
            log.error("no cgroup hierarchy at %s: environments' memory, pids and CPU limits "
                      "cannot be enforced; refusing to start (--allow-unlimited permits it)",
                      cgroups.ROOT)
            raise SystemExit(3)
        log.warning("no cgroup hierarchy at %s: environments run WITHOUT memory, pids or CPU "
                    "limits (--allow-unlimited)", cgroups.ROOT)
    adopted: list[tuple[dict[str, Any], Any]] = []
    handed: dict[str, Any] = {}  # from a live update: the running network helper's channel
    handed_tasks: list[tuple[dict[str, Any], list[int]]] = []
    listen_sock = None
    if args.adopt:
        # Live update: the previous agent process hands over its socket and environments.
        listen_sock, adopted = handover.receive(args.adopt, handed, handed_tasks)
        log.warning("adopted %d environments from the previous agent process", len(adopted))
    else:
        swept = cgroups.sweep(group)
        if swept:
            log.warning("reclaimed %d environments left by a previous agent process", swept)
    if not args.no_favor_dynmods:
        log.info("cgroups: %s", cgroups.favor_dynmods("/run/cellcloud/cgroup-dynmods"))
    backend: Backend
    if args.backend == "microvm":
        from ..microvm.backend import MicrovmBackend

        backend = MicrovmBackend(state_dir, snapshots=args.microvm_snapshots,
                                 snapshot_memory_mib=tuple(args.microvm_snapshot_memory_mib))
    else:
        backend = JailBackend(os.path.join(state_dir, "jailroot"))
    try:
        # fork+exec the zygote (or build the guest image, probe and start the VMM launcher)
        # while we still may
        backend.start()
    except (OSError, RuntimeError) as e:
        log.error("the %s backend cannot start: %s", args.backend, e)
        raise SystemExit(3) from e
    snapshot_error = getattr(backend, "snapshot_error", "")
    if snapshot_error:
        log.warning("microvm: no agent snapshot, environments boot fresh: %s", snapshot_error)
    network = None
    if args.network != "none":  # also before the lock-down: the helper needs netlink and nft
        from ..network import policy

        net_config = NetConfig(
            mode=args.network, pool=args.net_pool, subnet=args.net_subnet, deny=args.net_deny,
            allow=args.net_allow, dns_upstreams=args.dns_upstream,
            conn_rate_per_s=args.net_conn_rate, conn_burst=args.net_conn_burst,
            conns_max=args.net_conns_max)
        network = NetHelperClient(policy.prefix_for(group), net_config)
        try:
            if "network" in handed:  # live update: keep the predecessor's helper (and envs' links)
                network = NetHelperClient.adopt(handed.pop("network"), network.prefix,
                                                net_config)
                log.info("network: adopted %s", network.info)
            else:
                log.info("network: %s", network.start())
        except RuntimeError as e:
            log.error("%s", e)
            backend.close()
            raise SystemExit(3) from e
    handed_volumes = handed.pop("volumes", None)  # the volume helper, kept (below)
    for unused in handed.values():
        unused.close()  # a helper handed to an agent without a network tears down on EOF
    found = runtimes.find()  # probes other interpreters: also before the lock-down
    agent = Agent(args.agent_id, state_dir, backend, uid_base=args.uid_base,
                  envs_max=args.envs_max, region=args.region,
                  memory_budget_mb=args.memory_budget_mb, oversubscription=args.oversubscription,
                  cgroup_group=group, runtimes_found=found, cell=args.cell,
                  allow_unlimited=args.allow_unlimited, network=network,
                  layer_cache_bytes_max=args.layer_cache_bytes_max,
                  identity=pki.tls_config(args.pki_dir or state_dir, args.region, "agent",
                                          args.cell, args.agent_id))
    if handed_volumes is not None:  # live update: the predecessor's helper and mounts
        agent.volumes = VolumeHelperClient.adopt(handed_volumes)
    elif args.volumes_run_dir:  # before the lock-down: the helper mounts and dials out
        agent.volumes = VolumeHelperClient(
            os.path.abspath(args.volumes_run_dir), os.path.abspath(args.volumes_data_dir or
                                                                   args.volumes_run_dir),
            args.volumes_colony, args.volumes_servers, args.volumes_pki_dir, args.region)
        try:
            agent.volumes.start()
        except OSError as e:
            log.error("%s", e)
            agent.volumes = None
            backend.close()
            if network is not None:
                network.close()
            raise SystemExit(3) from e
    if args.experiment_faults:
        _install_experiment_faults(agent)
    if args.netns:
        # A host of its own: enter that network namespace before binding (and before the
        # lock-down; the zygote keeps the host's, its environments get fresh ones anyway).
        with open(os.path.join("/var/run/netns", args.netns)) as ns:
            from ..sandbox import linux

            linux.setns(ns.fileno(), linux.CLONE_NEWNET)
    sock = listen_sock if listen_sock is not None else runtime.bind_tcp(args.listen)
    hpath = handover.socket_path(state_dir)
    hsock = handover.listen(hpath)
    hsock_ino = os.stat(hpath).st_ino
    if not args.no_lockdown:
        lockdown.lock_down()
    await agent.adopt(adopted)
    await agent.tasks.adopt(handed_tasks)
    server = Server(agent.ops, protocol="agent")
    agent.server_stats = server.stats
    host, port = await server.listen_tcp("", 0, sock=sock)
    runtime.announce_ready({"component": "agent", "agent_id": args.agent_id, "host": host,
                            "port": port, "pid": os.getpid(), "adopted": len(adopted)})
    hk = asyncio.ensure_future(agent.housekeeping())
    handed_over = asyncio.Event()
    ho = asyncio.ensure_future(handover.serve_handover(agent, hsock, sock, server, handed_over))
    shutdown = asyncio.ensure_future(runtime.wait_for_shutdown())
    try:
        await asyncio.wait([shutdown, asyncio.ensure_future(handed_over.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        hk.cancel()
        ho.cancel()
        if handed_over.is_set():
            # The successor owns the environments now: leave them running, and only let
            # this process's zygote go (the environments are not its children's children).
            agent.backend.close()
            if agent.network is not None:
                agent.network.forget()  # the successor holds the helper's channel now
            if agent.volumes is not None:
                agent.volumes.forget()  # and the volume helper's
            log.warning("handed over; exiting without touching the environments")
        else:
            agent.close()
            await server.close()
            hsock.close()
            handover.unlink_if_ours(hpath, hsock_ino)


EXPERIMENT_CRASH_MARKER = b"cellcloud-experiment-crash-agent"


def _install_experiment_faults(agent: Agent) -> None:
    """Only with ``--experiment-faults``: the blast-radius experiment's poison request, on
    both ways an invocation arrives (from the frontend, and from a router under a lease)."""
    def crashing(op: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
                 ) -> Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]]:
        async def invoke_or_crash(body: dict[str, Any]) -> dict[str, Any]:
            if EXPERIMENT_CRASH_MARKER in bytes(body.get("payload") or b""):
                log.error("experiment fault: crash marker received; the agent dies now")
                os._exit(70)
            return await op(body)
        return invoke_or_crash

    ops: dict[str, Any] = agent.ops
    for name in ("invoke", "leased_invoke"):
        ops[name] = crashing(ops[name])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="cellcloud agent serve")
    p.add_argument("--agent-id", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--uid-base", type=int, default=200_000)
    p.add_argument("--envs-max", type=int, default=DEFAULT_LIMITS.envs_per_agent_max)
    p.add_argument("--region", default="cc-local-1")
    p.add_argument("--cell", default="cell-1")
    p.add_argument("--no-favor-dynmods", action="store_true",
                   help="leave the host's cgroups as they are (cold starts pay an RCU grace "
                        "period per cgroup join on cgroup v1)")
    p.add_argument("--adopt", default=None,
                   help="live update: take over from the agent whose handover socket this is")
    p.add_argument("--netns", default=None,
                   help="serve from this network namespace (/var/run/netns/NAME)")
    p.add_argument("--pki-dir", default=None,
                   help="the region state directory holding pki/ (the region CA); "
                        "default: a CA of the agent's own")
    p.add_argument("--memory-budget-mb", type=int, default=None,
                   help="memory environments may really use (default: 80%% of the host's)")
    p.add_argument("--layer-cache-bytes-max", type=int, default=None,
                   help="unpacked image layers kept (default: agent_layer_cache_bytes_max)")
    p.add_argument("--oversubscription", type=float, default=4.0,
                   help="configured memory may exceed the budget by this ratio")
    p.add_argument("--allow-unlimited", action="store_true",
                   help="start even where no cgroup hierarchy is found, running environments "
                        "without memory, pids or CPU limits (default: refuse to start)")
    p.add_argument("--backend", default="jail", choices=("jail", "microvm"),
                   help="execution environments: jail (namespaces, cgroups, seccomp) or "
                        "microvm (each in a QEMU guest with its own kernel; docs/microvm.md)")
    p.add_argument("--microvm-snapshots", action="store_true",
                   help="--backend microvm: start environments of the smallest guest memory "
                        "from the agent guest's snapshot (made at start; docs/microvm.md)")
    p.add_argument("--microvm-snapshot-memory-mib", type=int, action="append", default=[],
                   help="--microvm-snapshots: a guest memory size (MiB) to snapshot at start "
                        "(repeatable, at most microvm_snapshot_sizes_max; default: the "
                        "smallest guest); environments of other sizes boot cold")
    p.add_argument("--network", default="none", choices=("egress", "none"),
                   help="environments' outbound network (egress: an interface under the "
                        "region's policy, via the network helper; none: loopback only)")
    p.add_argument("--net-pool", default="100.64.0.0/16",
                   help="address pool of environments (at most a /16, outside RFC 1918)")
    p.add_argument("--net-subnet", default=None, help="this agent's subnet of the pool "
                   "(default: the first one no other agent on this host holds)")
    p.add_argument("--net-deny", action="append", default=[],
                   help="a region CIDR environments may not reach (repeat)")
    p.add_argument("--net-allow", action="append", default=[],
                   help="egress only to these CIDRs (repeat; default: anywhere not denied)")
    p.add_argument("--net-conn-rate", type=int, default=DEFAULT_LIMITS.env_net_conn_rate_per_s,
                   help="new connections per second per environment (then dropped)")
    p.add_argument("--net-conn-burst", type=int, default=DEFAULT_LIMITS.env_net_conn_burst)
    p.add_argument("--net-conns-max", type=int, default=DEFAULT_LIMITS.env_net_conns_max,
                   help="connections tracked at once per environment (then new ones dropped)")
    p.add_argument("--dns-upstream", action="append", default=[],
                   help="resolver the DNS forwarder asks (default: /etc/resolv.conf's)")
    p.add_argument("--volumes-run-dir", default=None,
                   help="start the volume helper (tasks' managed volumes), mounting under here")
    p.add_argument("--volumes-data-dir", default=None,
                   help="the control plane's volume files (volumes not on storage servers)")
    p.add_argument("--volumes-colony", default="", help="the store colony of volumes' cells")
    p.add_argument("--volumes-servers", default="", help="the storage servers file")
    p.add_argument("--volumes-pki-dir", default="",
                   help="the region's PKI (mutual TLS to storage servers as role volume)")
    p.add_argument("--no-lockdown", action="store_true", help="tests only: skip seccomp")
    p.add_argument("--insecure", action="store_true",
                   help="development only: plain-text internal links")
    p.add_argument("--experiment-faults", action="store_true",
                   help="experiments only: an invoke whose payload carries the crash marker "
                        "kills this agent (standing for a host-level bug)")
    from .. import runtime

    runtime.add_protocol_max(p)
    args = p.parse_args(argv)
    runtime.apply_protocol_max(args)
    runtime.setup_logging("agent", agent=args.agent_id, cell=args.cell or None)
    runtime.setup_security(args, "agent", args.cell, args.agent_id, args.region)
    if not args.no_lockdown:
        lockdown.deny_io_uring()  # before uvloop's loop exists, or it sets up a ring
    runtime.run(serve(args))


if __name__ == "__main__":
    main(sys.argv[1:])
