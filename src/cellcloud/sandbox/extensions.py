"""Lambda's Extensions API (``/2020-01-01/extension/...``) and Telemetry API
(``/2022-07-01/telemetry``) inside an environment, on the same address as the Runtime API.

:class:`Extensions` is the lifecycle state machine of the environment's extensions, as AWS
documents it (and as its runtime interface emulator implements it: the same error types):

- INIT: the external extensions (every executable directly in ``/opt/extensions``, started in
  alphabetical order) register; the runtime starts (internal extensions register from its
  process); each extension's first ``next`` ends its init. Registration closes when init ends.
- INVOKE: the event goes to every extension registered for INVOKE; the invocation is done
  when the runtime posted its outcome **and** each of those extensions called ``next`` again.
- SHUTDOWN: the event goes to every extension registered for SHUTDOWN, with a deadline; the
  environment ends when they all called ``next`` again (or exited), or at the deadline.

:class:`Telemetry` keeps the subscriptions and delivers events to each subscriber's HTTP
listener in JSON arrays, batched by its buffering settings, from a thread of its own with a
bounded queue: a listener that is slow or gone loses events (counted, and reported with
``platform.logsDropped``); it never holds up an invocation.

Both are called from the Runtime API's HTTP threads and the guest's threads; one condition
variable each guards their state.
"""

from __future__ import annotations

import collections
import http.client
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from ..core.limits import DEFAULT_LIMITS

EXTENSION_PREFIX = "/2020-01-01/extension"
TELEMETRY_PATHS = ("/2022-07-01/telemetry", "/2022-07-01/telemetry/")
EXTERNAL_EVENTS = ("INVOKE", "SHUTDOWN")
INTERNAL_EVENTS = ("INVOKE",)  # an internal extension lives in the runtime: no SHUTDOWN
TELEMETRY_TYPES = ("platform", "function", "extension")
TELEMETRY_SCHEMAS = ("2022-07-01", "2022-12-13", "2025-01-29")
TELEMETRY_HOST = "sandbox.localdomain"  # resolves to 127.0.0.1 in the environment's /etc/hosts

Reply = tuple[int, dict[str, str], dict[str, Any]]


def _err(status: int, error_type: str, message: str) -> Reply:
    return status, {}, {"errorMessage": message, "errorType": error_type}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class _Extension:
    id: str
    name: str
    events: frozenset[str]
    external: bool
    queue: collections.deque[dict[str, Any]] = field(default_factory=collections.deque)
    sent: int = 0  # events queued for it
    taken: int = 0  # events it received with next
    acked: int = 0  # events it finished: every one taken before its latest next
    ready: bool = False  # it called next once: its init is over
    gone: str | None = None  # why it can take no more events (exited, init/exit error)


class Extensions:
    def __init__(self, function_name: str, function_version: str, handler: str,
                 external: list[str], account_id: str = "") -> None:
        self._cond = threading.Condition()
        self._meta = {"functionName": function_name, "functionVersion": function_version,
                      "handler": handler}
        self._account_id = account_id
        self.external = list(external)  # names of the executables started from /opt/extensions
        self._by_id: dict[str, _Extension] = {}
        self._exited: dict[str, str] = {}  # external name -> why, for those that exited
        self.registration_open = True
        self.phase = "init"  # init -> invoke -> shutdown
        self.error: dict[str, Any] | None = None  # the first extension failure (crash, error)
        self.on_register: Callable[[str, list[str]], None] | None = None

    # -- the extensions' side (the API operations) ------------------------------------------
    def register(self, name: str, body: bytes, accept_feature: str = "") -> Reply:
        if not name:
            return _err(403, "Extension.InvalidExtensionName", "Empty extension name")
        try:
            doc = json.loads(body or b"{}")
            if not isinstance(doc, dict):
                raise ValueError("the body must be a JSON object")
            events = doc.get("events", [])
            if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
                raise ValueError("events must be a list of strings")
            if doc.get("configurationKeys"):
                raise ValueError("configurationKeys are deprecated; use environment variables "
                                 "instead")
        except ValueError as e:
            return _err(403, "InvalidRequestFormat", str(e))
        with self._cond:
            external = name in self.external
            allowed = EXTERNAL_EVENTS if external else INTERNAL_EVENTS
            for event in events:
                if event not in allowed:
                    kind = "external" if external else "internal"
                    return _err(403, "Extension.InvalidEventType",
                                f"{event}: {kind} extensions can register for {list(allowed)} only")
            if not self.registration_open:
                return _err(403, "Extension.RegistrationClosed",
                            "Extension registration closed already")
            if any(x.name == name for x in self._by_id.values()):
                return _err(403, "Extension.InvalidExtensionState",
                            f"Extension {name} is already registered")
            if len(self._by_id) >= DEFAULT_LIMITS.extensions_per_function_max:
                return _err(403, "Extension.TooManyExtensions",
                            f"Extension limit ({DEFAULT_LIMITS.extensions_per_function_max}) "
                            "reached")
            ext = _Extension(str(uuid.uuid4()), name, frozenset(events), external)
            self._by_id[ext.id] = ext
            self._cond.notify_all()
        if self.on_register is not None:
            self.on_register(name, sorted(events))
        meta = dict(self._meta)
        if "accountId" in accept_feature.split(",") and self._account_id:
            meta["accountId"] = self._account_id  # Lambda-Extension-Accept-Feature: accountId
        return 200, {"Lambda-Extension-Identifier": ext.id}, meta

    def _find(self, ext_id: str | None) -> _Extension | Reply:
        if not ext_id:
            return _err(403, "Extension.MissingExtensionIdentifier",
                        "Missing Lambda-Extension-Identifier header")
        try:
            uuid.UUID(ext_id)
        except ValueError:
            return _err(403, "Extension.InvalidExtensionIdentifier",
                        "Invalid Lambda-Extension-Identifier")
        ext = self._by_id.get(ext_id)
        if ext is None:
            return _err(403, "Extension.UnknownExtensionIdentifier", f"Unknown extension {ext_id}")
        return ext

    def next(self, ext_id: str | None) -> Reply:
        """Blocks until the extension's next event (its previous one is finished)."""
        with self._cond:
            ext = self._find(ext_id)
            if not isinstance(ext, _Extension):
                return ext
            if ext.gone is not None:
                return _err(403, "Extension.InvalidExtensionState",
                            f"Extension {ext.name} cannot take events: {ext.gone}")
            ext.acked = ext.taken
            ext.ready = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: bool(ext.queue))
            event = ext.queue.popleft()
            ext.taken += 1
            return 200, {"Lambda-Extension-Event-Identifier": str(uuid.uuid4())}, event

    def init_error(self, ext_id: str | None, error_type: str | None, body: bytes) -> Reply:
        return self._fail(ext_id, error_type, body, "init")

    def exit_error(self, ext_id: str | None, error_type: str | None, body: bytes) -> Reply:
        return self._fail(ext_id, error_type, body, "exit")

    def _fail(self, ext_id: str | None, error_type: str | None, body: bytes, what: str) -> Reply:
        with self._cond:
            ext = self._find(ext_id)
            if not isinstance(ext, _Extension):
                return ext
            if not error_type:
                return _err(403, "Extension.MissingHeader",
                            "Lambda-Extension-Function-Error-Type not found")
            if what == "init" and (ext.ready or self.phase != "init"):
                return _err(403, "Extension.InvalidExtensionState",
                            f"Extension {ext.name} is past its init")
            message = ""
            try:
                doc = json.loads(body) if body else {}
                if isinstance(doc, dict):
                    message = str(doc.get("errorMessage", ""))
            except ValueError:
                message = body.decode(errors="replace")
            ext.gone = f"{what} error {error_type}"
            if self.error is None:
                self.error = {"errorType": error_type,
                              "errorMessage": message or f"extension {ext.name} reported "
                                                         f"{error_type}"}
            self._cond.notify_all()
            return 202, {}, {"status": "OK"}

    # -- the guest's side ---------------------------------------------------------------------
    def extension_exited(self, name: str, why: str) -> None:
        """An external extension's process ended."""
        with self._cond:
            self._exited[name] = why
            for ext in self._by_id.values():
                if ext.name == name and ext.gone is None:
                    ext.gone = why
            if self.phase != "shutdown" and self.error is None:
                self.error = {"errorType": "Extension.Crash", "errorMessage": why}
            self._cond.notify_all()

    @property
    def registered(self) -> int:
        return len(self._by_id)

    @property
    def external_registered(self) -> int:
        return sum(1 for x in self._by_id.values() if x.external)

    def wait_registered(self, timeout_s: float) -> bool:
        """Every external extension started registered (or exited, or failed)."""
        def done() -> bool:
            names = {x.name for x in self._by_id.values()}
            return self.error is not None or all(
                n in names or n in self._exited for n in self.external)

        with self._cond:
            return self._cond.wait_for(done, timeout_s)

    def name_of(self, ext_id: str | None) -> str | None:
        with self._cond:
            ext = self._by_id.get(ext_id or "")
            return ext.name if ext is not None else None

    def wait_init_done(self, timeout_s: float) -> bool:
        """Every registered extension called next once (its init is over), or one failed."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self.error is not None
                or all(x.ready or x.gone for x in self._by_id.values()),
                timeout_s)

    def end_init(self) -> None:
        """The init phase is over (done or given up on): registration closes."""
        with self._cond:
            self.registration_open = False
            self.phase = "invoke"

    def begin_invoke(self, event: dict[str, Any]) -> list[str]:
        """Deliver an INVOKE event; returns the ids of the extensions that got it."""
        with self._cond:
            got = []
            for ext in self._by_id.values():
                if "INVOKE" in ext.events and ext.gone is None:
                    ext.queue.append(event)
                    ext.sent += 1
                    got.append(ext.id)
            self._cond.notify_all()
            return got

    def wait_done(self, ids: list[str], timeout_s: float | None = None) -> bool:
        """Each of these extensions finished what it was sent (called next again) or is gone."""
        with self._cond:
            return self._cond.wait_for(
                lambda: all(self._by_id[i].acked >= self._by_id[i].sent
                            or self._by_id[i].gone is not None for i in ids),
                timeout_s)

    def shutdown(self, reason: str, deadline_ms: int, timeout_s: float) -> bool:
        """The SHUTDOWN phase: the event to every extension registered for it, then wait for
        them (bounded by ``timeout_s``). True when every one finished in time."""
        with self._cond:
            self.phase = "shutdown"
            self.registration_open = False
            event = {"eventType": "SHUTDOWN", "shutdownReason": reason,
                     "deadlineMs": deadline_ms}
            ids = []
            for ext in self._by_id.values():
                if "SHUTDOWN" in ext.events and ext.gone is None:
                    ext.queue.append(event)
                    ext.sent += 1
                    ids.append(ext.id)
            self._cond.notify_all()
        return self.wait_done(ids, timeout_s)


# -- the Telemetry API ---------------------------------------------------------------------------
@dataclass
class _Subscriber:
    ext_name: str
    types: frozenset[str]
    max_items: int
    max_bytes: int
    timeout_ms: int
    port: int
    path: str
    queue: collections.deque[tuple[dict[str, Any], int]] = field(
        default_factory=collections.deque)
    queued_bytes: int = 0
    first_queued: float = 0.0  # monotonic time of the oldest event waiting
    dropped_records: int = 0
    dropped_bytes: int = 0
    delivered: int = 0


def _int_in(doc: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    v = doc.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"buffering.{key} must be an integer from {lo} to {hi}")
    return v


class Telemetry:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._subs: list[_Subscriber] = []
        self._backlog: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=DEFAULT_LIMITS.telemetry_backlog_items_max)
        self._keep_backlog = True  # until the init phase ends
        self._thread: threading.Thread | None = None
        self._flush_requested = False

    @property
    def active(self) -> bool:
        return bool(self._subs)

    def wants(self, kind: str) -> bool:
        return self._keep_backlog or any(kind in s.types for s in self._subs)

    def subscribe(self, ext_name: str | None, body: bytes) -> Reply:
        if ext_name is None:
            return _err(403, "Extension.UnknownExtensionIdentifier",
                        "Unknown or missing Lambda-Extension-Identifier")
        try:
            doc = json.loads(body or b"{}")
            if not isinstance(doc, dict):
                raise ValueError("the body must be a JSON object")
            if doc.get("schemaVersion") not in TELEMETRY_SCHEMAS:
                raise ValueError(f"schemaVersion must be one of {list(TELEMETRY_SCHEMAS)}")
            types = doc.get("types")
            if (not isinstance(types, list) or not types
                    or not all(t in TELEMETRY_TYPES for t in types)):
                raise ValueError(f"types must be a non-empty list of {list(TELEMETRY_TYPES)}")
            buf = doc.get("buffering") or {}
            if not isinstance(buf, dict):
                raise ValueError("buffering must be an object")
            lim = DEFAULT_LIMITS
            max_items = _int_in(buf, "maxItems", lim.telemetry_max_items_default,
                                lim.telemetry_max_items_min, lim.telemetry_max_items_max)
            max_bytes = _int_in(buf, "maxBytes", lim.telemetry_max_bytes_default,
                                lim.telemetry_max_bytes_min, lim.telemetry_max_bytes_max)
            timeout_ms = _int_in(buf, "timeoutMs", lim.telemetry_timeout_ms_default,
                                 lim.telemetry_timeout_ms_min, lim.telemetry_timeout_ms_max)
            dest = doc.get("destination")
            if not isinstance(dest, dict):
                raise ValueError("destination is required")
            if dest.get("protocol") != "HTTP":
                raise ValueError("destination.protocol: only HTTP is supported here "
                                 "(TCP is not)")
            uri = urlsplit(str(dest.get("URI", "")))
            if uri.scheme != "http" or uri.hostname != TELEMETRY_HOST or uri.port is None:
                raise ValueError(f"destination.URI must be http://{TELEMETRY_HOST}:PORT/...")
        except ValueError as e:
            return _err(400, "ValidationError", str(e))
        sub = _Subscriber(ext_name, frozenset(types), max_items, max_bytes, timeout_ms,
                          uri.port, uri.path or "/")
        with self._cond:
            if any(s.ext_name == ext_name for s in self._subs):
                self._subs = [s for s in self._subs if s.ext_name != ext_name]
            if len(self._subs) >= DEFAULT_LIMITS.telemetry_subscribers_max:
                return _err(400, "ValidationError", "too many telemetry subscribers")
            self._subs.append(sub)
            for ev in self._backlog:  # the init phase's events so far
                if _kind(ev["type"]) in sub.types:
                    self._enqueue(sub, ev)
            if self._thread is None:
                self._thread = threading.Thread(target=self._deliver_loop, name="telemetry",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()
        self.emit("platform.telemetrySubscription",
                  {"name": ext_name, "state": "Subscribed", "types": sorted(types)})
        return 200, {}, {"status": "OK"}

    def end_init(self) -> None:
        with self._cond:
            self._keep_backlog = False
            self._backlog.clear()

    def emit(self, type_: str, record: Any) -> None:
        kind = _kind(type_)
        if not self.wants(kind):
            return
        with self._cond:
            if not self._keep_backlog and all(
                    len(s.queue) >= s.max_items for s in self._subs if kind in s.types):
                for s in self._subs:  # every buffer is full: count the drop, build nothing
                    if kind in s.types:
                        s.dropped_records += 1
                return
        ev = {"time": now_iso(), "type": type_, "record": record}
        with self._cond:
            if self._keep_backlog:
                self._backlog.append(ev)
            for sub in self._subs:
                if kind in sub.types:
                    self._enqueue(sub, ev)
            self._cond.notify_all()

    def _enqueue(self, sub: _Subscriber, ev: dict[str, Any]) -> None:
        rec = ev["record"]
        # A log line's size without serialising it (its JSON escapes aside); events are rare.
        size = len(rec) + 64 if isinstance(rec, str) else len(json.dumps(ev))
        # The queue holds at most one full batch; beyond it events are dropped and counted.
        if len(sub.queue) >= sub.max_items or sub.queued_bytes + size > sub.max_bytes:
            sub.dropped_records += 1
            sub.dropped_bytes += size
            return
        if not sub.queue:
            sub.first_queued = time.monotonic()
        sub.queue.append((ev, size))
        sub.queued_bytes += size

    def flush(self, timeout_s: float) -> None:
        """Send whatever is queued now (the SHUTDOWN phase), waiting at most ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._flush_requested = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not any(s.queue for s in self._subs),
                                max(0.0, deadline - time.monotonic()))

    def _due(self, now: float) -> _Subscriber | None:
        for sub in self._subs:
            if sub.dropped_records and len(sub.queue) < sub.max_items:
                ev = {"time": now_iso(), "type": "platform.logsDropped",
                      "record": {"reason": "Some logs were dropped because the subscriber was "
                                           "slow or its buffer was full",
                                 "droppedRecords": sub.dropped_records,
                                 "droppedBytes": sub.dropped_bytes}}
                sub.dropped_records = sub.dropped_bytes = 0
                size = len(json.dumps(ev))
                if not sub.queue:
                    sub.first_queued = now
                sub.queue.append((ev, size))
                sub.queued_bytes += size
            if sub.queue and (self._flush_requested or len(sub.queue) >= sub.max_items
                              or sub.queued_bytes >= sub.max_bytes
                              or now - sub.first_queued >= sub.timeout_ms / 1000):
                return sub
        return None

    def _deliver_loop(self) -> None:
        while True:
            with self._cond:
                while (sub := self._due(time.monotonic())) is None:
                    self._flush_requested = False
                    waits = [s.first_queued + s.timeout_ms / 1000 - time.monotonic()
                             for s in self._subs if s.queue]
                    self._cond.wait(max(0.005, min(waits)) if waits else None)
                batch = [ev for ev, _ in sub.queue]
                sub.queue.clear()
                sub.queued_bytes = 0
            ok = _post(sub.port, sub.path, json.dumps(batch).encode())
            with self._cond:
                if ok:
                    sub.delivered += len(batch)
                else:  # the listener is gone or too slow: the batch is lost, and counted
                    sub.dropped_records += len(batch)
                self._cond.notify_all()


def _kind(type_: str) -> str:
    return type_.split(".", 1)[0]


def _post(port: int, path: str, body: bytes) -> bool:
    conn = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=DEFAULT_LIMITS.telemetry_post_timeout_ms / 1000)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status < 300
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
