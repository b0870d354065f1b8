"""SQS event source mappings of one cell: the Lambda API's five operations, their SQLite
table (``<state>/mappings.db``), and the pollers — one asyncio task per enabled mapping in the
frontend process, a thin shell over ``core/esm.py``'s :class:`PollerCore`: it receives from
the cell's queue store (the queue's own receive: visibility, receive counts, FIFO groups, the
RedrivePolicy's move to the dead-letter queue), invokes the function through the cell's
normal invoke path, and deletes what the core says succeeded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import sqlite3
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from ..core import errors, esm, event_filter, fifo
from ..core.errors import LambdaError
from ..core.limits import DEFAULT_LIMITS, Limits
from ..core.validation import parse_function_ref
from ..queues.store import Message, QueueError, md5_of_attributes
from .store import function_arn

if TYPE_CHECKING:
    from ..queues.api import QueueApi
    from .cell import Cell

log = logging.getLogger("cellcloud.mappings")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mappings (
    uuid TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    function TEXT NOT NULL,
    qualifier TEXT,
    queue TEXT NOT NULL,
    doc TEXT NOT NULL,
    state TEXT NOT NULL,
    version INTEGER NOT NULL,
    modified_s REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS mappings_by_account ON mappings(account, uuid);
"""
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
#: the settings kept per mapping (the API's members)
_SETTINGS = ("BatchSize", "MaximumBatchingWindowInSeconds", "FunctionResponseTypes",
             "ScalingConfig", "FilterCriteria")


def _in_use(uuid_: str, state: str) -> LambdaError:
    return LambdaError(400, "ResourceInUseException",
                       f"Cannot update the event source mapping {uuid_} because it is in use "
                       f"(State: {state}); retry once it is Enabled or Disabled.")


def _not_found(uuid_: str) -> LambdaError:
    return errors.not_found(f"The resource you requested does not exist. (Service: Lambda; "
                            f"event source mapping {uuid_})")


class Mappings:
    def __init__(self, cell: Cell, queues: QueueApi, state_dir: str, *,
                 limits: Limits = DEFAULT_LIMITS, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.cell = cell
        self.queues = queues
        self.limits = limits
        self.clock = clock
        self.rng = rng or random.Random()
        self.db = sqlite3.connect(f"{state_dir}/mappings.db", isolation_level=None,
                                  check_same_thread=False, timeout=10.0)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        #: uuid -> the running poller
        self.pollers: dict[str, _Poller] = {}
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        queues.sent_listeners.append(self._sent)

    # -- the API ---------------------------------------------------------------------------
    def _row(self, account: str, uuid_: str) -> dict[str, Any]:
        if not isinstance(uuid_, str) or not _UUID.match(uuid_):
            raise _not_found(str(uuid_))
        r = self.db.execute("SELECT uuid, account, function, qualifier, queue, doc, state, "
                            "version, modified_s FROM mappings WHERE uuid=? AND account=?",
                            (uuid_, account)).fetchone()
        if r is None:
            raise _not_found(uuid_)
        return {"uuid": r[0], "account": r[1], "function": r[2], "qualifier": r[3],
                "queue": r[4], "doc": json.loads(r[5]), "state": r[6], "version": r[7],
                "modified_s": r[8]}

    def _function(self, account: str, ref: Any) -> tuple[str, str | None, int]:
        """(name, qualifier, timeout in s) of the function a mapping names; it must exist."""
        if not isinstance(ref, str) or not ref:
            raise errors.invalid("FunctionName is required")
        parsed = parse_function_ref(unquote(ref))
        if parsed.account is not None and parsed.account != account:
            raise errors.not_found(f"Function not found: {ref}")
        rec, _ = self.cell.resolve(account, parsed.name, parsed.qualifier)
        return parsed.name, parsed.qualifier, int(rec.timeout_s)

    def _queue(self, account: str, arn: Any) -> str:
        """The queue an EventSourceArn names: one of the caller's queues in this region."""
        if not isinstance(arn, str) or not arn:
            raise errors.invalid("EventSourceArn is required: cellcloud maps SQS queues "
                                 "(arn:aws:sqs:<region>:<account>:<queue>)")
        parts = arn.split(":")
        if len(parts) != 6 or parts[0] != "arn" or parts[2] != "sqs":
            raise errors.invalid(f"Unsupported event source type: {arn} (this region maps "
                                 f"only its SQS queues)")
        region, owner, name = parts[3], parts[4], parts[5]
        if region != self.cell.region or owner != account or not self.queues.store.exists(
                account, name):
            # another tenant's queue is answered as a missing one (as AWS without access)
            raise errors.invalid(f"Error occurred while ReceiveMessage. SQS Error Code: "
                                 f"AWS.SimpleQueueService.NonExistentQueue. SQS Error Message: "
                                 f"The specified queue {arn} does not exist or you do not have "
                                 f"access to it.")
        return name

    def _check(self, account: str, queue: str, timeout_s: int,
               settings: dict[str, Any]) -> esm.Settings:
        try:
            out = esm.check_settings(
                batch_size=settings.get("BatchSize"),
                window_s=settings.get("MaximumBatchingWindowInSeconds"),
                response_types=settings.get("FunctionResponseTypes"),
                scaling=settings.get("ScalingConfig"), fifo=fifo.is_fifo(queue),
                limits=self.limits)
            event_filter.parse_criteria(settings.get("FilterCriteria"),
                                        self.limits.esm_filters_max)
        except event_filter.FilterError as e:
            raise errors.invalid(f"Invalid filter pattern definition: {e}") from None
        except esm.SettingsError as e:
            raise errors.invalid(str(e)) from None
        _, attrs = self.queues.store.attributes(account, queue)
        visibility = int(attrs.get("VisibilityTimeout", 30))
        if visibility < timeout_s:
            raise errors.invalid(f"Queue visibility timeout: {visibility} seconds is less than "
                                 f"Function timeout: {timeout_s} seconds")
        return out

    def _doc(self, row: dict[str, Any]) -> dict[str, Any]:
        d = row["doc"]
        out: dict[str, Any] = {
            "UUID": row["uuid"],
            "BatchSize": d.get("BatchSize", 10),
            "MaximumBatchingWindowInSeconds": d.get("MaximumBatchingWindowInSeconds", 0),
            "EventSourceArn": f"arn:aws:sqs:{self.cell.region}:{row['account']}:{row['queue']}",
            "FunctionArn": function_arn(self.cell.region, row["account"], row["function"],
                                        row["qualifier"]),
            "LastModified": row["modified_s"],
            "State": row["state"],
            "StateTransitionReason": "USER_INITIATED",
            "FunctionResponseTypes": list(d.get("FunctionResponseTypes") or []),
            "EventSourceMappingArn": (f"arn:aws:lambda:{self.cell.region}:{row['account']}:"
                                      f"event-source-mapping:{row['uuid']}"),
        }
        if d.get("FilterCriteria") and d["FilterCriteria"].get("Filters"):
            out["FilterCriteria"] = d["FilterCriteria"]
        if d.get("ScalingConfig"):
            out["ScalingConfig"] = d["ScalingConfig"]
        return out

    def create(self, account: str, doc: dict[str, Any]) -> dict[str, Any]:
        name, qualifier, timeout_s = self._function(account, doc.get("FunctionName"))
        queue = self._queue(account, doc.get("EventSourceArn"))
        settings = {k: doc[k] for k in _SETTINGS if doc.get(k) is not None}
        self._check(account, queue, timeout_s, settings)
        enabled = doc.get("Enabled", True)
        if not isinstance(enabled, bool):
            raise errors.invalid("Enabled must be true or false")
        for (u,) in self.db.execute("SELECT uuid FROM mappings WHERE account=? AND queue=? AND "
                                    "function=? AND qualifier IS ?",
                                    (account, queue, name, qualifier)):
            raise errors.conflict(f"An event source mapping with SQS arn (\" {doc['EventSourceArn']}"
                                  f" \") and function (\" {name} \") already exists. Please "
                                  f"update or delete the existing mapping with UUID {u}")
        (count,) = self.db.execute("SELECT COUNT(*) FROM mappings WHERE account=?",
                                   (account,)).fetchone()
        if count >= self.limits.esm_mappings_per_tenant_max:
            raise errors.invalid(f"An account may have at most "
                                 f"{self.limits.esm_mappings_per_tenant_max} event source "
                                 f"mappings")
        u = str(uuid.uuid4())
        settings["Enabled"] = enabled
        self.db.execute("INSERT INTO mappings VALUES (?,?,?,?,?,?,?,?,?)",
                        (u, account, name, qualifier, queue, json.dumps(settings), "Creating",
                         1, round(self.clock(), 3)))
        self._poke()
        return self._doc(self._row(account, u))

    def get(self, account: str, uuid_: str) -> dict[str, Any]:
        return self._doc(self._row(account, uuid_))

    def update(self, account: str, uuid_: str, doc: dict[str, Any]) -> dict[str, Any]:
        row = self._row(account, uuid_)
        if row["state"] in esm.BUSY_STATES:
            raise _in_use(uuid_, row["state"])
        name, qualifier = row["function"], row["qualifier"]
        if doc.get("FunctionName") is not None:
            name, qualifier, _ = self._function(account, doc["FunctionName"])
        _, _, timeout_s = self._function(account, function_arn(
            self.cell.region, account, name, qualifier))
        old = row["doc"]
        settings = {k: old[k] for k in _SETTINGS if old.get(k) is not None}
        for k in _SETTINGS:
            if k in doc and doc[k] is not None:
                settings[k] = doc[k]
        self._check(account, row["queue"], timeout_s, settings)
        enabled = doc.get("Enabled", old.get("Enabled", True))
        if not isinstance(enabled, bool):
            raise errors.invalid("Enabled must be true or false")
        settings["Enabled"] = enabled
        changed = (settings != old or (name, qualifier) != (row["function"], row["qualifier"]))
        state = row["state"]
        if enabled != old.get("Enabled", True):
            state = esm.next_state(state, "enable" if enabled else "disable") or state
        elif changed:
            state = esm.next_state(state, "update") or state
        self.db.execute("UPDATE mappings SET function=?, qualifier=?, doc=?, state=?, "
                        "version=version+1, modified_s=? WHERE uuid=?",
                        (name, qualifier, json.dumps(settings), state,
                         round(self.clock(), 3), uuid_))
        self._poke()
        return self._doc(self._row(account, uuid_))

    def delete(self, account: str, uuid_: str) -> dict[str, Any]:
        row = self._row(account, uuid_)
        if row["state"] == "Deleting":
            raise _in_use(uuid_, row["state"])
        self.db.execute("UPDATE mappings SET state='Deleting', modified_s=? WHERE uuid=?",
                        (round(self.clock(), 3), uuid_))
        self._poke()
        return self._doc(self._row(account, uuid_))

    def list(self, account: str, *, queue_arn: str | None, function: str | None,
             marker: str | None, max_items: int) -> dict[str, Any]:
        rows = [self._row(account, u) for (u,) in self.db.execute(
            "SELECT uuid FROM mappings WHERE account=? AND uuid>? ORDER BY uuid",
            (account, marker or ""))]
        docs = []
        fn = None
        if function is not None:
            parsed = parse_function_ref(unquote(function))
            fn = (parsed.name, parsed.qualifier)
        for r in rows:
            d = self._doc(r)
            if queue_arn is not None and d["EventSourceArn"] != queue_arn:
                continue
            if fn is not None and (r["function"], r["qualifier"]) != fn:
                continue
            docs.append(d)
        out: dict[str, Any] = {"EventSourceMappings": docs[:max_items]}
        if len(docs) > max_items:
            out["NextMarker"] = docs[max_items - 1]["UUID"]
        return out

    # -- the pollers -----------------------------------------------------------------------
    def start(self) -> None:
        self._changed = asyncio.Event()
        self._task = asyncio.ensure_future(self._reconcile_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for p in list(self.pollers.values()):
            p.task.cancel()

    def _poke(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _sent(self, account: str, queue: str) -> None:
        for p in self.pollers.values():
            if p.account == account and p.queue == queue:
                p.wake()

    async def _reconcile_forever(self) -> None:
        assert self._changed is not None
        while True:
            try:
                self.reconcile()
            except Exception:  # a bug: keep the pollers going, say so
                log.exception("mappings: reconcile")
            try:
                await asyncio.wait_for(self._changed.wait(), 1.0)
            except TimeoutError:
                pass
            self._changed.clear()

    def reconcile(self) -> None:
        """Start and stop pollers to match the table, and settle transitional states."""
        rows = self.db.execute("SELECT uuid, account, state, version, doc FROM mappings")
        for u, account, state, version, doc in rows.fetchall():
            enabled = json.loads(doc).get("Enabled", True)
            want = state in esm.RUNNING_STATES and enabled
            p = self.pollers.get(u)
            if p is not None and (not want or p.version != version):
                p.stop()
            elif p is not None and not p.stopping and self._params_now(account, u) not in (
                    None, p.core.params):
                # the function's reserved concurrency or timeout, or the queue's visibility
                # timeout, changed: the poller restarts with them (batches in flight finish)
                p.stop()
            if p is not None and p.task.done():
                del self.pollers[u]
                p = None
            if want and p is None:
                try:
                    self.pollers[u] = self._start_poller(self._row(account, u))
                except (LambdaError, QueueError) as e:  # the function or queue is gone:
                    # retried at the next pass
                    log.info("mapping %s cannot start: %s", u, e)
                    continue
                p = self.pollers[u]
            running = p is not None and not p.stopping
            if state in esm.RUNNING_STATES or state in ("Disabling", "Deleting"):
                if not running and p is not None:
                    continue  # still stopping: batches in flight finish first
                new = esm.settled(state, running and p is not None and p.version == version)
                if new is None:
                    self.db.execute("DELETE FROM mappings WHERE uuid=?", (u,))
                elif new != state:
                    self.db.execute("UPDATE mappings SET state=? WHERE uuid=?", (new, u))

    def _params_now(self, account: str, u: str) -> esm.PollerParams | None:
        try:
            return self._params(self._row(account, u))
        except (LambdaError, QueueError):
            return None  # the function or the queue is gone: the poller finds out itself

    def _params(self, row: dict[str, Any]) -> esm.PollerParams:
        d = row["doc"]
        settings = esm.check_settings(
            batch_size=d.get("BatchSize"), window_s=d.get("MaximumBatchingWindowInSeconds"),
            response_types=d.get("FunctionResponseTypes"), scaling=d.get("ScalingConfig"),
            fifo=fifo.is_fifo(row["queue"]), limits=self.limits)
        rec, _ = self.cell.resolve(row["account"], row["function"], row["qualifier"])
        _, attrs = self.queues.store.attributes(row["account"], row["queue"])
        cap = self.limits.esm_concurrency_max
        for bound in (settings.max_concurrency, self.cell.reserved(row["account"],
                                                                   row["function"])):
            if bound is not None:
                cap = min(cap, bound)
        params = esm.PollerParams(
            batch_size=settings.batch_size, window_ms=settings.window_s * 1000,
            report_failures=settings.report_failures, fifo=settings.fifo,
            concurrency_max=cap, visibility_ms=int(attrs.get("VisibilityTimeout", 30)) * 1000,
            function_timeout_ms=int(rec.timeout_s) * 1000,
            payload_bytes_max=self.limits.invoke_payload_bytes_max,
            concurrency_initial=self.limits.esm_concurrency_initial,
            scale_up_interval_ms=self.limits.esm_scale_up_interval_ms,
            idle_poll_ms=self.limits.esm_idle_poll_ms,
            backoff_ms_min=self.limits.esm_backoff_ms_min,
            backoff_ms_max=self.limits.esm_backoff_ms_max)
        return params

    def _start_poller(self, row: dict[str, Any]) -> _Poller:
        params = self._params(row)
        criteria = event_filter.parse_criteria(row["doc"].get("FilterCriteria"),
                                               self.limits.esm_filters_max)
        p = _Poller(self, row, esm.PollerCore(params, random.Random(self.rng.random())),
                    criteria)
        p.task = asyncio.ensure_future(p.run())
        p.task.add_done_callback(lambda _: self._poke())
        return p

    def statistics(self) -> dict[str, Any]:
        return {u: {"account": p.account, "function": p.function, "queue": p.queue,
                    **p.core.statistics()} for u, p in self.pollers.items()}


class _Poller:
    """One mapping's poller: feeds the core, carries out its instructions."""

    def __init__(self, owner: Mappings, row: dict[str, Any], core: esm.PollerCore,
                 criteria: event_filter.Criteria) -> None:
        self.owner = owner
        self.uuid = str(row["uuid"])
        self.account = str(row["account"])
        self.queue = str(row["queue"])
        self.function = str(row["function"])
        self.qualifier: str | None = row["qualifier"]
        self.version = int(row["version"])
        self.core = core
        self.criteria = criteria
        self.arn = f"arn:aws:sqs:{owner.cell.region}:{self.account}:{self.queue}"
        self.stimuli: asyncio.Queue[esm.Stimulus] = asyncio.Queue()
        self.stopping = False
        self._woken = False
        self.task: asyncio.Task[None]

    def wake(self) -> None:
        if not self._woken:  # one pending Woken is enough
            self._woken = True
            self.stimuli.put_nowait(esm.Woken())

    def stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self.stimuli.put_nowait(esm.Stop())

    def _now_ms(self) -> int:
        return int(self.owner.clock() * 1000)

    async def run(self) -> None:
        stimulus: esm.Stimulus = esm.Tick()
        while True:
            if isinstance(stimulus, esm.Woken):
                self._woken = False
            for ins in self.core.handle(stimulus, self._now_ms()):
                self._carry_out(ins)
            if self.core.idle():
                return
            if not self.stimuli.empty():  # what happened meanwhile comes first
                stimulus = self.stimuli.get_nowait()
                continue
            now = self._now_ms()
            wake = self.core.wake_at_ms(now)
            if wake is not None and wake <= now:
                stimulus = esm.Tick()
                await asyncio.sleep(0)  # let the invocations run
                continue
            timeout = None if wake is None else (wake - now) / 1000
            try:
                stimulus = await asyncio.wait_for(self.stimuli.get(), timeout)
            except TimeoutError:
                stimulus = esm.Tick()

    def _carry_out(self, ins: esm.Instruction) -> None:
        store = self.owner.queues.store
        if isinstance(ins, esm.Receive):
            try:
                msgs = store.receive(self.account, self.queue, ins.max_messages, None,
                                     self._now_ms())
            except QueueError as e:  # the queue was deleted
                self.stimuli.put_nowait(esm.ReceiveFailed(e.message))
                return
            except sqlite3.Error as e:
                self.stimuli.put_nowait(esm.ReceiveFailed(str(e)))
                return
            records = tuple(self._record(m) for m in msgs)
            matched = tuple(self.criteria.matches(event_filter.sqs_view(r)) for r in records)
            self.stimuli.put_nowait(esm.Received(records, matched))
        elif isinstance(ins, esm.Invoke):
            asyncio.ensure_future(self._invoke(ins))
        elif isinstance(ins, esm.Delete):
            try:
                store.delete_many(self.account, self.queue, list(ins.receipts))
            except (QueueError, sqlite3.Error) as e:
                log.warning("mapping %s: delete failed (the messages reappear): %s",
                            self.uuid, e)

    def _record(self, m: Message) -> dict[str, Any]:
        system = m.attrs.get("$system") or {}
        attrs = {"ApproximateReceiveCount": str(m.receive_count),
                 "SentTimestamp": str(m.sent_ms),
                 "SenderId": self.account,
                 "ApproximateFirstReceiveTimestamp": str(m.first_receive_ms),
                 **{k: v["StringValue"] for k, v in system.items()}}
        if m.seq is not None:
            attrs.update(SequenceNumber=fifo.sequence_number(m.seq),
                         MessageGroupId=str(m.group), MessageDeduplicationId=str(m.dedup))
        user = {k: v for k, v in m.attrs.items() if k != "$system"}
        return esm.sqs_record(message_id=m.id, receipt=m.receipt, body=m.body,
                              md5_of_body=m.md5, attributes=attrs, message_attributes=user,
                              md5_of_message_attributes=md5_of_attributes(user) if user else None,
                              queue_arn=self.arn, region=self.owner.cell.region)

    async def _invoke(self, ins: esm.Invoke) -> None:
        payload = esm.event_payload(ins.records)
        outcome, body = "error", None
        try:
            res = await self.owner.cell.invoke(self.account, self.function, payload,
                                               log_tail=False, qualifier=self.qualifier)
            outcome = "function_error" if res.function_error else "ok"
            body = res.payload
        except LambdaError as e:
            outcome = "throttled" if e.status == 429 else "error"
            log.info("mapping %s: invoke %s: %s", self.uuid, outcome, e)
        except Exception:
            log.exception("mapping %s: invoke", self.uuid)
        self.stimuli.put_nowait(esm.InvokeDone(ins.batch_id, outcome, body))

