"""Function URL request -> handler -> response vs the same handler through Invoke, same run
(issue #15).

    python -m bench.function_urls [--requests 500] [--rounds 3]

Starts a region (its own state dir, ``cellcloud up --detach``), deploys one Python handler
that answers ``{"statusCode": 200, "body": "ok"}`` and gives it a public (AuthType NONE) and
an AWS_IAM function URL (on an alias, so the two URLs differ). Per round, interleaved, one
keep-alive ``http.client`` connection per mode sends ``--requests`` sequential requests:

- ``invoke``: POST .../invocations, SigV4-signed by botocore's signer (as boto3 would);
- ``url_none``: GET on the public URL's Host, unsigned;
- ``url_iam``: GET on the AWS_IAM URL's Host, SigV4-signed (service lambda).

Prints per round and the medians (requests/s, p50 and p99 latency in ms) and the ratios
url/invoke, as JSON. The client's signing time counts (a client pays it).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import statistics
import time
import urllib.parse
import zipfile
from collections.abc import Callable
from typing import Any

import botocore.auth
import botocore.awsrequest
import botocore.credentials

from bench.common.region import client, detached_region

CODE = 'def handler(event, context):\n    return {"statusCode": 200, "body": "ok"}\n'



def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("app.py", CODE)
    return buf.getvalue()


def _run(conn: http.client.HTTPConnection, n: int,
         request: Callable[[], tuple[str, str, bytes, dict[str, str]]]) -> dict[str, float]:
    lat: list[float] = []
    t0 = time.perf_counter()
    for _ in range(n):
        a = time.perf_counter()
        method, path, body, headers = request()
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        assert resp.status == 200, (resp.status, data)
        lat.append((time.perf_counter() - a) * 1000)
    total = time.perf_counter() - t0
    lat.sort()
    return {"req_per_s": round(n / total, 1), "p50_ms": round(lat[len(lat) // 2], 3),
            "p99_ms": round(lat[int(len(lat) * 0.99) - 1], 3)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with detached_region("cc-bench-urls-") as (state, doc):
        lam = client(doc, "lambda")
        name = "bench-url"
        lam.create_function(FunctionName=name, Runtime="python3.11", Handler="app.handler",
                            Role="arn:aws:iam::123456789012:role/bench",
                            Code={"ZipFile": _zip()})
        version = lam.publish_version(FunctionName=name)["Version"]
        lam.create_alias(FunctionName=name, Name="iam", FunctionVersion=version)
        url_none = lam.create_function_url_config(FunctionName=name,
                                                  AuthType="NONE")["FunctionUrl"]
        lam.add_permission(FunctionName=name, StatementId="public",
                           Action="lambda:InvokeFunctionUrl", Principal="*",
                           FunctionUrlAuthType="NONE")
        url_iam = lam.create_function_url_config(FunctionName=name, AuthType="AWS_IAM",
                                                 Qualifier="iam")["FunctionUrl"]
        ep = urllib.parse.urlsplit(doc["endpoint"])
        creds = botocore.credentials.Credentials(doc["access_key_id"], doc["secret_access_key"])

        def signed(method: str, url: str, body: bytes) -> dict[str, str]:
            req = botocore.awsrequest.AWSRequest(method=method, url=url, data=body)
            botocore.auth.SigV4Auth(creds, "lambda", doc["region"]).add_auth(req)
            return dict(req.headers.items())

        invoke_path = f"/2015-03-31/functions/{name}/invocations"

        def invoke() -> tuple[str, str, bytes, dict[str, str]]:
            return "POST", invoke_path, b"{}", signed("POST", doc["endpoint"] + invoke_path,
                                                      b"{}")

        none_host = urllib.parse.urlsplit(url_none).netloc
        iam_host = urllib.parse.urlsplit(url_iam).netloc

        def none() -> tuple[str, str, bytes, dict[str, str]]:
            return "GET", "/", b"", {"Host": none_host}

        def iam() -> tuple[str, str, bytes, dict[str, str]]:
            return "GET", "/", b"", {"Host": iam_host, **signed("GET", url_iam, b"")}

        modes = {"invoke": invoke, "url_none": none, "url_iam": iam}
        conns = {m: http.client.HTTPConnection(ep.hostname, ep.port, timeout=120)
                 for m in modes}
        for m, req in modes.items():  # warm: environments, leases, connections
            _run(conns[m], 50, req)
        out: dict[str, Any] = {"requests": args.requests, "load_1m": os.getloadavg()[0],
                               "rounds": {m: [] for m in modes}}
        for _ in range(args.rounds):
            for m, req in modes.items():
                out["rounds"][m].append(_run(conns[m], args.requests, req))
        med = {m: {k: statistics.median(r[k] for r in rs) for k in ("req_per_s", "p50_ms",
                                                                      "p99_ms")}
               for m, rs in out["rounds"].items()}
        out["median"] = med
        out["ratio_url_none_over_invoke_req_per_s"] = round(
            med["url_none"]["req_per_s"] / med["invoke"]["req_per_s"], 3)
        out["ratio_url_iam_over_invoke_req_per_s"] = round(
            med["url_iam"]["req_per_s"] / med["invoke"]["req_per_s"], 3)
        out["load_1m_after"] = os.getloadavg()[0]
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
