"""Micro-benchmark: SigV4 verify() with our canonicaliser against the botocore-based one it
replaced, in the same run.

The old verifier is the module as it was at ``--old-rev`` (default: the last commit where it
rebuilt the request as botocore's ``AWSRequest``), loaded from git beside the current one.
Both verify the same boto3-shaped requests (an Invoke as boto3 signs it, with and without a
qualifier and an encoded ARN in the path); each is timed over the same number of calls,
interleaved in rounds, and the median round is reported.

Run from the repository root:  python -m bench.sigv4 [--calls N] [--rounds R]
Benchmarks are not tests: nothing here asserts beyond both verifiers accepting the requests.
"""

from __future__ import annotations

import argparse
import calendar
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from types import ModuleType
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from cellcloud.security import sigv4

OLD_REV = "5c7e6f4"  # src/cellcloud/security/sigv4.py with botocore's canonicaliser
REGION = "cc-local-1"
AKID, SECRET = "AKIABENCH0000000", "bench-secret-key/0123456789abcdefghij"
CASES = {
    "invoke": ("/2015-03-31/functions/bench-add/invocations", ""),
    "invoke arn + qualifier": (
        "/2015-03-31/functions/arn%3Aaws%3Alambda%3Acc-local-1%3A000000000001%3Afunction"
        "%3Abench-add/invocations", "Qualifier=live"),
}


def load_old(rev: str) -> ModuleType:
    src = subprocess.run(["git", "show", f"{rev}:src/cellcloud/security/sigv4.py"],
                         check=True, capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("cellcloud.security._sigv4_old", loader=None)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "cellcloud.security"  # its relative imports resolve to the live package
    sys.modules[spec.name] = mod  # dataclasses look their module up
    exec(compile(src, f"{rev}:sigv4.py", "exec"), mod.__dict__)
    return mod


def signed_request(path: str, query: str) -> dict[str, Any]:
    """A request as boto3's Invoke sends it (the headers it signs and the ones it does not)."""
    body = b'{"a": 1, "b": 2}'
    url = f"http://127.0.0.1:8080{path}" + (f"?{query}" if query else "")
    req = AWSRequest(method="POST", url=url, data=body, headers={
        "X-Amz-Invocation-Type": "RequestResponse", "X-Amz-Log-Type": "None",
        "User-Agent": "Boto3/1.35.0 md/Botocore#1.35.0 ua/2.0 os/linux#6.1 lang/python#3.11.7",
        "amz-sdk-invocation-id": "5c1d7a4e-1b0e-4c5f-9d1a-0d6c3c1e4f11",
        "amz-sdk-request": "attempt=1", "Content-Length": str(len(body))})
    SigV4Auth(Credentials(AKID, SECRET), "lambda", REGION).add_auth(req)
    headers = [(k.lower(), v) for k, v in req.headers.items()] + [("host", "127.0.0.1:8080")]
    amz = req.headers["X-Amz-Date"]
    return {"method": "POST", "raw_path": path, "raw_query": query, "headers": headers,
            "body": body, "region": REGION, "secret_for": {AKID: SECRET}.get,
            "now_s": calendar.timegm(time.strptime(amz, "%Y%m%dT%H%M%SZ"))}


def per_call_us(verify: Any, req: dict[str, Any], calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        verify(**req)
    return 1e6 * (time.perf_counter() - t) / calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sigv4", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000, help="verify() calls per round")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median kept)")
    ap.add_argument("--old-rev", default=OLD_REV, help="git revision of the old verifier")
    ap.add_argument("--json", default=None, help="result file (default bench/results/...)")
    args = ap.parse_args(argv)
    old = load_old(args.old_rev)
    result: dict[str, Any] = {"command": "python -m bench.sigv4 " + " ".join(
        argv if argv is not None else sys.argv[1:]), "old_rev": args.old_rev,
        "calls": args.calls, "rounds": args.rounds, "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(), "cases": {}}
    print(f"verify() per call, median of {args.rounds} interleaved rounds of {args.calls} "
          f"calls (old = {args.old_rev}, botocore canonicaliser; new = this tree)")
    for name, (path, query) in CASES.items():
        req = signed_request(path, query)
        assert old.verify(**req).access_key_id == AKID
        assert sigv4.verify(**req).access_key_id == AKID
        per_call_us(old.verify, req, 200)  # warm both (signing-key cache, regexes)
        per_call_us(sigv4.verify, req, 200)
        olds, news = [], []
        for _ in range(args.rounds):
            olds.append(per_call_us(old.verify, req, args.calls))
            news.append(per_call_us(sigv4.verify, req, args.calls))
        o, n = statistics.median(olds), statistics.median(news)
        result["cases"][name] = {"old_us": o, "new_us": n, "ratio": o / n,
                                 "old_rounds_us": olds, "new_rounds_us": news}
        print(f"  {name:<24} old {o:7.1f} us   new {n:6.1f} us   old/new = {o / n:.1f}x")
    out = args.json or os.path.join("bench", "results", time.strftime(
        "sigv4-%Y%m%dT%H%M%SZ.json", time.gmtime()))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
