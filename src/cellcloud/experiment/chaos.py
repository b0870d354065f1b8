"""``cellcloud experiment chaos``: mixed sync and async load against a real region while a
random component (router, frontend, dispatcher, agent, an agent's zygote, the control plane that
holds the region's configuration, or an execution environment) is killed with SIGKILL every few
seconds; then wait for the queues to drain and count.

The oracle is independent of the region: the driver records the id of every async event it got a
202 for; the handler itself reports each execution (start, then ok or fail) to a ledger server
that the experiment runs in a network namespace of its own, outside the region, reached over the
environment's ordinary egress (experiment/ledger.py). An accepted event is

- executed when the ledger saw it succeed;
- dead-lettered as it should be when the ledger saw it fail (at least once) and never succeed,
  i.e. every attempt that ended ended in the handler's failure (an attempt killed mid-run ends
  with no record), and its id is in the on-failure queue (DLQ);
- lost otherwise (never run, run and given up on without a failure of the handler, or failed
  and never dead-lettered).

The DLQ must hold exactly the events the ledger saw fail on every attempt (compared by id).
Events whose handler started more often than ``1 + MaximumRetryAttempts`` are counted as runs
beyond the retry policy (at-least-once allows a rerun after a crash, never unboundedly). Sync
requests refused with ``FunctionKillsWorkers`` are false throttles: the sync function never
harms a worker, every death in the run is the faulter's. The region's event file is looked at
only to stop waiting early.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .ledger import World

FUNCTION_TIMEOUT_S = 3
#: a sync request must be answered within this (the function's timeout plus the platform's
#: allowance); one still unanswered a second later is "hung"
SYNC_TIMEOUT_S = FUNCTION_TIMEOUT_S + 5
TARGETS = ("router", "frontend", "dispatcher", "agent", "zygote", "control", "environment")
ROLE = "arn:aws:iam::123456789012:role/chaos"
#: the async function's retry policy (MaximumRetryAttempts)
RETRIES_MAX = 1
FALSE_THROTTLE = "FunctionKillsWorkers"
CODE = '''import json, time, urllib.request

def report(url, rec):
    data = json.dumps(rec).encode()
    for i in range(8):  # bounded: a report that never lands fails the attempt
        try:
            urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST"),
                                   timeout=1).read()
            return
        except OSError:
            time.sleep(0.05 * (i + 1))
    raise RuntimeError("ledger unreachable")

def handler(event, context):
    url, rid = event.get("ledger"), context.aws_request_id
    if url:
        report(url, {"id": rid, "seq": event.get("seq"), "phase": "start"})
    time.sleep(event.get("sleep", 0))
    if event.get("fail"):
        if url:
            report(url, {"id": rid, "phase": "fail"})
        raise RuntimeError("planned failure")
    if url:
        report(url, {"id": rid, "phase": "ok"})
    return {"id": rid, "seq": event.get("seq")}
'''


def account(accepted: dict[str, bool], records: list[dict[str, Any]], dlq: Counter[str],
            retries_max: int = RETRIES_MAX) -> dict[str, Any]:
    """The independent count: ``accepted`` (id -> planned to fail, from the 202s the client
    saw), the ledger's ``records`` (what the handlers reported), ``dlq`` (ids read from the
    on-failure queue, with how often). Pure: the unit tests feed it made-up ledgers."""
    starts: Counter[str] = Counter()
    oks: Counter[str] = Counter()
    fails: Counter[str] = Counter()
    probes = {str(r.get("id")) for r in records if r.get("seq") == "probe"}  # setup's check
    for r in records:
        if str(r.get("id")) in probes:
            continue
        c = {"start": starts, "ok": oks, "fail": fails}.get(str(r.get("phase")))
        if c is not None:
            c[str(r.get("id"))] += 1
    # Failed every attempt: the handler failed deliberately at least once, and every attempt
    # the ledger saw end ended in a failure (an attempt killed mid-run ends with no record).
    failed_every_attempt = {i for i in fails if not oks[i]}
    executed = {i for i in accepted if oks[i]}
    dead_lettered = {i for i in accepted if i in failed_every_attempt and dlq[i]}
    lost = sorted(set(accepted) - executed - dead_lettered)
    dlq_ids = set(dlq)
    over = {i: starts[i] for i in accepted if starts[i] > 1 + retries_max}
    return {
        "accepted": len(accepted),
        "executed": len(executed),
        "dead_lettered_after_failing_every_attempt": len(dead_lettered),
        "of_which_with_an_attempt_killed_mid_run": sum(1 for i in dead_lettered
                                                       if starts[i] > fails[i]),
        "planned_failures_accepted": sum(accepted.values()),
        "lost": len(lost),
        "lost_ids": lost[:20],
        "lost_never_started": sum(1 for i in lost if not starts[i]),
        "lost_interrupted_then_dead_lettered": sum(1 for i in lost if dlq[i] and starts[i]),
        "dlq_equals_failed_every_attempt": dlq_ids == failed_every_attempt,
        "dlq_unexpected": sorted(dlq_ids - failed_every_attempt)[:20],
        "dlq_missing": sorted(failed_every_attempt - dlq_ids)[:20],
        "dlq_delivered_twice": sum(1 for i in dlq if dlq[i] > 1),
        "runs": sum(starts[i] for i in accepted),
        "reruns": sum(max(0, starts[i] - 1) for i in accepted if oks[i]),
        "runs_beyond_retry_policy": len(over),
        "runs_beyond_retry_policy_ids": sorted(over)[:20],
        "succeeded_more_than_once": sum(1 for i in accepted if oks[i] > 1),
        "unacknowledged_but_run": len(set(starts) - set(accepted)),
    }


@dataclass
class Ledger:
    lock: threading.Lock = field(default_factory=threading.Lock)
    accepted: dict[str, bool] = field(default_factory=dict)  # event id -> planned to fail
    async_refused: Counter[str] = field(default_factory=Counter)
    sync_sent: int = 0
    sync_ok: int = 0
    sync_failed: Counter[str] = field(default_factory=Counter)
    sync_hung: int = 0
    sync_max_s: float = 0.0
    faults: list[tuple[float, str, int]] = field(default_factory=list)


def _zip() -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("app.py", CODE)
    return buf.getvalue()


def _clients(doc: dict[str, Any], read_timeout_s: float) -> tuple[Any, Any]:
    import boto3
    from botocore.config import Config

    kw = dict(endpoint_url=doc["endpoint"], region_name=doc["region"],
              aws_access_key_id=doc["access_key_id"],
              aws_secret_access_key=doc["secret_access_key"],
              config=Config(retries={"mode": "standard", "total_max_attempts": 1},
                            read_timeout=read_timeout_s, connect_timeout=2,
                            max_pool_connections=16))
    return boto3.client("lambda", **kw), boto3.client("sqs", **kw)


def _error_code(e: Exception) -> str:
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        code = str(resp.get("Error", {}).get("Code") or type(e).__name__)
        reason = resp.get("Reason")  # a 429 says why (capacity, poison detector, ...)
        return f"{code}:{reason}" if reason else code
    return type(e).__name__


def _retrying(fn: Any, what: str, deadline_s: float = 60.0) -> Any:
    """Setup and drain calls: retried until they work (the region may be restarting a
    component), bounded by a deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return fn()
        except Exception as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: {e}") from e
            time.sleep(0.5)  # back off before the next try of a bounded retry


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


class Chaos:
    def __init__(self, state_dir: str, *, duration_s: float, fault_interval_s: float,
                 seed: int, targets: tuple[str, ...] = TARGETS, plant_bug: bool = False,
                 async_rate_per_s: float = 20.0, sync_workers: int = 2,
                 drain_timeout_s: float = 240.0, fail_fraction: float = 0.1) -> None:
        self.state_dir = os.path.abspath(state_dir)
        self.duration_s = duration_s
        self.fault_interval_s = fault_interval_s
        self.rng = random.Random(seed)
        self.seed = seed
        self.targets = targets
        self.plant_bug = plant_bug
        self.async_rate_per_s = async_rate_per_s
        self.sync_workers = sync_workers
        self.drain_timeout_s = drain_timeout_s
        self.fail_fraction = fail_fraction
        self.ledger = Ledger()
        self.stop = threading.Event()
        self.doc: dict[str, Any] = {}
        self.world = World(seed)

    # -- the region ----------------------------------------------------------------------------
    def _cli(self, *args: str, env: dict[str, str] | None = None) -> None:
        subprocess.run([sys.executable, "-m", "cellcloud", *args, "--state-dir", self.state_dir],
                       check=True, timeout=180, env=env, stdout=subprocess.DEVNULL)

    def region_json(self) -> dict[str, Any]:
        with open(os.path.join(self.state_dir, "region.json")) as f:
            doc: dict[str, Any] = json.load(f)
        return doc

    def start_region(self) -> None:
        env = dict(os.environ)
        if self.plant_bug:
            env["CELLCLOUD_PLANT_BUG"] = "ack-before-write"
        self._cli("up", "--detach", "--port", "0", "--agents-per-cell", "2", env=env)
        self.doc = self.region_json()

    def setup(self) -> None:
        lam, sqs = _clients(self.doc, 30)
        acct, reg = self.doc["account_id"], self.doc["region"]
        self.dlq_url = _retrying(lambda: sqs.create_queue(QueueName="chaos-dlq")["QueueUrl"],
                                 "queue")
        for name in ("chaos-async", "chaos-sync"):
            _retrying(lambda n=name: lam.create_function(
                FunctionName=n, Runtime="python3.11", Role=ROLE, Handler="app.handler",
                Timeout=FUNCTION_TIMEOUT_S, Code={"ZipFile": _zip()}), "create_function")
        _retrying(lambda: lam.put_function_event_invoke_config(
            FunctionName="chaos-async", MaximumRetryAttempts=RETRIES_MAX,
            MaximumEventAgeInSeconds=3600,
            DestinationConfig={"OnFailure": {"Destination": f"arn:aws:sqs:{reg}:{acct}:chaos-dlq"}
                               }), "event config")
        # The handler reaches the ledger before the load starts (egress works).
        probe = _retrying(lambda: lam.invoke(FunctionName="chaos-async", Payload=json.dumps(
            {"seq": "probe", "ledger": self.world.url}).encode()), "probe")
        if probe.get("FunctionError"):
            raise RuntimeError(f"the handler cannot reach the ledger: {probe['Payload'].read()}")

    # -- load ----------------------------------------------------------------------------------
    def async_sender(self, k: int) -> None:
        lam, _ = _clients(self.doc, 10)
        rng = random.Random(self.seed * 1000 + k)
        period = 2.0 / self.async_rate_per_s  # two senders share the rate
        seq = 0
        while not self.stop.is_set():
            seq += 1
            fail = rng.random() < self.fail_fraction
            payload = json.dumps({"seq": f"{k}-{seq}", "fail": fail,
                                  "ledger": self.world.url}).encode()
            try:
                r = lam.invoke(FunctionName="chaos-async", InvocationType="Event", Payload=payload)
                if r["StatusCode"] == 202:
                    with self.ledger.lock:
                        self.ledger.accepted[r["ResponseMetadata"]["RequestId"]] = fail
            except Exception as e:
                with self.ledger.lock:
                    self.ledger.async_refused[_error_code(e)] += 1
            self.stop.wait(period)  # the load's pace

    def sync_sender(self, k: int) -> None:
        lam, _ = _clients(self.doc, SYNC_TIMEOUT_S + 1)
        while not self.stop.is_set():
            t0 = time.monotonic()
            code = None
            try:
                r = lam.invoke(FunctionName="chaos-sync", Payload=b'{"sleep": 0.05}')
                if r.get("FunctionError"):
                    code = "FunctionError"
            except Exception as e:
                code = _error_code(e)
            elapsed = time.monotonic() - t0
            with self.ledger.lock:
                self.ledger.sync_sent += 1
                self.ledger.sync_max_s = max(self.ledger.sync_max_s, elapsed)
                if elapsed > SYNC_TIMEOUT_S + 1 or code in ("ReadTimeoutError",):
                    self.ledger.sync_hung += 1
                elif code is None:
                    self.ledger.sync_ok += 1
                else:
                    self.ledger.sync_failed[code] += 1
            if code is not None:
                self.stop.wait(0.2)  # the load's pace after an error

    # -- faults --------------------------------------------------------------------------------
    def kill_one(self) -> None:
        target = self.rng.choice(self.targets)
        comps = self.region_json().get("components", {})
        pid: int | None = None
        agents = [c["pid"] for n, c in comps.items() if c["kind"] == "agent" and c["pid"]]
        if target in ("environment", "zygote"):
            procs = [p for a in agents for p in _descendants(a)]
            zygotes = [p for p in procs if b"cellcloud.sandbox.zygote" in _cmdline(p)]
            if target == "zygote":
                pid = self.rng.choice(zygotes) if zygotes else None
            else:
                envs = [p for p in procs if p not in zygotes and not _cmdline(p).startswith(
                    (b"ip\0", b"nft\0")) and b"cellcloud.network" not in _cmdline(p)]
                pid = self.rng.choice(envs) if envs else None
        else:
            pids = [c["pid"] for n, c in comps.items()
                    if (c["kind"] == target or n.endswith(f"-{target}")) and c["pid"]]
            pid = self.rng.choice(pids) if pids else None
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.ledger.faults.append((time.monotonic(), target, pid))

    def faulter(self) -> None:
        while not self.stop.wait(self.rng.uniform(0.5, 1.5) * self.fault_interval_s):
            try:
                self.kill_one()
            except (OSError, ValueError, KeyError):
                pass

    # -- drain ---------------------------------------------------------------------------------
    def region_backlog(self) -> int:
        db = sqlite3.connect(os.path.join(self.state_dir, "cells", "cell-1", "frontend",
                                          "events.db"), timeout=10)
        try:
            return int(db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
        finally:
            db.close()

    def settled(self, dlq: Counter[str]) -> bool:
        """Every accepted event succeeded per the ledger or is in the DLQ."""
        try:
            records = self.world.records()
        except OSError:
            return False
        ok = {str(r.get("id")) for r in records if r.get("phase") == "ok"}
        return set(self.ledger.accepted) <= ok | set(dlq)

    def drain(self) -> tuple[Counter[str], float]:
        _, sqs = _clients(self.doc, 30)
        seen_dlq: Counter[str] = Counter()
        t0 = time.monotonic()
        idle_rounds = 0
        while time.monotonic() - t0 < self.drain_timeout_s:
            got = 0
            failed = False
            for url, seen in ((self.dlq_url, seen_dlq),):
                try:
                    resp = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                               WaitTimeSeconds=1)
                except Exception:
                    failed = True  # a component is still restarting: not an empty queue
                    continue
                for m in resp.get("Messages", []):
                    got += 1
                    seen[json.loads(m["Body"])["requestContext"]["requestId"]] += 1
                    try:
                        sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
                    except Exception:
                        pass  # seen again later: counted as a duplicate, as it should be
            if not got and self.settled(seen_dlq):
                break
            if got:
                idle_rounds = 0
                continue
            if failed:
                idle_rounds = 0
                time.sleep(0.5)  # pause before the next try of a bounded drain
                continue
            # Nothing arrived: stop early only when the region holds no more events either.
            try:
                backlog = self.region_backlog()
            except sqlite3.Error:
                backlog = 1
            idle_rounds = idle_rounds + 1 if backlog == 0 else 0
            if idle_rounds >= 5:
                break
        return seen_dlq, time.monotonic() - t0

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.world.start()
        try:
            return self._run()
        finally:
            self.world.close()

    def _run(self) -> dict[str, Any]:
        self.start_region()
        try:
            self.setup()
            threads = [threading.Thread(target=self.async_sender, args=(k,), daemon=True)
                       for k in range(2)]
            threads += [threading.Thread(target=self.sync_sender, args=(k,), daemon=True)
                        for k in range(self.sync_workers)]
            threads.append(threading.Thread(target=self.faulter, daemon=True))
            for t in threads:
                t.start()
            self.stop.wait(self.duration_s)  # the experiment's length
            self.stop.set()
            for t in threads:
                t.join(SYNC_TIMEOUT_S + 5)
            seen_dlq, drain_s = self.drain()
            records = self.world.records()
            restarts = {n: c["restarts"] for n, c in self.region_json()["components"].items()}
        finally:
            try:
                self._cli("down")
            except (subprocess.SubprocessError, OSError):
                pass
        return self.report(records, seen_dlq, drain_s, restarts)

    def report(self, records: list[dict[str, Any]], seen_dlq: Counter[str], drain_s: float,
               restarts: dict[str, int]) -> dict[str, Any]:
        led = self.ledger
        throttled = sum(n for code, n in led.sync_failed.items() if FALSE_THROTTLE in code)
        return {
            "seed": self.seed,
            "duration_s": self.duration_s,
            "fault_interval_s": self.fault_interval_s,
            "planted_bug": "ack-before-write" if self.plant_bug else None,
            "faults": dict(Counter(t for _, t, _ in led.faults)),
            "restarts": restarts,
            "async": {
                **account(led.accepted, records, seen_dlq),
                "ledger_records": len(records),
                "retry_policy_attempts_max": 1 + RETRIES_MAX,
                "refused_at_intake": dict(led.async_refused),
                "drain_s": round(drain_s, 1),
            },
            "sync": {
                "sent": led.sync_sent,
                "succeeded": led.sync_ok,
                "failed_with_clear_error": sum(led.sync_failed.values()),
                "errors": dict(led.sync_failed),
                "hung": led.sync_hung,
                "false_throttles": throttled,
                "timeout_s": SYNC_TIMEOUT_S,
                "slowest_s": round(led.sync_max_s, 2),
            },
        }


def main(state_dir: str, *, duration_s: float, fault_interval_s: float, seed: int,
         targets: tuple[str, ...], plant_bug: bool, json_out: str | None) -> dict[str, Any]:
    chaos = Chaos(state_dir, duration_s=duration_s, fault_interval_s=fault_interval_s,
                  seed=seed, targets=targets, plant_bug=plant_bug)
    result = chaos.run()
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def new_state_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=f"cellcloud-chaos-{uuid.uuid4().hex[:6]}-")
