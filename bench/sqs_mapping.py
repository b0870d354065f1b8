"""SQS event source mappings end to end (issue #15): messages per second through a mapping
with batch size 10 and 100, and the added delay (send → handler start) against a direct
Invoke of the same handler, in the same run.

    python -m bench.sqs_mapping [--messages 5000] [--rounds 2] [--probes 30]

Starts a region (its own state dir, ``cellcloud up --detach``). Per round and batch size:

* throughput: ``--messages`` messages are sent to a fresh queue while its mapping is
  disabled, then the mapping is enabled; the clock runs from the enable until the queue is
  empty (every message deleted after the function succeeded with it);
* delay: ``--probes`` messages are sent one at a time (0.2 s apart) to the enabled mapping;
  each carries its send time, the handler logs ``now - sent`` at its start; the same number of
  direct ``Invoke`` calls carry theirs and the handler returns the same difference. Same
  machine clock for both ends.

Batch size 100 needs a batching window (1 s, Lambda's rule), which a lone message waits out:
that is the mapping's behaviour, and reported as it is. Prints JSON (per round, medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from typing import Any

import boto3
from botocore.config import Config

from bench.common.region import detached_region
from cellcloud import sdk

HANDLER = '''
import json, time


def handler(event, context):
    now = time.time()
    if "Records" in event:
        lags = [round((now - json.loads(r["body"])["t"]) * 1000, 3) for r in event["Records"]
                if json.loads(r["body"]).get("probe")]
        if lags:
            print("LAG " + json.dumps(lags))
        return {}
    return {"lag_ms": (now - event["t"]) * 1000}
'''


def _zip(files: dict[str, str]) -> bytes:
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return buf.getvalue()


def _wait(cond: Any, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("the mapping did not finish in time")
        time.sleep(0.05)


def _state(lam: Any, u: str) -> str:
    return str(lam.get_event_source_mapping(UUID=u)["State"])


def _round(lam: Any, sqs: Any, logs: sdk.Client, doc: dict[str, Any], fn: str, n: int,
           batch: int, probes: int) -> dict[str, Any]:
    q = f"bench-esm-{uuid.uuid4().hex[:8]}"
    url = sqs.create_queue(QueueName=q, Attributes={"VisibilityTimeout": "60"})["QueueUrl"]
    arn = f"arn:aws:sqs:{doc['region']}:{doc['account_id']}:{q}"
    kw = {"MaximumBatchingWindowInSeconds": 1} if batch > 10 else {}
    m = lam.create_event_source_mapping(FunctionName=fn, EventSourceArn=arn, BatchSize=batch,
                                        Enabled=False, **kw)
    _wait(lambda: _state(lam, m["UUID"]) == "Disabled")
    body = json.dumps({"t": 0, "pad": "x" * 100})
    for i in range(0, n, 10):
        r = sqs.send_message_batch(QueueUrl=url, Entries=[
            {"Id": str(j), "MessageBody": body} for j in range(min(10, n - i))])
        assert not r.get("Failed"), r

    def empty() -> bool:
        a = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        return int(a["ApproximateNumberOfMessages"]) + int(
            a["ApproximateNumberOfMessagesNotVisible"]) == 0

    t0 = time.monotonic()
    lam.update_event_source_mapping(UUID=m["UUID"], Enabled=True)
    _wait(empty)
    total = time.monotonic() - t0
    # the delay: lone messages to the enabled mapping, then direct invokes of the handler
    before = len([e for e in logs.logs(fn, 1000) if "LAG " in e["message"]])
    for _ in range(probes):
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"t": time.time(),
                                                               "probe": True}))
        time.sleep(0.2)
    lags: list[float] = []

    def seen() -> bool:
        lags.clear()
        for e in logs.logs(fn, 1000):
            for line in e["message"].splitlines():
                if line.startswith("LAG "):
                    lags.extend(json.loads(line[4:]))
        return len(lags) >= before + probes

    _wait(seen, 120)
    mapped = lags[-probes:]
    direct = []
    for _ in range(probes):
        out = lam.invoke(FunctionName=fn, Payload=json.dumps({"t": time.time()}).encode())
        direct.append(json.loads(out["Payload"].read())["lag_ms"])
        time.sleep(0.2)
    lam.delete_event_source_mapping(UUID=m["UUID"])
    return {"batch_size": batch, "messages": n, "total_s": round(total, 3),
            "messages_per_s": round(n / total, 1),
            "delay_ms_p50_mapping": round(statistics.median(mapped), 2),
            "delay_ms_p50_invoke": round(statistics.median(direct), 2),
            "added_ms_p50": round(statistics.median(mapped) - statistics.median(direct), 2),
            "delay_ms_max_mapping": round(max(mapped), 2)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--probes", type=int, default=30)
    args = p.parse_args()
    with detached_region("cc-bench-esm-") as (state, doc):
        cfg = Config(retries={"mode": "standard", "total_max_attempts": 1}, read_timeout=120)
        creds = {"endpoint_url": doc["endpoint"], "region_name": doc["region"],
                 "aws_access_key_id": doc["access_key_id"],
                 "aws_secret_access_key": doc["secret_access_key"], "config": cfg}
        sqs = boto3.client("sqs", **creds)
        lam = boto3.client("lambda", **creds)
        logs = sdk.Client(doc["endpoint"], doc["api_key"], timeout_s=60)
        fn = f"bench-esm-{uuid.uuid4().hex[:8]}"
        lam.create_function(FunctionName=fn, Runtime="python3.11", Handler="app.handler",
                            Role="arn:aws:iam::123456789012:role/bench",
                            Code={"ZipFile": _zip({"app.py": HANDLER})}, Timeout=30)
        out: dict[str, Any] = {"messages": args.messages, "rounds": []}
        for r in range(args.rounds):
            for batch in (10, 100):
                res = _round(lam, sqs, logs, doc, fn, args.messages, batch, args.probes)
                out["rounds"].append(res)
                print(r, json.dumps(res), flush=True)
        out["median"] = {
            str(b): {k: statistics.median(x[k] for x in out["rounds"] if x["batch_size"] == b)
                     for k in ("messages_per_s", "delay_ms_p50_mapping", "delay_ms_p50_invoke",
                               "added_ms_p50")}
            for b in (10, 100)}
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
