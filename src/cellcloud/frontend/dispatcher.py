"""The cell's dispatcher: its own process, so it can crash (or be killed) on its own.

It claims ready events from the cell's event file (events.py) under a lease, invokes each
through the frontend's internal ``http`` op exactly as the router would (with the event id as
the request id), and acts on :func:`cellcloud.core.retry.decide`: complete, reschedule with
backoff, or hand the outcome to the on-success / on-failure destination (a cellcloud queue
through the frontend's ``sqs`` op, or another function as a new async event) and complete.

Only one dispatcher per cell runs at a time: it holds ``dispatcher.lock`` (flock) for its
life, so on start every lease in the file belongs to a dead process and is released at once;
a dispatcher that hangs instead of dying loses its leases when they expire.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import fcntl
import json
import logging
import os
import random
import sys
import time
import uuid
from typing import Any
from urllib.parse import quote

from .. import eventlog, runtime
from ..core import retry
from ..core.jsondepth import json_depth_within
from ..core.limits import DEFAULT_LIMITS
from ..core.messages import HttpRequest
from ..core.retry import Fail, Outcome, Retry, RetryBudget, Succeed
from ..metrics import process_registry, push_forever
from ..transport import (
    CallTimeout,
    Client,
    RedeliveringClient,
    RemoteError,
    Server,
    TransportError,
)
from . import deadletter
from .events import (
    EVENT_ID_HEADER,
    LAMBDA_ARN,
    RESERVED_ZERO_HEADER,
    SQS_ARN,
    Event,
    EventStore,
    now_ms,
    policy_of,
)
from .store import function_arn

log = logging.getLogger("cellcloud.dispatcher")

inflight_max = 16
inflight_per_function_max = 4
poll_interval_s = 0.2
destination_call_timeout_s = 10.0
invoke_slack_s = 10.0
assert invoke_slack_s + destination_call_timeout_s < retry.lease_margin_ms / 1000
destination_record_bytes_max = 256 * 1024
config_cache_ms = 1_000


class DestinationMissing(Exception):
    """The destination does not exist: the outcome cannot be delivered (logged, counted)."""


class DestinationUnavailable(Exception):
    """The destination could not be reached now: try the whole event again later."""


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def _json_or_text(raw: bytes) -> Any:
    if not json_depth_within(raw, DEFAULT_LIMITS.json_depth_max):
        return base64.b64encode(raw).decode()  # a function's own deep JSON: kept as bytes
    try:
        return json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return base64.b64encode(raw).decode()


def _error_message(response: bytes, function_error: str | None, condition: str) -> str:
    """What a dead-letter message's ErrorMessage says: the function's errorMessage, or why
    the event was given up (RetriesExhausted, EventAgeExceeded, a platform error)."""
    if function_error:
        doc = _json_or_text(response)
        if isinstance(doc, dict) and isinstance(doc.get("errorMessage"), str):
            return str(doc["errorMessage"])
        return response.decode(errors="replace") or function_error
    return condition

def destination_record(ev: Event, region: str, condition: str, invoke_count: int,
                       status: int, response: bytes, function_error: str | None,
                       executed_version: str, now: int) -> str:
    """Lambda's destination record (what an on-success/on-failure target receives)."""
    doc: dict[str, Any] = {
        "version": "1.0",
        "timestamp": _iso(now),
        "requestContext": {
            "requestId": ev.id,
            "functionArn": function_arn(region, ev.account, ev.name, ev.qualifier),
            "condition": condition,
            "approximateInvokeCount": invoke_count,
        },
        "requestPayload": _json_or_text(ev.payload),
        "responseContext": {"statusCode": status, "executedVersion": executed_version,
                            **({"functionError": function_error} if function_error else {})},
        "responsePayload": _json_or_text(response),
    }
    out = json.dumps(doc)
    if len(out.encode()) > destination_record_bytes_max:
        doc["responsePayload"] = None
        doc["responseContext"]["truncated"] = True
        out = json.dumps(doc)
    if len(out.encode()) > destination_record_bytes_max:
        doc["requestPayload"] = None
        out = json.dumps(doc)
    return out


class Dispatcher:
    def __init__(self, store: EventStore, frontend: Client, region: str, *,
                 rng: random.Random | None = None) -> None:
        self.store = store
        self.frontend = frontend
        self.region = region
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.rng = rng or random.Random()
        self.budget = RetryBudget(now_ms=now_ms())
        self._inflight: dict[tuple[str, str], int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._configs: dict[tuple[str, str, str], tuple[int, Any]] = {}
        self._round = 0
        self.counters = {"attempts": 0, "succeeded": 0, "function_errors": 0, "throttled": 0,
                         "platform_errors": 0, "retries_scheduled": 0, "to_on_success": 0,
                         "to_on_failure": 0, "to_dead_letter": 0, "dropped": 0, "destination_missing": 0,
                         "lease_lost": 0, "released_at_start": 0}

    def _policy(self, ev: Event) -> retry.AsyncPolicy:
        key = (ev.account, ev.name, ev.qualifier)
        now = now_ms()
        hit = self._configs.get(key)
        if hit is None or now - hit[0] > config_cache_ms:
            found = self.store.get_config(*key)
            hit = (now, found[0] if found else None)
            self._configs[key] = hit
        return policy_of(hit[1])

    # -- the loop ------------------------------------------------------------------------------
    def step(self) -> int:
        """Claim what there is room for and start delivering it; returns how many started."""
        free = inflight_max - len(self._tasks)
        if free <= 0:
            return 0
        self._round += 1
        evs = self.store.claim(self.owner, now_ms(), free, inflight_per_function_max,
                               self._inflight, self._round)
        for ev in evs:
            fn = (ev.account, ev.name)
            self._inflight[fn] = self._inflight.get(fn, 0) + 1
            task = asyncio.ensure_future(self._deliver(ev))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(evs)

    async def run(self) -> None:
        while True:
            try:
                started = self.step()
            except Exception:  # sqlite busy, a bug: log, keep the loop alive
                log.exception("dispatcher step failed")
                started = 0
            if not started:
                await asyncio.sleep(poll_interval_s)  # a periodic poll of the event file
            else:
                await asyncio.sleep(0)

    async def _deliver(self, ev: Event) -> None:
        fn = (ev.account, ev.name)
        try:
            await self._deliver_once(ev)
        except Exception:
            log.exception("delivery of %s failed; its lease will expire", ev.id,
                          extra=eventlog.fields(event="delivery_failed", request_id=ev.id,
                                                function=ev.name))
        finally:
            self._inflight[fn] -= 1
            if not self._inflight[fn]:
                del self._inflight[fn]

    async def _invoke(self, ev: Event) -> tuple[Outcome, int, bytes, str | None, str, str]:
        req = HttpRequest(
            method="POST",
            path=f"/2015-03-31/functions/{quote(ev.name, safe='')}/invocations",
            query="" if ev.qualifier == "$LATEST" else f"Qualifier={quote(ev.qualifier)}",
            headers={"x-amz-invocation-type": "RequestResponse", EVENT_ID_HEADER: ev.id,
                     "content-type": "application/json"},
            body=ev.payload, account=ev.account).to_wire()
        self.counters["attempts"] += 1
        try:
            # Within the lease (timeout + lease_margin_ms), with room for the destination call.
            resp = await self.frontend.call("http", req,
                                            timeout_s=ev.timeout_s + invoke_slack_s)
        except (TransportError, CallTimeout, RemoteError) as e:
            return Outcome.PLATFORM_ERROR, 0, b"", None, "", f"frontend: {e}"
        status, headers, body = resp["s"], resp["h"], resp["b"]
        version = headers.get("x-amz-executed-version", ev.qualifier)
        if status == 200:
            ferr = headers.get("x-amz-function-error")
            return (Outcome.FUNCTION_ERROR if ferr else Outcome.SUCCESS, status, body, ferr,
                    version, ferr or "")
        err = f"{status} {headers.get('x-amzn-errortype', '')}"
        if status == 429 and headers.get(RESERVED_ZERO_HEADER) == "0":
            return Outcome.ZERO_CONCURRENCY, status, body, None, version, err
        if status == 429:
            return Outcome.THROTTLED, status, body, None, version, err
        if status >= 500:
            return Outcome.PLATFORM_ERROR, status, body, None, version, err
        return Outcome.REJECTED, status, body, None, version, err

    async def _deliver_once(self, ev: Event) -> None:
        policy = self._policy(ev)
        now = now_ms()
        if ev.attempts == 0 and ev.platform_retries == 0:
            self.budget.on_first_attempt(now)
        decision: retry.Decision
        if retry.too_old(accepted_ms=ev.accepted_ms, now_ms=now, policy=policy):
            # Older than its maximum age (it waited in the queue, or its last retry was planned
            # for the moment it reached the age): discarded without running again.
            outcome, status, body, ferr, version = Outcome.PLATFORM_ERROR, 0, b"", None, \
                ev.qualifier
            attempts, platform = ev.attempts, ev.platform_retries
            decision = retry.Fail("EventAgeExceeded", policy.on_failure)
        else:
            outcome, status, body, ferr, version, err = await self._invoke(ev)
            now = now_ms()
            attempts = ev.attempts + (1 if outcome is Outcome.FUNCTION_ERROR else 0)
            platform = ev.platform_retries + (1 if outcome in (
                Outcome.THROTTLED, Outcome.PLATFORM_ERROR, Outcome.ZERO_CONCURRENCY) else 0)
            key = {Outcome.SUCCESS: "succeeded", Outcome.FUNCTION_ERROR: "function_errors",
                   Outcome.THROTTLED: "throttled", Outcome.PLATFORM_ERROR: "platform_errors",
                   Outcome.ZERO_CONCURRENCY: "throttled"}
            if outcome in key:
                self.counters[key[outcome]] += 1
            decision = retry.decide(outcome, attempts_done=attempts,
                                    accepted_ms=ev.accepted_ms, now_ms=now, policy=policy,
                                    rng=self.rng, budget=self.budget,
                                    platform_retries=ev.platform_retries)
        if isinstance(decision, Retry):
            self.counters["retries_scheduled"] += 1
            if not self.store.reschedule(ev.id, self.owner, decision.at_ms, attempts, platform,
                                         err):
                self.counters["lease_lost"] += 1
            return
        invoke_count = attempts + (1 if outcome is Outcome.SUCCESS else 0) + platform
        if isinstance(decision, Succeed):
            dest, condition, which = decision.destination, "Success", "to_on_success"
        else:
            assert isinstance(decision, Fail)
            dest, condition, which = decision.destination, decision.condition, "to_on_failure"
        if isinstance(decision, Fail) and ev.dead_letter:
            # The function's DeadLetterConfig, besides any on-failure destination.
            message = _error_message(body, ferr, condition)
            try:
                await self._send_dead_letter(ev, status, message)
                self.counters["to_dead_letter"] += 1
            except DestinationMissing as e:
                self.counters["destination_missing"] += 1
                log.warning("event %s: dead-letter queue %s is missing (%s)", ev.id,
                            ev.dead_letter, e, extra=eventlog.fields(
                                event="dead_letter_missing", request_id=ev.id,
                                function=ev.name))
            except DestinationUnavailable as e:
                self.counters["platform_errors"] += 1
                self.store.reschedule(ev.id, self.owner,
                                      now + retry.backoff_ms(platform, self.rng), ev.attempts,
                                      platform + 1, f"dead-letter queue: {e}")
                return
        if dest is None:
            if not isinstance(decision, Succeed) and not ev.dead_letter:
                self.counters["dropped"] += 1
                log.warning("event %s of %s failed (%s) with no on-failure destination: dropped",
                            ev.id, ev.name, condition, extra=eventlog.fields(
                                event="event_dropped", request_id=ev.id, function=ev.name))
        else:
            record = destination_record(ev, self.region, condition, invoke_count, status, body,
                                        ferr, version, now)
            try:
                await self._send(ev.account, dest, record)
                self.counters[which] += 1
            except DestinationMissing as e:
                self.counters["destination_missing"] += 1
                log.warning("event %s: destination %s is missing (%s)", ev.id, dest, e,
                            extra=eventlog.fields(event="destination_missing",
                                                  request_id=ev.id, function=ev.name))
            except DestinationUnavailable as e:
                # Keep the event: it runs again later (at least once), and its outcome is
                # delivered then.
                self.counters["platform_errors"] += 1
                self.store.reschedule(ev.id, self.owner,
                                      now + retry.backoff_ms(platform, self.rng), ev.attempts,
                                      platform + 1, f"destination: {e}")
                return
        if not self.store.complete(ev.id, self.owner):
            self.counters["lease_lost"] += 1

    async def _send_dead_letter(self, ev: Event, status: int, message: str) -> None:
        body = deadletter.send_message_body(ev.account, ev.dead_letter, ev.id, status, message,
                                            ev.payload)
        try:
            resp = await self.frontend.call(
                "sqs", {"target": "AmazonSQS.SendMessage", "b": body, "a": ev.account},
                timeout_s=destination_call_timeout_s)
        except (TransportError, CallTimeout, RemoteError) as e:
            raise DestinationUnavailable(str(e)) from e
        if resp["s"] == 200:
            return
        if b"QueueDoesNotExist" in resp["b"]:
            raise DestinationMissing(ev.dead_letter)
        raise DestinationUnavailable(f"{resp['s']} {resp['b'][:200]!r}")

    async def _send(self, account: str, dest: str, record: str) -> None:
        m = SQS_ARN.match(dest)
        try:
            if m is not None:
                body = json.dumps({"QueueUrl": f"http://cellcloud.internal/{account}/{m['name']}",
                                   "MessageBody": record}).encode()
                resp = await self.frontend.call(
                    "sqs", {"target": "AmazonSQS.SendMessage", "b": body, "a": account},
                    timeout_s=destination_call_timeout_s)
                if resp["s"] == 200:
                    return
                if b"QueueDoesNotExist" in resp["b"]:
                    raise DestinationMissing(dest)
                raise DestinationUnavailable(f"{resp['s']} {resp['b'][:200]!r}")
            lm = LAMBDA_ARN.match(dest)
            if lm is None:
                raise DestinationMissing(dest)
            req = HttpRequest(method="POST",
                              path=f"/2015-03-31/functions/{lm['name']}/invocations",
                              query=f"Qualifier={lm['qualifier']}" if lm["qualifier"] else "",
                              headers={"x-amz-invocation-type": "Event"}, body=record.encode(),
                              account=account).to_wire()
            resp = await self.frontend.call("http", req, timeout_s=destination_call_timeout_s)
            if resp["s"] == 202:
                return
            if resp["s"] == 404:
                raise DestinationMissing(dest)
            raise DestinationUnavailable(f"{resp['s']} {resp['h'].get('x-amzn-errortype')}")
        except (TransportError, CallTimeout, RemoteError) as e:
            raise DestinationUnavailable(str(e)) from e

    def statistics(self) -> dict[str, Any]:
        return {"owner": self.owner, "pid": os.getpid(), "in_flight": len(self._tasks),
                "counters": dict(self.counters), "retry_budget": self.budget.statistics(),
                "backlog": self.store.backlog(now_ms())}


async def _lock(path: str) -> int:
    """Hold the cell's dispatcher lock; wait (bounded by nothing: a live twin keeps it) until
    any previous dispatcher is gone."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            await asyncio.sleep(0.5)  # the holder is alive; look again


async def serve(args: argparse.Namespace) -> None:
    state_dir = os.path.abspath(args.state_dir)
    store = EventStore(state_dir)
    await _lock(os.path.join(state_dir, "dispatcher.lock"))
    host, port = runtime.parse_addr(args.frontend)
    # The frontend being replaced refuses calls unrun: they are sent again, to its successor.
    d = Dispatcher(store, RedeliveringClient(host, port, expect_role="frontend",
                                             redeliver_s=DEFAULT_LIMITS.redeliver_ms / 1000),
                   args.region)
    d.counters["released_at_start"] = store.release_all_leases()

    async def status(_: Any) -> dict[str, Any]:
        return d.statistics()

    server = Server({"status": status}, protocol="dispatcher")
    lhost, lport = await server.listen_tcp("", 0, sock=runtime.bind_tcp(args.listen))
    task = asyncio.ensure_future(d.run())
    # Prometheus: the process and its TLS handshakes, pushed to the frontend (the way this
    # process's calls go), which hands them to the operator's GET /metrics.
    pusher = asyncio.ensure_future(push_forever(process_registry(), f"{args.cell_id}-dispatcher",
                                                lambda: [d.frontend]))
    runtime.announce_ready({"component": "dispatcher", "cell_id": args.cell_id, "host": lhost,
                            "port": lport, "pid": os.getpid()})
    try:
        await runtime.wait_for_shutdown()
    finally:
        task.cancel()
        pusher.cancel()
        await server.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="cellcloud dispatcher")
    p.add_argument("--cell-id", required=True)
    p.add_argument("--state-dir", required=True, help="the cell frontend's state directory")
    p.add_argument("--frontend", required=True, help="HOST:PORT of the cell's frontend")
    p.add_argument("--region", default="cc-local-1")
    p.add_argument("--listen", default="127.0.0.1:0")
    runtime.add_security_args(p)
    runtime.add_protocol_max(p)
    args = p.parse_args(argv)
    runtime.apply_protocol_max(args)
    runtime.setup_logging(f"dispatcher/{args.cell_id}")
    runtime.setup_security(args, "dispatcher", args.cell_id, f"{args.cell_id}-dispatcher",
                           args.region)
    runtime.run(serve(args))


if __name__ == "__main__":
    main(sys.argv[1:])
