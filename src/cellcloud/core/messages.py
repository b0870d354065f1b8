"""The messages of the invoke path's internal hops, one frozen type each (pure: no I/O).

Three hops: router -> frontend (the ``http`` op: a tenant's request, and the dispatcher's,
the scheduler's and the console's calls that stand for one), frontend -> agent (the agent's
operations, carried by :mod:`cellcloud.transport`) and agent -> guest (the environment's
channel, framed by :mod:`cellcloud.transport.codec`). The transport's links are versioned
(:mod:`.protocols`): these types are the current version; the previous one is translated at
the transport's edge.
Each type has ``to_wire() -> dict`` and ``from_wire(dict) -> Self``; ``from_wire`` checks the
types and refuses a missing required field with :class:`MessageError` (a ``ValueError``),
and ignores fields it does not know (a newer peer may add some).

One set of field names end to end: ``request_id``; ``payload`` (bytes); ``timeout_ms``, a
*relative* budget (each side turns it into a deadline on its own clock: the guest into the
Runtime API's absolute ``Lambda-Runtime-Deadline-Ms``); ``function_error`` (None: the function
succeeded, else Lambda's ``X-Amz-Function-Error``, "Unhandled"/"Handled"); ``env_alive`` (False:
the environment is gone, no other invocation may go to it); ``logs`` (bytes).

Guests that an agent adopted in a live update may speak the channel's first dialect (``id``,
``deadline_ms``, ``error_type``/``ok``, ``fatal``): :data:`GUEST_WIRE` is announced in the
guest's ready frame, the guest readers accept the old names, and each side answers in the
dialect it was spoken to, so an agent can be rolled forward or back over live environments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Self

from .limits import DEFAULT_LIMITS

GUEST_WIRE = 2  # the agent <-> guest dialect; 1 (no "wire" in the ready frame): the first

class MessageError(ValueError):
    """A message that is not of its type: a field missing or of the wrong type."""


_MISSING: Any = object()


def _get(doc: Any, name: str, types: type | tuple[type, ...], kind: str,
         default: Any = _MISSING, nullable: bool = False) -> Any:
    """``doc[name]``, checked: of ``types`` (an int is a fine float, a bool never an int);
    ``default`` when absent (or None, unless ``nullable``); missing and required: refused."""
    try:
        value = doc.get(name, _MISSING)
    except AttributeError:
        raise MessageError(f"{kind}: a map was expected, not {type(doc).__name__}") from None
    if type(value) is types:  # the hot path: exactly the type wanted
        return value
    if value is _MISSING or value is None:
        if value is None and nullable:
            return None
        if default is _MISSING:
            raise MessageError(f"{kind}: the field {name!r} is missing")
        return default
    wanted = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in wanted:
        pass  # bool is an int to Python, never to us
    elif isinstance(value, wanted):
        return value
    elif float in wanted and isinstance(value, int):
        return float(value)
    raise MessageError(f"{kind}: the field {name!r} must be "
                       f"{'/'.join(t.__name__ for t in wanted)}, not {type(value).__name__}")


def _str_list(doc: dict[str, Any], name: str, kind: str,
              default: Any = ()) -> tuple[str, ...]:
    """A list of strings; ``default`` when absent (``_MISSING``: required)."""
    value = _get(doc, name, (list, tuple), kind, default)
    if not all(isinstance(v, str) for v in value):
        raise MessageError(f"{kind}: the field {name!r} must be a list of strings")
    return tuple(value)


# -- router -> frontend ---------------------------------------------------------------------
@dataclass(frozen=True)
class HttpRequest:
    """A Lambda (or cellcloud) REST API request for a cell's frontend: the ``http`` op.

    ``account`` owns what the request names (the function's account); ``caller``, when not
    "", is another account calling it (a cross-account invoke, judged by the function's
    policy in its own cell). Version 1 of the frontend protocol named the fields ``m``,
    ``p``, ``q``, ``h``, ``b``, ``a``, ``c`` (:func:`as_api` gives that map, which the
    frontend's routes read)."""

    method: str
    path: str
    account: str
    query: str = ""  # the raw query string
    headers: dict[str, str] = field(default_factory=dict)  # the forwarded ones, lower-case
    body: bytes = b""
    caller: str = ""

    def to_wire(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"method": self.method, "path": self.path, "query": self.query,
                               "headers": self.headers, "body": self.body,
                               "account": self.account}
        if self.caller:
            doc["caller"] = self.caller
        return doc

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "http"
        headers = _get(doc, "headers", dict, k, {})
        if not all(isinstance(a, str) and isinstance(b, str) for a, b in headers.items()):
            raise MessageError(f"{k}: the field 'headers' must map strings to strings")
        return cls(method=_get(doc, "method", str, k), path=_get(doc, "path", str, k),
                   account=_get(doc, "account", str, k), query=_get(doc, "query", str, k, ""),
                   headers=headers, body=_get(doc, "body", bytes, k, b""),
                   caller=_get(doc, "caller", str, k, ""))

    def as_api(self) -> dict[str, Any]:
        """The map the frontend's routes read (frontend/api.py)."""
        req = {"m": self.method, "p": self.path, "q": self.query, "h": self.headers,
               "b": self.body, "a": self.account}
        if self.caller:
            req["c"] = self.caller
        return req


@dataclass(frozen=True)
class HttpReply:
    """The frontend's answer to an ``http`` request (the same in both versions): status,
    headers, body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"s": self.status, "h": self.headers, "b": self.body}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "http reply"
        return cls(status=_get(doc, "s", int, k), headers=_get(doc, "h", dict, k),
                   body=_get(doc, "b", bytes, k))


# -- frontend -> agent ----------------------------------------------------------------------
@dataclass(frozen=True)
class FunctionSpec:
    """What an environment runs (create_env's ``function``)."""

    name: str
    arn: str
    handler: str
    runtime: str
    memory_mb: int
    timeout_s: int
    ephemeral_mb: int | None = None  # None: the agent's default
    environment: dict[str, str] = field(default_factory=dict)
    version: str = "$LATEST"
    network: str = ""  # "", "egress" or "none" (core/vpc.py)
    net_allow: tuple[str, ...] = ()
    layers: tuple[str, ...] = ()  # digests
    # The environment's log group and stream (AWS_LAMBDA_LOG_GROUP_NAME/_STREAM_NAME), as
    # the frontend files its lines; "": the agent's own default names.
    log_group: str = ""
    log_stream: str = ""
    # SnapStart (a published version whose function has ApplyOn PublishedVersions): its
    # environments start from the version's snapshot after its init (microvm agents only;
    # docs/microvm.md). "": off; else "PublishedVersions".
    snapstart: str = ""

    def to_wire(self) -> dict[str, Any]:
        doc = {"name": self.name, "arn": self.arn, "handler": self.handler,
               "runtime": self.runtime, "memory_mb": self.memory_mb,
               "timeout_s": self.timeout_s, "ephemeral_mb": self.ephemeral_mb,
               "environment": dict(self.environment), "version": self.version,
               "network": self.network, "net_allow": list(self.net_allow),
               "layers": list(self.layers)}
        if self.log_group:
            doc["log_group"] = self.log_group
        if self.log_stream:
            doc["log_stream"] = self.log_stream
        if self.snapstart:
            doc["snapstart"] = self.snapstart
        return doc

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "create_env.function"
        env = _get(doc, "environment", dict, k, {})
        if not all(isinstance(a, str) and isinstance(b, str) for a, b in env.items()):
            raise MessageError(f"{k}: the field 'environment' must map strings to strings")
        return cls(name=_get(doc, "name", str, k), arn=_get(doc, "arn", str, k),
                   handler=_get(doc, "handler", str, k), runtime=_get(doc, "runtime", str, k),
                   memory_mb=_get(doc, "memory_mb", int, k),
                   timeout_s=_get(doc, "timeout_s", int, k),
                   ephemeral_mb=_get(doc, "ephemeral_mb", int, k, None),
                   environment=dict(env), version=_get(doc, "version", str, k, "$LATEST"),
                   network=_get(doc, "network", str, k, ""),
                   net_allow=_str_list(doc, "net_allow", k), layers=_str_list(doc, "layers", k),
                   log_group=_get(doc, "log_group", str, k, ""),
                   log_stream=_get(doc, "log_stream", str, k, ""),
                   snapstart=_get(doc, "snapstart", str, k, ""))


@dataclass(frozen=True)
class CreateEnvRequest:
    env_id: str
    bundle_sha256: str
    function: FunctionSpec
    function_key: str = ""
    create_timeout_ms: int | None = None  # None: the agent's default
    bundles: dict[str, bytes] = field(default_factory=dict)  # pushed code, by digest
    # An image-rooted environment (frontend/image_functions.py's agent_image: digest, layers,
    # entrypoint, cmd, workdir, env); None: a zip function's bundle.
    image: dict[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"env_id": self.env_id, "bundle_sha256": self.bundle_sha256,
                               "function": self.function.to_wire(),
                               "function_key": self.function_key, "bundles": self.bundles}
        if self.create_timeout_ms is not None:
            doc["create_timeout_ms"] = self.create_timeout_ms
        if self.image is not None:
            doc["image"] = self.image
        return doc

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "create_env"
        bundles = _get(doc, "bundles", dict, k, {})
        if not all(isinstance(a, str) and isinstance(b, bytes) for a, b in bundles.items()):
            raise MessageError(f"{k}: the field 'bundles' must map digests to bytes")
        return cls(env_id=_get(doc, "env_id", str, k),
                   bundle_sha256=_get(doc, "bundle_sha256", str, k),
                   function=FunctionSpec.from_wire(_get(doc, "function", dict, k)),
                   function_key=_get(doc, "function_key", str, k, ""),
                   create_timeout_ms=_get(doc, "create_timeout_ms", int, k, None),
                   bundles=dict(bundles),
                   image=_get(doc, "image", dict, k, None))


@dataclass(frozen=True)
class CreateEnvReply:
    env_id: str
    pid: int
    init_ms: float = 0.0
    init_error: dict[str, Any] | None = None  # the Runtime API's {errorType, errorMessage}

    def to_wire(self) -> dict[str, Any]:
        return {"env_id": self.env_id, "pid": self.pid, "init_ms": self.init_ms,
                "init_error": self.init_error}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "create_env reply"
        return cls(env_id=_get(doc, "env_id", str, k), pid=_get(doc, "pid", int, k),
                   init_ms=_get(doc, "init_ms", float, k, 0.0),
                   init_error=_get(doc, "init_error", dict, k, None, nullable=True))


@dataclass(frozen=True)
class InvokeRequest:
    env_id: str
    request_id: str
    payload: bytes
    timeout_ms: int  # relative: the function's timeout
    arn: str = ""  # the ARN the caller invoked (qualified or not), for the context object
    # The X-Ray trace header (core/tracing.py), Parent = the caller's span; "": none
    trace_id: str = ""
    spans: bool = False  # answer with the agent's and the environment's spans (exporting)
    #: answer as a transport Stream: the response's bytes as the runtime streams them
    #: ({"c": bytes} items), then {"r": InvokeReply} (its payload empty)
    stream: bool = False

    def to_wire(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"env_id": self.env_id, "request_id": self.request_id,
                               "payload": self.payload, "timeout_ms": self.timeout_ms,
                               "arn": self.arn}
        if self.trace_id:
            doc["trace_id"] = self.trace_id
        if self.spans:
            doc["spans"] = True
        if self.stream:
            doc["stream"] = True
        return doc

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "invoke"
        return cls(env_id=_get(doc, "env_id", str, k), request_id=_get(doc, "request_id", str, k),
                   payload=_get(doc, "payload", bytes, k), timeout_ms=_get(doc, "timeout_ms", int, k),
                   arn=_get(doc, "arn", str, k, ""), trace_id=_get(doc, "trace_id", str, k, ""),
                   spans=_get(doc, "spans", bool, k, False),
                   stream=_get(doc, "stream", bool, k, False))


@dataclass(frozen=True)
class Span:
    """A finished span of a hop that exports nothing itself (the agent, the environment):
    carried back in the reply, exported by the caller. Ids in hex, times in ns since the epoch."""

    name: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "span_id": self.span_id, "parent_id": self.parent_id,
                "start_ns": self.start_ns, "end_ns": self.end_ns}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "span"
        return cls(name=_get(doc, "name", str, k), span_id=_get(doc, "span_id", str, k),
                   parent_id=_get(doc, "parent_id", str, k),
                   start_ns=_get(doc, "start_ns", int, k), end_ns=_get(doc, "end_ns", int, k))


def _spans(doc: Any, kind: str) -> tuple[Span, ...]:
    value = _get(doc, "spans", (list, tuple), kind, ())
    if len(value) > DEFAULT_LIMITS.trace_spans_per_reply_max:
        raise MessageError(f"{kind}: more than {DEFAULT_LIMITS.trace_spans_per_reply_max} spans")
    return tuple(Span.from_wire(s) for s in value)


@dataclass(frozen=True)
class InvokeReply:
    payload: bytes
    function_error: str | None  # None: success
    logs: bytes = b""
    duration_ms: float = 0.0
    max_rss_kb: int = 0
    env_alive: bool = True
    previous_logs: bytes = b""  # the previous invocation's logs from after its response
    oom: bool = False  # the environment was killed for memory
    spans: tuple[Span, ...] = ()  # asked for (InvokeRequest.spans): the agent's, the env's
    # How many leading bytes of ``logs`` the agent already handed out while the invocation
    # ran (the ``live_logs`` op): the frontend filed those as events then.
    logs_live_bytes: int = 0

    @property
    def status(self) -> str:
        return "ok" if self.function_error is None else "function_error"

    def to_wire(self) -> dict[str, Any]:
        # no "status" (function_error says it): agent protocol 2; version 1 peers get it
        # from the transport's adapter (core/protocols.py)
        doc: dict[str, Any] = {
            "payload": self.payload, "function_error": self.function_error,
            "logs": self.logs, "duration_ms": self.duration_ms, "max_rss_kb": self.max_rss_kb,
            "env_alive": self.env_alive}
        if self.previous_logs:
            doc["previous_logs"] = self.previous_logs
        if self.oom:
            doc["oom"] = True
        if self.spans:
            doc["spans"] = [sp.to_wire() for sp in self.spans]
        if self.logs_live_bytes:
            doc["logs_live_bytes"] = self.logs_live_bytes
        return doc

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "invoke reply"
        # required, null for a success: a reply without it is not read as one
        return cls(payload=_get(doc, "payload", bytes, k),
                   function_error=_get(doc, "function_error", str, k, nullable=True),
                   logs=_get(doc, "logs", bytes, k, b""),
                   duration_ms=_get(doc, "duration_ms", float, k, 0.0),
                   max_rss_kb=_get(doc, "max_rss_kb", int, k, 0),
                   env_alive=_get(doc, "env_alive", bool, k, True),
                   previous_logs=_get(doc, "previous_logs", bytes, k, b""),
                   oom=_get(doc, "oom", bool, k, False), spans=_spans(doc, k),
                   logs_live_bytes=_get(doc, "logs_live_bytes", int, k, 0))


@dataclass(frozen=True)
class DestroyRequest:
    env_id: str

    def to_wire(self) -> dict[str, Any]:
        return {"env_id": self.env_id}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        return cls(env_id=_get(doc, "env_id", str, "destroy"))


@dataclass(frozen=True)
class DestroyReply:
    destroyed: bool
    function_key: str = ""  # whose logs these are
    logs: bytes = b""  # the environment's last logs (its SHUTDOWN phase)

    def to_wire(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"destroyed": self.destroyed}
        if self.destroyed or self.logs:
            doc.update(function_key=self.function_key, logs=self.logs)
        return doc

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "destroy reply"
        return cls(destroyed=_get(doc, "destroyed", bool, k),
                   function_key=_get(doc, "function_key", str, k, ""),
                   logs=_get(doc, "logs", bytes, k, b""))


@dataclass(frozen=True)
class StatusRequest:
    light: bool = False  # the frontend's liveness poll: no per-environment reads

    def to_wire(self) -> dict[str, Any]:
        return {"light": self.light}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        if doc is None:  # status takes no body at all too
            return cls()
        return cls(light=bool(_get(doc, "light", (bool, int), "status", False)))


@dataclass(frozen=True)
class AttestRequest:
    env_id: str
    nonce: str

    def to_wire(self) -> dict[str, Any]:
        return {"env_id": self.env_id, "nonce": self.nonce}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        return cls(env_id=_get(doc, "env_id", str, "attest"),
                   nonce=_get(doc, "nonce", str, "attest"))


@dataclass(frozen=True)
class ForgetBundlesRequest:
    sha256: tuple[str, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"sha256": list(self.sha256)}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        _get(doc, "sha256", (list, tuple), "forget_bundles")
        return cls(sha256=_str_list(doc, "sha256", "forget_bundles"))


@dataclass(frozen=True)
class ForgetBundlesReply:
    forgotten: tuple[str, ...]
    deferred: tuple[str, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"forgotten": list(self.forgotten), "deferred": list(self.deferred)}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "forget_bundles reply"
        _get(doc, "forgotten", (list, tuple), k)  # both required: [] when none
        _get(doc, "deferred", (list, tuple), k)
        return cls(forgotten=_str_list(doc, "forgotten", k), deferred=_str_list(doc, "deferred", k))


# -- frontend -> agent: Fargate-style tasks (agent/tasks.py, docs/fargate.md) ---------------
def _str_map(doc: Any, name: str, kind: str) -> dict[str, str]:
    value = _get(doc, name, dict, kind, {})
    if not all(isinstance(a, str) and isinstance(b, str) for a, b in value.items()):
        raise MessageError(f"{kind}: the field {name!r} must map strings to strings")
    return dict(value)


def _int_map(doc: Any, name: str, kind: str) -> dict[str, int]:
    value = _get(doc, name, dict, kind, {})
    if not all(isinstance(a, str) and type(b) is int for a, b in value.items()):
        raise MessageError(f"{kind}: the field {name!r} must map strings to integers")
    return dict(value)


@dataclass(frozen=True)
class TaskPortMapping:
    """A container port the task's private address answers on (from the host only)."""

    container_port: int
    protocol: str = "tcp"  # "tcp" or "udp"

    def to_wire(self) -> dict[str, Any]:
        return {"container_port": self.container_port, "protocol": self.protocol}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "task_create.port_mappings"
        return cls(container_port=_get(doc, "container_port", int, k),
                   protocol=_get(doc, "protocol", str, k, "tcp"))


@dataclass(frozen=True)
class TaskMount:
    """A task volume bind-mounted into a container (ECS ``mountPoints``)."""

    volume: str  # the task volume's name (TaskVolume.name)
    path: str  # containerPath: absolute, normalised
    read_only: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"volume": self.volume, "path": self.path, "read_only": self.read_only}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "task_create.mounts"
        return cls(volume=_get(doc, "volume", str, k), path=_get(doc, "path", str, k),
                   read_only=_get(doc, "read_only", bool, k, False))


@dataclass(frozen=True)
class TaskVolume:
    """A managed volume the task's host attaches (its volume helper: volumes/helper.py)
    before the containers start, under the attachment the control plane took."""

    name: str
    volume_id: str
    size_gib: int
    attach_epoch: int
    replicated: bool  # served by the region's storage servers; else the local file

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "volume_id": self.volume_id, "size_gib": self.size_gib,
                "attach_epoch": self.attach_epoch, "replicated": self.replicated}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "task_create.volumes"
        return cls(name=_get(doc, "name", str, k), volume_id=_get(doc, "volume_id", str, k),
                   size_gib=_get(doc, "size_gib", int, k),
                   attach_epoch=_get(doc, "attach_epoch", int, k),
                   replicated=_get(doc, "replicated", bool, k))


@dataclass(frozen=True)
class TaskContainer:
    """One container of a task: its image root (layers, bottom first) and its process."""

    name: str
    image_layers: tuple[str, ...]  # layer digests, bottom first
    argv: tuple[str, ...]  # ENTRYPOINT + CMD, resolved by the caller
    env: dict[str, str] = field(default_factory=dict)  # the image's ENV, then the container's
    workdir: str = ""  # "": /
    port_mappings: tuple[TaskPortMapping, ...] = ()
    mounts: tuple[TaskMount, ...] = ()  # the task's volumes it mounts (ECS mountPoints)
    # The container's own limits within the task's (ECS's container cpu/memory/
    # memoryReservation; 0: none, only the task's): a hard memory limit (over it the
    # container is OOM-killed), a soft one (reclaimed first under the task's pressure) and a
    # cpu weight (cpu.shares among the task's containers).
    memory_mib: int = 0
    memory_reservation_mib: int = 0
    cpu_units: int = 0

    def to_wire(self) -> dict[str, Any]:
        out = {"name": self.name, "image_layers": list(self.image_layers),
               "argv": list(self.argv), "env": dict(self.env), "workdir": self.workdir,
               "port_mappings": [p.to_wire() for p in self.port_mappings]}
        if self.mounts:
            out["mounts"] = [mt.to_wire() for mt in self.mounts]
        for key in ("memory_mib", "memory_reservation_mib", "cpu_units"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "task_create.containers"
        ports = _get(doc, "port_mappings", (list, tuple), k, ())
        return cls(name=_get(doc, "name", str, k),
                   image_layers=_str_list(doc, "image_layers", k, _MISSING),
                   argv=_str_list(doc, "argv", k, _MISSING), env=_str_map(doc, "env", k),
                   workdir=_get(doc, "workdir", str, k, ""),
                   port_mappings=tuple(TaskPortMapping.from_wire(p) for p in ports),
                   mounts=tuple(TaskMount.from_wire(mt) for mt in
                                _get(doc, "mounts", (list, tuple), k, ())),
                   memory_mib=_get(doc, "memory_mib", int, k, 0),
                   memory_reservation_mib=_get(doc, "memory_reservation_mib", int, k, 0),
                   cpu_units=_get(doc, "cpu_units", int, k, 0))


@dataclass(frozen=True)
class TaskCreateRequest:
    """``task_create``: the task's network namespace, cgroup and layer holds; nothing runs
    yet. Missing layers: ``LayerMissing`` (pushed with ``image_blob``, as for create_env)."""

    task_id: str
    account: str
    cpu_units: int  # 1024 = one vCPU
    memory_mib: int
    containers: tuple[TaskContainer, ...]
    hostname: str = ""  # "": the task id
    # as a function's (core/vpc.py): "" the agent's policy, "egress", "none"; or "private":
    # an address the host reaches on the mapped ports, no egress (assignPublicIp DISABLED)
    network: str = ""
    net_allow: tuple[str, ...] = ()
    volumes: tuple[TaskVolume, ...] = ()  # managed volumes (ECS volumeConfigurations)

    def to_wire(self) -> dict[str, Any]:
        out = {"task_id": self.task_id, "account": self.account, "cpu_units": self.cpu_units,
               "memory_mib": self.memory_mib, "hostname": self.hostname,
               "containers": [c.to_wire() for c in self.containers],
               "network": self.network, "net_allow": list(self.net_allow)}
        if self.volumes:
            out["volumes"] = [v.to_wire() for v in self.volumes]
        return out

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "task_create"
        containers = _get(doc, "containers", (list, tuple), k)
        return cls(task_id=_get(doc, "task_id", str, k), account=_get(doc, "account", str, k),
                   cpu_units=_get(doc, "cpu_units", int, k),
                   memory_mib=_get(doc, "memory_mib", int, k),
                   containers=tuple(TaskContainer.from_wire(c) for c in containers),
                   hostname=_get(doc, "hostname", str, k, ""),
                   network=_get(doc, "network", str, k, ""),
                   net_allow=_str_list(doc, "net_allow", k),
                   volumes=tuple(TaskVolume.from_wire(v) for v in
                                 _get(doc, "volumes", (list, tuple), k, ())))


@dataclass(frozen=True)
class TaskCreateReply:
    task_id: str
    private_ipv4: str  # "": the task has no network (only its loopback)

    def to_wire(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "private_ipv4": self.private_ipv4}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "task_create reply"
        return cls(task_id=_get(doc, "task_id", str, k),
                   private_ipv4=_get(doc, "private_ipv4", str, k))


@dataclass(frozen=True)
class TaskContainerRequest:
    """``task_container_start``: start that container (again, after it exited)."""

    task_id: str
    container: str

    def to_wire(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "container": self.container}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "task_container"
        return cls(task_id=_get(doc, "task_id", str, k), container=_get(doc, "container", str, k))


@dataclass(frozen=True)
class TaskContainerStartReply:
    pid: int  # host pid of the container's environment (its guest)

    def to_wire(self) -> dict[str, Any]:
        return {"pid": self.pid}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        return cls(pid=_get(doc, "pid", int, "task_container_start reply"))


@dataclass(frozen=True)
class TaskContainerStopRequest:
    """``task_container_stop``: SIGTERM to the container's process, SIGKILL after
    ``grace_s``; answered once it exited (its state in the next ``task_poll``)."""

    task_id: str
    container: str
    grace_s: float = 30.0

    def to_wire(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "container": self.container, "grace_s": self.grace_s}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "task_container_stop"
        return cls(task_id=_get(doc, "task_id", str, k), container=_get(doc, "container", str, k),
                   grace_s=_get(doc, "grace_s", float, k, 30.0))


@dataclass(frozen=True)
class TaskContainerStopReply:
    exit_code: int | None = None  # None: it was not running

    def to_wire(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        return cls(exit_code=_get(doc, "exit_code", int, "task_container_stop reply", None,
                                  nullable=True))


@dataclass(frozen=True)
class TaskExecRequest:
    """``task_exec``: a health check's command run in the container (CMD-SHELL already
    turned into ``["/bin/sh", "-c", …]``), killed after ``timeout_s``."""

    task_id: str
    container: str
    command: tuple[str, ...]
    timeout_s: float = 5.0

    def to_wire(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "container": self.container,
                "command": list(self.command), "timeout_s": self.timeout_s}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "task_exec"
        return cls(task_id=_get(doc, "task_id", str, k), container=_get(doc, "container", str, k),
                   command=_str_list(doc, "command", k, _MISSING),
                   timeout_s=_get(doc, "timeout_s", float, k, 5.0))


@dataclass(frozen=True)
class TaskExecReply:
    exit_code: int | None  # None: timed out (killed) or could not be started
    output: bytes = b""  # stdout and stderr together, at most task_exec_output_bytes_max
    timed_out: bool = False
    error: str = ""  # why it could not start (not found, not executable)

    def to_wire(self) -> dict[str, Any]:
        return {"exit_code": self.exit_code, "output": self.output,
                "timed_out": self.timed_out, "error": self.error}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "task_exec reply"
        return cls(exit_code=_get(doc, "exit_code", int, k, nullable=True),
                   output=_get(doc, "output", bytes, k, b""),
                   timed_out=_get(doc, "timed_out", bool, k, False),
                   error=_get(doc, "error", str, k, ""))


@dataclass(frozen=True)
class TaskPollRequest:
    """``task_poll``: containers' states and their log lines after ``logs_after`` (per
    container, the cursor the previous answer gave; absent: from the oldest kept)."""

    task_id: str
    logs_after: dict[str, int] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "logs_after": dict(self.logs_after)}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "task_poll"
        return cls(task_id=_get(doc, "task_id", str, k), logs_after=_int_map(doc, "logs_after", k))


@dataclass(frozen=True)
class TaskContainerState:
    state: str  # "pending" (never started), "running", "exited"
    exit_code: int | None = None  # exited: its status (killed by a signal: 128 + signal)
    started_ms: int | None = None  # wall clock (ms since the epoch)
    exited_ms: int | None = None
    # Why it exited, when the platform knows better than the exit code, in ECS's words:
    # "OutOfMemoryError: Container killed due to memory usage", "CannotStartContainerError:
    # …" (its program could not be started); "": none.
    reason: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"state": self.state, "exit_code": self.exit_code,
                "started_ms": self.started_ms, "exited_ms": self.exited_ms,
                "reason": self.reason}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "task_poll reply.containers"
        return cls(state=_get(doc, "state", str, k),
                   exit_code=_get(doc, "exit_code", int, k, None, nullable=True),
                   started_ms=_get(doc, "started_ms", int, k, None, nullable=True),
                   exited_ms=_get(doc, "exited_ms", int, k, None, nullable=True),
                   reason=_get(doc, "reason", str, k, ""))


@dataclass(frozen=True)
class TaskLogLine:
    time_ms: int  # when the agent received it (wall clock)
    text: str  # without its newline
    stream: str = "stdout"  # or "stderr"

    def to_wire(self) -> dict[str, Any]:
        return {"time_ms": self.time_ms, "text": self.text, "stream": self.stream}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "task_poll reply.logs"
        return cls(time_ms=_get(doc, "time_ms", int, k), text=_get(doc, "text", str, k),
                   stream=_get(doc, "stream", str, k, "stdout"))


@dataclass(frozen=True)
class TaskPollReply:
    containers: dict[str, TaskContainerState]
    logs: dict[str, tuple[TaskLogLine, ...]] = field(default_factory=dict)  # since the cursor
    cursors: dict[str, int] = field(default_factory=dict)  # pass back as logs_after
    cpu_usage_ns: int = 0  # the task's cgroup, all its containers together
    memory_bytes: int = 0  # the task's cgroup's current charge
    logs_dropped: dict[str, int] = field(default_factory=dict)  # lines lost past the buffer
    oom_kills: int = 0  # processes the kernel killed for the task's memory limit, so far

    def to_wire(self) -> dict[str, Any]:
        return {"containers": {n: c.to_wire() for n, c in self.containers.items()},
                "logs": {n: [ln.to_wire() for ln in lines] for n, lines in self.logs.items()},
                "cursors": dict(self.cursors), "cpu_usage_ns": self.cpu_usage_ns,
                "memory_bytes": self.memory_bytes, "logs_dropped": dict(self.logs_dropped),
                "oom_kills": self.oom_kills}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "task_poll reply"
        containers = _get(doc, "containers", dict, k)
        logs = _get(doc, "logs", dict, k, {})
        return cls(containers={str(n): TaskContainerState.from_wire(c)
                               for n, c in containers.items()},
                   logs={str(n): tuple(TaskLogLine.from_wire(ln) for ln in lines)
                         for n, lines in logs.items()},
                   cursors=_int_map(doc, "cursors", k),
                   cpu_usage_ns=_get(doc, "cpu_usage_ns", int, k, 0),
                   memory_bytes=_get(doc, "memory_bytes", int, k, 0),
                   logs_dropped=_int_map(doc, "logs_dropped", k),
                   oom_kills=_get(doc, "oom_kills", int, k, 0))


@dataclass(frozen=True)
class TaskDestroyRequest:
    """``task_destroy``: everything killed, layers, cgroup and network released. Idempotent."""

    task_id: str

    def to_wire(self) -> dict[str, Any]:
        return {"task_id": self.task_id}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        return cls(task_id=_get(doc, "task_id", str, "task_destroy"))


@dataclass(frozen=True)
class TaskDestroyReply:
    destroyed: bool  # False: there was no such task (already destroyed)

    def to_wire(self) -> dict[str, Any]:
        return {"destroyed": self.destroyed}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        return cls(destroyed=_get(doc, "destroyed", bool, "task_destroy reply"))


#: The agent's task ops (agent/tasks.py), and the OpError names they answer with:
#: ``InvalidRequest`` (a malformed body, a bad limit), ``TaskExists``, ``TaskNotFound``,
#: ``ContainerNotFound``, ``ContainerRunning`` (started while it runs), ``ContainerNotRunning``
#: (exec in a container that is not running), ``LayerMissing`` (``digest``: push it with
#: ``image_blob``, then ask again), ``InvalidImage``, ``InvalidNetwork``, ``NetworkUnavailable``,
#: ``AgentFull`` (``agent_tasks_max``), ``AgentDraining``, ``TaskCreateFailed``,
#: ``ContainerStartFailed``.
TASK_OPS = ("task_create", "task_container_start", "task_container_stop", "task_exec",
            "task_poll", "task_destroy")


# -- agent <-> guest (frames tagged by "t") -------------------------------------------------
@dataclass(frozen=True)
class GuestInvoke:
    """agent -> guest: run one invocation."""

    request_id: str
    payload: bytes
    timeout_ms: int
    arn: str = ""
    legacy: bool = False  # spoken in (or to be answered in) the first dialect
    trace_id: str = ""  # the X-Ray trace header, Parent = the agent's span; "": none
    span: bool = False  # report the environment's span (GuestResult.span)
    #: send a streamed response's bytes as they come ({"t": "chunk"} frames) before the result
    stream: bool = False

    def to_wire(self, now_ms: int = 0) -> dict[str, Any]:
        """``now_ms`` (wall clock) only for the first dialect, which took a deadline."""
        if self.legacy:
            return {"t": "invoke", "id": self.request_id, "payload": self.payload,
                    "deadline_ms": now_ms + self.timeout_ms, "arn": self.arn}
        doc = {"t": "invoke", "request_id": self.request_id, "payload": self.payload,
               "timeout_ms": self.timeout_ms, "arn": self.arn}
        if self.trace_id:
            doc["trace_id"] = self.trace_id
        if self.span:
            doc["span"] = True
        if self.stream:
            doc["stream"] = True
        return doc

    @classmethod
    def from_wire(cls, doc: Any, now_ms: int = 0) -> Self:
        k = "guest invoke"
        if isinstance(doc, dict) and "request_id" not in doc and "id" in doc:
            return cls(request_id=_get(doc, "id", str, k), payload=_get(doc, "payload", bytes, k),
                       timeout_ms=_get(doc, "deadline_ms", int, k) - now_ms,
                       arn=_get(doc, "arn", str, k, ""), legacy=True)
        return cls(request_id=_get(doc, "request_id", str, k),
                   payload=_get(doc, "payload", bytes, k),
                   timeout_ms=_get(doc, "timeout_ms", int, k), arn=_get(doc, "arn", str, k, ""),
                   trace_id=_get(doc, "trace_id", str, k, ""), span=_get(doc, "span", bool, k, False),
                   stream=_get(doc, "stream", bool, k, False))


@dataclass(frozen=True)
class GuestResult:
    """guest -> agent: an invocation's response. ``phase_pending``: extensions still work on
    the invocation (its Invoke phase ends with a :class:`GuestPhaseDone`)."""

    request_id: str
    payload: bytes
    function_error: str | None
    logs: bytes = b""
    duration_ms: float = 0.0
    max_rss_kb: int = 0
    env_alive: bool = True
    phase_pending: bool = False
    legacy: bool = False
    span: Span | None = None  # the environment's span, when asked (GuestInvoke.span)

    def to_wire(self) -> dict[str, Any]:
        if self.legacy:
            return {"t": "result", "id": self.request_id, "ok": self.function_error is None,
                    "payload": self.payload, "error_type": self.function_error,
                    "logs": self.logs, "duration_ms": self.duration_ms,
                    "max_rss_kb": self.max_rss_kb, "fatal": not self.env_alive,
                    **({"phase": "pending"} if self.phase_pending else {})}
        doc: dict[str, Any] = {
               "t": "result", "request_id": self.request_id, "payload": self.payload,
               "function_error": self.function_error, "logs": self.logs,
               "duration_ms": self.duration_ms, "max_rss_kb": self.max_rss_kb,
               "env_alive": self.env_alive, "phase_pending": self.phase_pending}
        if self.span is not None:
            doc["span"] = self.span.to_wire()
        return doc

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "guest result"
        if isinstance(doc, dict) and "request_id" not in doc and "id" in doc:
            ok = _get(doc, "ok", bool, k)
            return cls(request_id=_get(doc, "id", str, k), payload=_get(doc, "payload", bytes, k),
                       function_error=None if ok else (
                           _get(doc, "error_type", str, k, None, nullable=True) or "Unhandled"),
                       logs=_get(doc, "logs", bytes, k, b""),
                       duration_ms=_get(doc, "duration_ms", float, k, 0.0),
                       max_rss_kb=_get(doc, "max_rss_kb", int, k, 0),
                       env_alive=not _get(doc, "fatal", bool, k, False),
                       phase_pending=doc.get("phase") == "pending", legacy=True)
        return cls(request_id=_get(doc, "request_id", str, k),
                   payload=_get(doc, "payload", bytes, k),
                   function_error=_get(doc, "function_error", str, k, nullable=True),
                   logs=_get(doc, "logs", bytes, k, b""),
                   duration_ms=_get(doc, "duration_ms", float, k, 0.0),
                   max_rss_kb=_get(doc, "max_rss_kb", int, k, 0),
                   env_alive=_get(doc, "env_alive", bool, k, True),
                   phase_pending=_get(doc, "phase_pending", bool, k, False),
                   span=_optional_span(doc, k))


def _optional_span(doc: Any, kind: str) -> Span | None:
    value = _get(doc, "span", dict, kind, None)
    return Span.from_wire(value) if value is not None else None


@dataclass(frozen=True)
class GuestLogs:
    """guest -> agent, while an invocation runs: its complete lines so far (the result then
    carries only the rest). Only guests of this dialect send it; the agent keeps them for
    the frontend's ``live_logs`` pull."""

    request_id: str
    logs: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"t": "logs", "request_id": self.request_id, "logs": self.logs}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "guest logs"
        return cls(request_id=_get(doc, "request_id", str, k), logs=_get(doc, "logs", bytes, k))


@dataclass(frozen=True)
class GuestPhaseDone:
    """guest -> agent: the end of an Invoke phase whose response already went back."""

    request_id: str
    logs: bytes = b""
    duration_ms: float = 0.0
    max_rss_kb: int = 0
    env_alive: bool = True
    legacy: bool = False

    def to_wire(self) -> dict[str, Any]:
        if self.legacy:
            return {"t": "done", "id": self.request_id, "logs": self.logs,
                    "duration_ms": self.duration_ms, "max_rss_kb": self.max_rss_kb,
                    "fatal": not self.env_alive}
        return {"t": "done", "request_id": self.request_id, "logs": self.logs,
                "duration_ms": self.duration_ms, "max_rss_kb": self.max_rss_kb,
                "env_alive": self.env_alive}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "guest done"
        legacy = isinstance(doc, dict) and "request_id" not in doc and "id" in doc
        return cls(request_id=_get(doc, "id" if legacy else "request_id", str, k),
                   logs=_get(doc, "logs", bytes, k, b""),
                   duration_ms=_get(doc, "duration_ms", float, k, 0.0),
                   max_rss_kb=_get(doc, "max_rss_kb", int, k, 0),
                   env_alive=(not _get(doc, "fatal", bool, k, False)) if legacy
                   else _get(doc, "env_alive", bool, k, True), legacy=legacy)


@dataclass(frozen=True)
class GuestReady:
    """guest -> agent, once: init is over (``init_error`` set: it failed)."""

    init_ms: float = 0.0
    init_error: dict[str, Any] | None = None
    logs: bytes = b""
    extensions: int = 0  # extensions registered (the SHUTDOWN phase is theirs)
    wire: int = GUEST_WIRE

    def to_wire(self) -> dict[str, Any]:
        return {"t": "ready", "init_ms": self.init_ms, "init_error": self.init_error,
                "logs": self.logs, "extensions": self.extensions, "wire": self.wire}

    @classmethod
    def from_wire(cls, doc: Any) -> Self:
        k = "guest ready"
        return cls(init_ms=_get(doc, "init_ms", float, k, 0.0),
                   init_error=_get(doc, "init_error", dict, k, None, nullable=True),
                   logs=_get(doc, "logs", bytes, k, b""),
                   extensions=_get(doc, "extensions", int, k, 0), wire=_get(doc, "wire", int, k, 1))
