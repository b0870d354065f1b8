"""SQS throughput through a real region (issue #22): messages per second for send -> receive
-> delete, one message per call vs batches of 10, interleaved in the same run.

    python -m bench.sqs [--messages 2000] [--rounds 3]

Starts a region (its own state dir, ``cellcloud up --detach``), then per round and mode:
sends ``--messages`` messages (SendMessage, or SendMessageBatch of 10), receives them
(ReceiveMessage with MaxNumberOfMessages 1, or 10) and deletes them (DeleteMessage, or
DeleteMessageBatch of 10), one boto3 client, sequential calls through the router (SigV4,
JSON protocol) to the cell's SQLite-backed queues. A message counts once it is deleted.
Prints per round and the medians as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from bench.common.region import client, detached_region


def _round(sqs: Any, url: str, n: int, batch: int) -> dict[str, float]:
    t0 = time.monotonic()
    for i in range(0, n, batch):
        if batch == 1:
            sqs.send_message(QueueUrl=url, MessageBody=f"m{i}")
        else:
            r = sqs.send_message_batch(QueueUrl=url, Entries=[
                {"Id": str(j), "MessageBody": f"m{i + j}"} for j in range(min(batch, n - i))])
            assert not r.get("Failed"), r
    t1 = time.monotonic()
    done = 0
    receive_s = delete_s = 0.0
    while done < n:
        a = time.monotonic()
        msgs = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=batch,
                                   VisibilityTimeout=300).get("Messages", [])
        b = time.monotonic()
        if batch == 1:
            for m in msgs:
                sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
        elif msgs:
            r = sqs.delete_message_batch(QueueUrl=url, Entries=[
                {"Id": str(j), "ReceiptHandle": m["ReceiptHandle"]} for j, m in enumerate(msgs)])
            assert not r.get("Failed"), r
        receive_s += b - a
        delete_s += time.monotonic() - b
        done += len(msgs)
    total = time.monotonic() - t0
    return {"messages": n, "send_s": round(t1 - t0, 3), "receive_s": round(receive_s, 3),
            "delete_s": round(delete_s, 3), "total_s": round(total, 3),
            "messages_per_s": round(n / total, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with detached_region("cc-bench-sqs-") as (state, doc):
        sqs = client(doc, "sqs")
        out: dict[str, Any] = {"messages": args.messages, "rounds": {"single": [], "batch10": []}}
        for r in range(args.rounds):
            for mode, batch in (("single", 1), ("batch10", 10)):
                url = sqs.create_queue(QueueName=f"bench-{mode}-{r}")["QueueUrl"]
                res = _round(sqs, url, args.messages, batch)
                out["rounds"][mode].append(res)
                print(mode, r, json.dumps(res), flush=True)
        out["median_messages_per_s"] = {
            mode: statistics.median(x["messages_per_s"] for x in rs)
            for mode, rs in out["rounds"].items()}
        out["speedup"] = round(out["median_messages_per_s"]["batch10"]
                               / out["median_messages_per_s"]["single"], 2)
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
