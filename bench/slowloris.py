"""Normal invoke latency with and without 5,000 stalled connections (issue #11).

    python -m bench.slowloris [--stalled 5000] [--phase-s 7]

Starts a region (its own state dir), deploys a tiny function, then measures sequential invokes
from one kept-alive client: (1) with nothing else connected, (2) while ``--stalled``
connections are held open against the router — a third send nothing, a third half a request
head, a third a signed-looking head and a body that stops — plus one body trickling a byte a
second. Prints p50/p99 of both phases, the failures, and how long the router took to close
every stalled connection. Goal: p99 under attack <= 1 s, no failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from io import BytesIO
from typing import Any

from cellcloud import sdk


def _zip(files: dict[str, str]) -> bytes:
    buf = BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return buf.getvalue()


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))] if s else float("nan")


def _invokes(client: sdk.Client, name: str, n: int,
             duration_s: float = 0.0) -> tuple[list[float], list[str]]:
    """``n`` sequential invokes, or as many as fit in ``duration_s`` when that is given."""
    lat: list[float] = []
    failures: list[str] = []
    end = time.monotonic() + duration_s
    i = 0
    while (i < n) if not duration_s else (time.monotonic() < end):
        i += 1
        t0 = time.perf_counter()
        try:
            got = client.invoke(name, {"i": i}).json()
            if got != {"i": i}:
                failures.append(repr(got))
        except Exception as e:
            failures.append(f"{type(e).__name__}: {e}")
        lat.append((time.perf_counter() - t0) * 1000)
    return lat, failures


def _stall(addr: tuple[str, int], n: int, akid: str) -> list[socket.socket]:
    socks = []
    head = (b"POST /2015-03-31/functions/x/invocations HTTP/1.1\r\nhost: x\r\n"
            b"authorization: AWS4-HMAC-SHA256 Credential=" + akid.encode() +
            b"/20260101/cc-local-1/lambda/aws4_request, SignedHeaders=host, Signature=" +
            b"0" * 64 + b"\r\ncontent-length: 100000\r\n\r\n{")
    for i in range(n):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(addr)
        socks.append(s)
        with contextlib.suppress(OSError):
            if i % 3 == 1:
                s.send(head[:40])
            elif i % 3 == 2:
                s.send(head)
    return socks


def _open_count(socks: list[socket.socket]) -> int:
    n = 0
    for s in socks:
        if s.fileno() < 0:
            continue
        try:
            if s.recv(65536) == b"":
                s.close()
                continue
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            continue
        n += 1
    return n


def run(stalled: int, duration_s: float) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    state_dir = tempfile.mkdtemp(prefix="cc-slowloris-")
    subprocess.run([sys.executable, "-m", "cellcloud", "up", "--detach", "--port", "0",
                    "--state-dir", state_dir], check=True, timeout=120)
    try:
        with open(os.path.join(state_dir, "region.json")) as f:
            doc = json.load(f)
        client = sdk.Client(doc["endpoint"], doc["api_key"], timeout_s=60)
        client.create_function("echo", _zip(
            {"app.py": "def handler(event, context):\n    return event\n"}), "app.handler")
        _invokes(client, "echo", 20)  # warm
        base, base_fail = _invokes(client, "echo", 0, duration_s)
        host, port = doc["endpoint"].removeprefix("http://").split(":")
        addr = (host, int(port))
        stop = threading.Event()

        def trickle() -> None:
            with contextlib.suppress(OSError), socket.create_connection(addr) as s:
                s.sendall(b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n")
                while not stop.wait(1.0):
                    s.sendall(b" ")

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        t_attack = time.monotonic()
        socks = _stall(addr, stalled, doc["access_key_id"])
        held = _open_count(socks)
        # Inside the stalled connections' header deadline (10 s): all of them are held.
        attacked, attacked_fail = _invokes(client, "echo", 0, duration_s)
        held_after = _open_count(socks)
        # How long until the router has closed them all (bounded).
        while _open_count(socks) and time.monotonic() - t_attack < 120:
            time.sleep(0.5)
        all_closed_s = time.monotonic() - t_attack
        left = _open_count(socks)
        stop.set()
        for s in socks:
            s.close()
        return {
            "stalled": stalled, "held_at_start": held, "held_after_phase": held_after,
            "phase_s": duration_s, "invokes": [len(base), len(attacked)],
            "baseline_ms": {"p50": round(_pct(base, 0.5), 2), "p99": round(_pct(base, 0.99), 2),
                            "failures": len(base_fail)},
            "under_attack_ms": {"p50": round(_pct(attacked, 0.5), 2),
                                "p99": round(_pct(attacked, 0.99), 2),
                                "failures": len(attacked_fail)},
            "stalled_all_closed_after_s": round(all_closed_s, 1), "stalled_left_open": left,
            "goal_p99_ms": 1000, "met": _pct(attacked, 0.99) <= 1000 and not attacked_fail,
        }
    finally:
        subprocess.run([sys.executable, "-m", "cellcloud", "down", "--state-dir", state_dir],
                       timeout=60)
        shutil.rmtree(state_dir, ignore_errors=True)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.slowloris")
    p.add_argument("--stalled", type=int, default=5000)
    p.add_argument("--phase-s", type=float, default=7.0,
                   help="seconds of sequential invokes in each phase (under 10: the stalled "
                        "connections' header deadline)")
    args = p.parse_args(argv)
    result = run(args.stalled, args.phase_s)
    print(json.dumps(result, indent=2))
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
