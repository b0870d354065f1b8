"""SQS event source mappings, pure: the mapping's settings and states, the event records, and
the poller's decisions (how many batches run, what to delete, when to receive, backoff).

The poller core has the invoke core's shape: ``PollerCore.handle(stimulus, now_ms)`` returns
instructions and does no I/O; the shell (``frontend/mappings.py``) receives from the queue,
invokes the function and deletes, and feeds back what happened. The rules it carries out:

* A message is deleted only after the function succeeded with it: a batch that succeeded
  (all of it, or all but its reported ``batchItemFailures``), or a message no filter matches
  (Lambda deletes those, as AWS documents for SQS). Nothing else is ever deleted; a failed
  message reappears after the queue's visibility timeout and, past the queue's
  ``maxReceiveCount``, the queue's RedrivePolicy moves it to the dead-letter queue.
* At most ``concurrency`` batches are invoked at once; it starts at
  ``esm_concurrency_initial``, grows by one per ``esm_scale_up_interval_ms`` while full batches
  keep every slot busy, and never exceeds ``MaximumConcurrency`` nor the function's reserved
  concurrency. Messages are received only when a slot is free for them.
* A throttled batch (429) is invoked again after a capped exponential backoff with full jitter
  while its messages stay invisible long enough to run it (else it is left to reappear), and
  the poller receives nothing until then.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .limits import DEFAULT_LIMITS, Limits

# -- a mapping's states (the Lambda API's State), as a transition table ---------------------
#: (state, event) -> next state; None: the mapping is gone. Events: ``started`` (its poller
#: runs with the current settings), ``stopped`` (its poller stopped, no batch in flight),
#: ``enable``/``disable``/``update``/``delete`` (API calls).
TRANSITIONS: dict[tuple[str, str], str | None] = {
    ("Creating", "started"): "Enabled",
    ("Creating", "stopped"): "Disabled",
    ("Enabling", "started"): "Enabled",
    ("Updating", "started"): "Enabled",
    ("Updating", "stopped"): "Disabled",
    ("Disabling", "stopped"): "Disabled",
    ("Deleting", "stopped"): None,
    ("Enabled", "disable"): "Disabling",
    ("Enabled", "update"): "Updating",
    ("Enabled", "enable"): "Enabled",
    ("Disabled", "enable"): "Enabling",
    ("Disabled", "disable"): "Disabled",
    ("Disabled", "update"): "Disabled",
    **{(s, "delete"): "Deleting" for s in ("Creating", "Enabling", "Enabled", "Disabling",
                                          "Disabled", "Updating")},
}
#: states in which an update is refused (ResourceInUseException), as Lambda refuses it
BUSY_STATES = ("Creating", "Enabling", "Disabling", "Updating", "Deleting")
#: states whose poller should run
RUNNING_STATES = ("Creating", "Enabling", "Enabled", "Updating")


class TransitionError(ValueError):
    pass


def next_state(state: str, event: str) -> str | None:
    if (state, event) not in TRANSITIONS:
        raise TransitionError(f"{event} is not possible while the mapping is {state}")
    return TRANSITIONS[(state, event)]


def settled(state: str, poller_running: bool) -> str | None:
    """The state a transitional state settles in once the shell's poller is (or is not)
    running: Creating/Enabling/Updating with a poller → Enabled; Disabling/Deleting (and a
    Creating or Updating mapping created disabled) without → Disabled / gone."""
    event = "started" if poller_running else "stopped"
    return TRANSITIONS.get((state, event), state)


# -- the settings ---------------------------------------------------------------------------
class SettingsError(ValueError):
    """A setting outside the rules; the message is Lambda's (InvalidParameterValueException)."""


@dataclass(frozen=True)
class Settings:
    batch_size: int
    window_s: int
    report_failures: bool
    max_concurrency: int | None
    fifo: bool

    def __post_init__(self) -> None:
        assert self.batch_size >= 1 and self.window_s >= 0


def check_settings(*, batch_size: Any, window_s: Any, response_types: Any,
                   scaling: Any, fifo: bool, limits: Limits = DEFAULT_LIMITS) -> Settings:
    """BatchSize, MaximumBatchingWindowInSeconds, FunctionResponseTypes and ScalingConfig of an
    SQS mapping, checked as Lambda checks them (defaults: 10, 0, [], none)."""
    size = 10 if batch_size is None else batch_size
    window = 0 if window_s is None else window_s
    if isinstance(size, bool) or not isinstance(size, int):
        raise SettingsError("BatchSize must be an integer")
    if isinstance(window, bool) or not isinstance(window, int) or not (
            0 <= window <= limits.esm_batching_window_s_max):
        raise SettingsError(f"MaximumBatchingWindowInSeconds must be between 0 and "
                            f"{limits.esm_batching_window_s_max}")
    if fifo:
        if not 1 <= size <= limits.esm_batch_size_fifo_max:
            raise SettingsError(f"BatchSize must be between 1 and "
                                f"{limits.esm_batch_size_fifo_max} for a FIFO queue")
        if window:
            raise SettingsError("MaximumBatchingWindowInSeconds is not supported for FIFO "
                                "queues")
    else:
        if not 1 <= size <= limits.esm_batch_size_max:
            raise SettingsError(f"BatchSize must be between 1 and {limits.esm_batch_size_max}"
                                " for an SQS queue")
        if size > limits.esm_batch_size_no_window_max and window < 1:
            raise SettingsError(f"Maximum batch window in seconds must be greater than 0 if "
                                f"maximum batch size is greater than "
                                f"{limits.esm_batch_size_no_window_max}")
    types = [] if response_types is None else response_types
    if not isinstance(types, list) or any(t != "ReportBatchItemFailures" for t in types) or len(
            types) > 1:
        raise SettingsError("FunctionResponseTypes may only be [\"ReportBatchItemFailures\"]")
    concurrency = None
    if scaling is not None:
        if not isinstance(scaling, Mapping) or set(scaling) - {"MaximumConcurrency"}:
            raise SettingsError("ScalingConfig has only MaximumConcurrency")
        concurrency = scaling.get("MaximumConcurrency")
        if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(
                concurrency, int) or not limits.esm_concurrency_min <= concurrency
                <= limits.esm_concurrency_max):
            raise SettingsError(f"ScalingConfig.MaximumConcurrency must be between "
                                f"{limits.esm_concurrency_min} and {limits.esm_concurrency_max}")
    return Settings(size, window, bool(types), concurrency, fifo)


# -- the records ------------------------------------------------------------------------------
def sqs_record(*, message_id: str, receipt: str, body: str, md5_of_body: str,
               attributes: Mapping[str, str], message_attributes: Mapping[str, Any],
               md5_of_message_attributes: str | None, queue_arn: str,
               region: str) -> dict[str, Any]:
    """One record of Lambda's SQS event, as AWS builds it: ``attributes`` are the message's
    system attributes (strings), ``message_attributes`` its attributes as SQS stores them
    (``{name: {DataType, StringValue | BinaryValue}}``), rendered camelCase with the empty
    list members Lambda adds."""
    mattrs: dict[str, Any] = {}
    for name, a in message_attributes.items():
        out: dict[str, Any] = {}
        if a.get("StringValue") is not None:
            out["stringValue"] = a["StringValue"]
        if a.get("BinaryValue") is not None:
            out["binaryValue"] = a["BinaryValue"]
        out.update(stringListValues=[], binaryListValues=[], dataType=a["DataType"])
        mattrs[name] = out
    record: dict[str, Any] = {
        "messageId": message_id,
        "receiptHandle": receipt,
        "body": body,
        "attributes": dict(attributes),
        "messageAttributes": mattrs,
        "md5OfBody": md5_of_body,
    }
    if md5_of_message_attributes is not None:
        record["md5OfMessageAttributes"] = md5_of_message_attributes
    record.update(eventSource="aws:sqs", eventSourceARN=queue_arn, awsRegion=region)
    return record


def binary_value(b64: str) -> bytes:
    return base64.b64decode(b64)


def event_payload(records: Sequence[Mapping[str, Any]]) -> bytes:
    return json.dumps({"Records": list(records)}, separators=(",", ":")).encode()


def record_bytes(record: Mapping[str, Any]) -> int:
    """What one record adds to the event's JSON (plus its comma)."""
    return len(json.dumps(record, separators=(",", ":")).encode()) + 1


#: bytes of ``{"Records":[]}``
EVENT_OVERHEAD_BYTES = len(event_payload([]))


def failed_items(payload: bytes | None, ids: Sequence[str], *,
                 report: bool) -> set[str] | None:
    """The ids of a batch the function failed, from a successful invocation's response: with
    ReportBatchItemFailures, its ``batchItemFailures``; an empty set is a complete success,
    None a complete failure (Lambda's rules: an invalid response, an empty or null
    ``itemIdentifier``, a wrong key, or an id not in the batch fail the whole batch; a null or
    empty response, or a null or empty list, is a complete success)."""
    if not report:
        return set()
    if not payload:
        return set()
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    if doc is None:
        return set()
    if not isinstance(doc, dict):
        return None
    items = doc.get("batchItemFailures")
    if items is None:
        return set()
    if not isinstance(items, list):
        return None
    known = set(ids)
    out = set()
    for item in items:
        if not isinstance(item, dict) or set(item) != {"itemIdentifier"}:
            return None
        ident = item["itemIdentifier"]
        if not isinstance(ident, str) or not ident or ident not in known:
            return None
        out.add(ident)
    return out


# -- the poller -----------------------------------------------------------------------------
@dataclass(frozen=True)
class PollerParams:
    batch_size: int
    window_ms: int
    report_failures: bool
    fifo: bool
    #: MaximumConcurrency, the function's reserved concurrency and the region's cap, the least
    concurrency_max: int
    visibility_ms: int  # the queue's visibility timeout (a received message's invisibility)
    function_timeout_ms: int
    payload_bytes_max: int = DEFAULT_LIMITS.invoke_payload_bytes_max
    receive_max: int = 10  # messages one ReceiveMessage returns at most (SQS's)
    concurrency_initial: int = DEFAULT_LIMITS.esm_concurrency_initial
    scale_up_interval_ms: int = DEFAULT_LIMITS.esm_scale_up_interval_ms
    idle_poll_ms: int = DEFAULT_LIMITS.esm_idle_poll_ms
    backoff_ms_min: int = DEFAULT_LIMITS.esm_backoff_ms_min
    backoff_ms_max: int = DEFAULT_LIMITS.esm_backoff_ms_max

    def __post_init__(self) -> None:
        assert self.batch_size >= 1 and self.window_ms >= 0 and self.receive_max >= 1
        assert self.concurrency_max >= 0 and self.concurrency_initial >= 1
        assert 0 < self.backoff_ms_min <= self.backoff_ms_max


@dataclass(frozen=True)
class Received:
    """What one receive returned (records built by :func:`sqs_record`, and whether each
    matches the mapping's filters)."""
    records: tuple[Mapping[str, Any], ...]
    matched: tuple[bool, ...]


@dataclass(frozen=True)
class ReceiveFailed:
    reason: str


@dataclass(frozen=True)
class InvokeDone:
    batch_id: int
    outcome: str  # ok | function_error | throttled | error
    payload: bytes | None = None


@dataclass(frozen=True)
class Woken:
    """Messages were sent to the queue: an idle poller may receive at once."""


@dataclass(frozen=True)
class Tick:
    pass


@dataclass(frozen=True)
class Stop:
    """Stop receiving (disabled, deleted or updated); batches in flight finish."""


Stimulus = Received | ReceiveFailed | InvokeDone | Woken | Tick | Stop


@dataclass(frozen=True)
class Receive:
    max_messages: int


@dataclass(frozen=True)
class Invoke:
    batch_id: int
    records: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class Delete:
    receipts: tuple[str, ...]
    why: str  # succeeded | filtered


Instruction = Receive | Invoke | Delete


@dataclass
class _Batch:
    records: tuple[Mapping[str, Any], ...]
    received_ms: int  # when its oldest message was received
    attempts: int = 0
    due_ms: int | None = None  # throttled: invoked again at this time


@dataclass
class PollerCore:
    params: PollerParams
    rng: random.Random
    receiving: bool = False
    stopped: bool = False
    gathering: list[Mapping[str, Any]] = field(default_factory=list)
    gather_bytes: int = 0
    gather_started_ms: int = 0
    batches: dict[int, _Batch] = field(default_factory=dict)
    concurrency: int = 0
    next_receive_ms: int = 0
    last_scale_ms: int = -(10**12)
    backoff_ms: int = 0
    _next_id: int = 0
    counters: dict[str, int] = field(default_factory=lambda: {
        "received": 0, "batches": 0, "succeeded": 0, "failed": 0, "deleted": 0, "filtered": 0,
        "throttled": 0, "abandoned": 0, "errors": 0})

    def __post_init__(self) -> None:
        self.concurrency = min(self.params.concurrency_initial, self.params.concurrency_max)

    # -- what the shell asks -------------------------------------------------------------
    def running(self) -> int:
        """Batches invoked and not answered yet (throttled ones waiting are not)."""
        return sum(1 for b in self.batches.values() if b.due_ms is None)

    def idle(self) -> bool:
        """Stopped with nothing in flight: the shell may forget this poller."""
        return self.stopped and not self.batches and not self.receiving and not self.gathering

    def wake_at_ms(self, now_ms: int) -> int | None:
        """When :meth:`handle` should next get a :class:`Tick` (None: only on an event)."""
        # a throttled batch may run again only beside fewer than ``concurrency`` others, and
        # nothing new is received while every slot is held: else only an answer moves it on
        retry = self.running() < max(1, self.concurrency)
        times = [b.due_ms for b in self.batches.values() if b.due_ms is not None and retry]
        slots = len(self.batches) < self.concurrency
        if self.gathering and slots:
            times.append(self.gather_started_ms + self._window_ms())
        if not self.stopped and not self.receiving and slots:
            times.append(self.next_receive_ms)
        return max(now_ms, min(times)) if times else None

    def statistics(self) -> dict[str, Any]:
        return {**self.counters, "in_flight": self.running(), "concurrency": self.concurrency,
                "gathering": len(self.gathering)}

    # -- events ----------------------------------------------------------------------------
    def handle(self, stimulus: Stimulus, now_ms: int) -> list[Instruction]:
        out: list[Instruction] = []
        if isinstance(stimulus, Received):
            self._received(stimulus, now_ms, out)
        elif isinstance(stimulus, ReceiveFailed):
            self.receiving = False
            self.counters["errors"] += 1
            self.next_receive_ms = now_ms + self._backoff(now_ms)
        elif isinstance(stimulus, InvokeDone):
            self._done(stimulus, now_ms, out)
        elif isinstance(stimulus, Woken):
            if self.backoff_ms == 0:
                self.next_receive_ms = min(self.next_receive_ms, now_ms)
        elif isinstance(stimulus, Stop):
            self.stopped = True
        self._step(now_ms, out)
        return out

    def _window_ms(self) -> int:
        # a gathered message must still have time to run before it reappears
        room = self.params.visibility_ms - self.params.function_timeout_ms
        return max(0, min(self.params.window_ms, room))

    def _received(self, r: Received, now_ms: int, out: list[Instruction]) -> None:
        assert len(r.records) == len(r.matched)
        self.receiving = False
        self.counters["received"] += len(r.records)
        drop = tuple(str(rec["receiptHandle"]) for rec, ok in zip(r.records, r.matched,
                                                                   strict=True) if not ok)
        if drop:
            self.counters["filtered"] += len(drop)
            self.counters["deleted"] += len(drop)
            out.append(Delete(drop, "filtered"))
        # (a backoff set while this receive was under way still holds)
        if not r.records:
            self.next_receive_ms = max(self.next_receive_ms, now_ms + self.params.idle_poll_ms)
            floor = min(self.params.concurrency_initial, self.params.concurrency_max)
            self.concurrency = max(floor, self.concurrency - 1)
            return
        self.next_receive_ms = max(self.next_receive_ms, now_ms)  # more may be waiting
        for rec, ok in zip(r.records, r.matched, strict=True):
            if not ok:
                continue
            size = record_bytes(rec)
            if self.gathering and (EVENT_OVERHEAD_BYTES + self.gather_bytes + size
                                   > self.params.payload_bytes_max):
                self._dispatch(now_ms, out)  # full by size: this record starts the next one
            if not self.gathering:
                self.gather_started_ms = now_ms
            self.gathering.append(rec)
            self.gather_bytes += size

    def _done(self, d: InvokeDone, now_ms: int, out: list[Instruction]) -> None:
        batch = self.batches.get(d.batch_id)
        assert batch is not None and batch.due_ms is None, d
        ids = [str(r["messageId"]) for r in batch.records]
        if d.outcome == "throttled":
            self.counters["throttled"] += 1
            wait = self._backoff(now_ms)
            self.concurrency = max(1, min(self.concurrency, self.running() - 1))
            self.next_receive_ms = max(self.next_receive_ms, now_ms + wait)
            if now_ms + wait + self.params.function_timeout_ms < (
                    batch.received_ms + self.params.visibility_ms):
                batch.due_ms = now_ms + wait
            else:  # no time left to run it before it reappears: let it
                self.counters["abandoned"] += 1
                del self.batches[d.batch_id]
            return
        del self.batches[d.batch_id]
        failed: set[str] | None
        if d.outcome == "error":  # the invoke path failed: back off, more each time
            self.counters["errors"] += 1
            self.next_receive_ms = max(self.next_receive_ms, now_ms + self._backoff(now_ms))
        else:  # the function ran: the trouble is over
            self.backoff_ms = 0
        if d.outcome == "ok":
            failed = failed_items(d.payload, ids, report=self.params.report_failures)
        else:
            failed = None
        if failed is not None and failed and self.params.fifo:
            failed = _fifo_failed(batch.records, failed)
        keep = set(ids) if failed is None else failed
        done = tuple(str(r["receiptHandle"]) for r in batch.records
                     if str(r["messageId"]) not in keep)
        self.counters["failed"] += len(keep)
        self.counters["succeeded"] += len(done)
        if done:
            self.counters["deleted"] += len(done)
            out.append(Delete(done, "succeeded"))

    def _backoff(self, now_ms: int) -> int:
        """Capped exponential backoff with full jitter (the next wait, in ms): the cap doubles
        with each throttle, error or failed receive until an invocation runs the function."""
        p = self.params
        cap = min(p.backoff_ms_max, max(p.backoff_ms_min, self.backoff_ms * 2))
        self.backoff_ms = cap
        return p.backoff_ms_min + self.rng.randrange(0, cap - p.backoff_ms_min + 1)

    def _dispatch(self, now_ms: int, out: list[Instruction]) -> None:
        records = tuple(self.gathering)
        self.gathering = []
        self.gather_bytes = 0
        full = len(records) >= self.params.batch_size
        bid = self._next_id
        self._next_id += 1
        self.batches[bid] = _Batch(records, self.gather_started_ms)
        self.counters["batches"] += 1
        out.append(Invoke(bid, records))
        if full and self.running() >= self.concurrency and (
                self.concurrency < self.params.concurrency_max) and (
                now_ms - self.last_scale_ms >= self.params.scale_up_interval_ms):
            self.concurrency += 1
            self.last_scale_ms = now_ms

    def _step(self, now_ms: int, out: list[Instruction]) -> None:
        p = self.params
        # throttled batches whose backoff is over
        for bid, b in sorted(self.batches.items()):
            if b.due_ms is not None and b.due_ms <= now_ms and self.running() < max(
                    1, self.concurrency):
                if now_ms + p.function_timeout_ms >= b.received_ms + p.visibility_ms:
                    self.counters["abandoned"] += 1
                    del self.batches[bid]
                    continue
                b.due_ms = None
                b.attempts += 1
                out.append(Invoke(bid, b.records))
        slots = len(self.batches) < self.concurrency  # throttled ones waiting hold theirs
        if self.gathering and slots and (
                len(self.gathering) >= p.batch_size
                or now_ms >= self.gather_started_ms + self._window_ms()
                or (self.stopped and not self.receiving)):
            self._dispatch(now_ms, out)
            slots = len(self.batches) < self.concurrency
        if (not self.stopped and not self.receiving and slots and now_ms >= self.next_receive_ms
                and len(self.gathering) < p.batch_size):
            self.receiving = True
            out.append(Receive(min(p.receive_max, p.batch_size - len(self.gathering))))


def _fifo_failed(records: Sequence[Mapping[str, Any]], failed: set[str]) -> set[str]:
    """A FIFO batch's failures: a reported message and every later one of its group in the
    batch (they must not be deleted ahead of it, or the group's order breaks)."""
    out = set(failed)
    broken: set[str] = set()
    for r in records:
        group = str((r.get("attributes") or {}).get("MessageGroupId", ""))
        mid = str(r["messageId"])
        if group in broken:
            out.add(mid)
        elif mid in failed:
            broken.add(group)
    return out
