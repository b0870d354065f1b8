"""A rollout under steady load, failures counted by the client (issue #21).

    python -m bench.rollout [--cells 3] [--clients 8] [--async-clients 2] [--settle-s 5]
                            [--to-version 9.9.9] [--bake-s 2]

Starts a region (``cellcloud up --detach``), deploys one Python function, starts ``--clients``
threads invoking it synchronously (boto3, no retries: every error the router answers counts)
and ``--async-clients`` threads sending Event invokes whose handler POSTs its id to a ledger
server outside the region (experiment/ledger.py, reached over the function's egress: every
accepted event must run, counted there, not from the region's own counters). After ``--settle-s`` of load it runs ``cellcloud rollout`` (with ``--to-version``: to a
copy of this source tree whose ``__version__`` is that, i.e. a changed build), keeps the
load for ``--settle-s`` more, stops it and prints, as JSON: requests sent and failed (by error
code) before, during and after the rollout, p50/p99 latency in each phase, the rollout's
report (per cell: seconds, healthy), and accepted events versus events that ran.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter

from botocore.exceptions import ClientError

from bench.common.region import client, detached_region
from cellcloud.experiment.ledger import World

CODE = '''
import json, urllib.request
def handler(event, context):
    if event.get("ledger"):
        urllib.request.urlopen(urllib.request.Request(
            event["ledger"], data=json.dumps({"id": event["id"]}).encode(), method="POST"),
            timeout=30)
    return {"ok": 1}
'''


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("app.py", CODE)
    return buf.getvalue()


class Phase:
    def __init__(self) -> None:
        self.name = "before"


def _copy_build(version: str) -> str:
    """This source tree copied as another build with its own ``__version__``."""
    import cellcloud

    root = tempfile.mkdtemp(prefix="bench-build-")
    dst = os.path.join(root, "src", "cellcloud")
    shutil.copytree(os.path.dirname(cellcloud.__file__), dst,
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = os.path.join(dst, "__init__.py")
    with open(init) as f:
        text = f.read()
    with open(init, "w") as f:
        f.write(text.replace(f'__version__ = "{cellcloud.__version__}"',
                             f'__version__ = "{version}"'))
    return root


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(len(xs) * p))] * 1000, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--async-clients", type=int, default=2)
    ap.add_argument("--settle-s", type=float, default=5.0)
    ap.add_argument("--to-version", default=None)
    ap.add_argument("--bake-s", type=float, default=0.0)
    a = ap.parse_args()
    rollout_args = ["--bake-s", str(a.bake_s)]
    if a.to_version:
        rollout_args += ["--to", _copy_build(a.to_version)]
    world = World()  # the ledger: a server outside the region, reached over egress
    world.start()
    ledger = world.url
    with contextlib.ExitStack() as stack:
        stack.callback(world.close)
        state, doc = stack.enter_context(detached_region("bench-rollout-", "--cells",
                                                         str(a.cells)))
        lam = client(doc, "lambda")
        lam.create_function(FunctionName="roll", Runtime="python3.11", Role="r",
                            Handler="app.handler", Code={"ZipFile": _zip()},
                            Environment={"Variables": {}})
        lam.get_waiter("function_active_v2").wait(FunctionName="roll")
        lam.invoke(FunctionName="roll", Payload=b"{}")
        phase = Phase()
        stop = threading.Event()
        lock = threading.Lock()
        sent: Counter[str] = Counter()
        failed: dict[str, Counter[str]] = {}
        lat: dict[str, list[float]] = {}
        accepted: list[str] = []

        def record(ph: str, dt: float, err: str | None) -> None:
            with lock:
                sent[ph] += 1
                lat.setdefault(ph, []).append(dt)
                if err is not None:
                    failed.setdefault(ph, Counter())[err] += 1

        def sync_worker() -> None:
            c = client(doc, "lambda")
            while not stop.is_set():
                ph = phase.name
                t0 = time.monotonic()
                err = None
                try:
                    out = c.invoke(FunctionName="roll", Payload=b"{}")
                    if out.get("FunctionError"):
                        err = "FunctionError"
                except ClientError as e:
                    err = e.response["Error"]["Code"]
                except Exception as e:  # a dropped connection is a failure too
                    err = type(e).__name__
                record(ph, time.monotonic() - t0, err)

        def async_worker(n: int) -> None:
            c = client(doc, "lambda")
            i = 0
            while not stop.is_set():
                ph = phase.name
                eid = f"{n}-{i}"
                i += 1
                t0 = time.monotonic()
                err = None
                try:
                    c.invoke(FunctionName="roll", InvocationType="Event",
                             Payload=json.dumps({"ledger": ledger, "id": eid}).encode())
                    with lock:
                        accepted.append(eid)
                except ClientError as e:
                    err = e.response["Error"]["Code"]
                except Exception as e:
                    err = type(e).__name__
                record("async-" + ph, time.monotonic() - t0, err)

        threads = [threading.Thread(target=sync_worker) for _ in range(a.clients)]
        threads += [threading.Thread(target=async_worker, args=(n,))
                    for n in range(a.async_clients)]
        for t in threads:
            t.start()
        stop.wait(a.settle_s)  # a steady load for a while before the rollout
        phase.name = "during"
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "cellcloud", "rollout", "--state-dir",
                              state, *rollout_args], capture_output=True, text=True,
                             timeout=900)
        rollout_s = time.monotonic() - t0
        phase.name = "after"
        stop.wait(a.settle_s)
        stop.set()
        for t in threads:
            t.join()
        with open(os.path.join(state, "rollout.json")) as f:
            report = json.load(f)
        # Every accepted event must run: wait (bounded) for the ledger to hold them all.
        deadline = time.monotonic() + 120
        ran: set[str] = set()
        while time.monotonic() < deadline:
            ran = {str(r.get("id")) for r in world.records()}
            if ran >= set(accepted):
                break
            time.sleep(0.5)  # polling a server another process writes, bounded above
        phases = sorted(sent)
        print(json.dumps({
            "cells": a.cells, "clients": a.clients, "async_clients": a.async_clients,
            "rollout_rc": out.returncode, "rollout_s": round(rollout_s, 2),
            "rollout": report,
            "phases": {ph: {"sent": sent[ph], "failed": dict(failed.get(ph, {})),
                            "p50_ms": _pct(lat.get(ph, []), 0.5),
                            "p99_ms": _pct(lat.get(ph, []), 0.99),
                            "mean_ms": round(statistics.fmean(lat[ph]) * 1000, 2)
                            if lat.get(ph) else 0.0}
                       for ph in phases},
            "events_accepted": len(accepted), "events_ran": len(ran & set(accepted)),
            "events_lost": len(set(accepted) - ran),
        }, indent=2))


if __name__ == "__main__":
    main()
