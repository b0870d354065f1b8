"""The SQS JSON protocol (``X-Amz-Target: AmazonSQS.<Op>``, ``application/x-amz-json-1.0``)
over :class:`QueueStore`: what boto3's ``sqs`` client sends, answered as SQS answers.

A request is ``{"target", "b" (body), "a" (account), "host"}`` from the router (or from the
cell's dispatcher, which sends destination records); the reply is ``{"s", "h", "b"}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from ..core import params
from ..core.jsondepth import json_depth_within
from ..core.limits import DEFAULT_LIMITS
from .store import (
    QueueError,
    QueueStore,
    invalid,
    message_bytes_max,
    no_such_queue,
    receive_batch_max,
    retention_s_max,
    visibility_timeout_s_max,
)

log = logging.getLogger("cellcloud.queues")

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,80}$")
_JSON = "application/x-amz-json-1.0"
wait_time_s_max = 20
long_poll_interval_s = 0.2
delay_s_max = 900
#: the queue attributes the region honours, with SQS's ranges (core/params.py refuses the rest)
_ATTR_RANGES = {"VisibilityTimeout": (0, visibility_timeout_s_max),
                "MessageRetentionPeriod": (60, retention_s_max),
                "DelaySeconds": (0, delay_s_max),
                "ReceiveMessageWaitTimeSeconds": (0, wait_time_s_max),
                "MaximumMessageSize": (1024, message_bytes_max)}
_ATTR_DEFAULTS = {"VisibilityTimeout": "30", "MessageRetentionPeriod": "345600",
                  "DelaySeconds": "0", "MaximumMessageSize": str(message_bytes_max),
                  "ReceiveMessageWaitTimeSeconds": "0"}


def _now_ms() -> int:
    return int(time.time() * 1000)


def queue_arn(region: str, account: str, name: str) -> str:
    return f"arn:aws:sqs:{region}:{account}:{name}"


class QueueApi:
    def __init__(self, store: QueueStore, region: str,
                 now_ms: Callable[[], int] = _now_ms) -> None:
        self.store = store
        self.region = region
        self.now_ms = now_ms
        self.counters = {"sent": 0, "received": 0, "deleted": 0}

    def _url(self, req: dict[str, Any], name: str) -> str:
        host = req.get("host") or "cellcloud.internal"
        return f"http://{host}/{req['a']}/{name}"

    def _queue(self, req: dict[str, Any], doc: dict[str, Any]) -> str:
        url = doc.get("QueueUrl")
        if not isinstance(url, str) or not url:
            raise invalid("QueueUrl is required")
        parts = urlsplit(url).path.strip("/").split("/")
        if len(parts) != 2 or parts[0] != req["a"] or not _NAME.match(parts[1]):
            raise no_such_queue()
        if not self.store.exists(req["a"], parts[1]):
            raise no_such_queue()
        return parts[1]

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = str(req.get("target", "")).removeprefix("AmazonSQS.")
        try:
            raw = req.get("b") or b"{}"
            if not json_depth_within(raw, DEFAULT_LIMITS.json_depth_max):
                raise invalid(f"The request body nests deeper than "
                              f"{DEFAULT_LIMITS.json_depth_max} levels")
            try:
                doc = json.loads(raw)
            except ValueError:
                raise invalid("The request body is not valid JSON") from None
            if not isinstance(doc, dict):
                raise invalid("The request body must be a JSON object")
            fn = getattr(self, f"op_{op}", None)
            if fn is None:
                raise QueueError("UnsupportedOperation", "AWS.SimpleQueueService.UnsupportedOperation",
                                 f"cellcloud queues do not support {op}")
            found = params.refusal(params.SQS, op, doc, ctx={"account": str(req.get("a"))})
            if found is not None:
                attr = found.name.removeprefix("Attributes.")
                if attr != found.name and f"Attributes.{attr}" not in params.SQS[op]:
                    raise QueueError("InvalidAttributeName", "InvalidAttributeName",
                                     f"Unknown Attribute {attr}.")
                raise invalid(found.message)
            result = await fn(req, doc)
            return {"s": 200, "h": {"content-type": _JSON}, "b": json.dumps(result).encode()}
        except QueueError as e:
            return {"s": e.status,
                    "h": {"content-type": _JSON, "x-amzn-query-error": f"{e.code};Sender"},
                    "b": json.dumps({"__type": f"com.amazonaws.sqs#{e.type}",
                                     "message": e.message}).encode()}
        except Exception as e:  # a bug: answer SQS-shaped, keep serving
            log.exception("queues: %s", op)
            return {"s": 500, "h": {"content-type": _JSON},
                    "b": json.dumps({"__type": "com.amazonaws.sqs#InternalError",
                                     "message": f"Internal error: {type(e).__name__}"}).encode()}

    async def op_CreateQueue(self, req: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
        name = doc.get("QueueName")
        if not isinstance(name, str) or not _NAME.match(name):
            raise invalid("Can only include alphanumeric characters, hyphens, or underscores. "
                          "1 to 80 in length")
        attrs = doc.get("Attributes") or {}
        if not isinstance(attrs, dict):
            raise invalid("Attributes must be a map of attribute name to value")
        for k, v in attrs.items():
            low, high = _ATTR_RANGES[k]  # core/params.py let only these through
            if not str(v).isdigit() or not low <= int(v) <= high:
                raise QueueError("InvalidAttributeValue", "InvalidAttributeValue",
                                 f"Invalid value for the parameter {k}: must be an integer "
                                 f"from {low} to {high}.")
        self.store.create(req["a"], name, {k: str(int(v)) for k, v in attrs.items()},
                          self.now_ms())
        return {"QueueUrl": self._url(req, name)}

    async def op_GetQueueUrl(self, req: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
        name = doc.get("QueueName")
        if not isinstance(name, str) or not self.store.exists(req["a"], name):
            raise no_such_queue()
        return {"QueueUrl": self._url(req, name)}

    async def op_ListQueues(self, req: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
        names = self.store.list_names(req["a"], str(doc.get("QueueNamePrefix") or ""))
        return {"QueueUrls": [self._url(req, n) for n in names]}

    async def op_DeleteQueue(self, req: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
        self.store.delete_queue(req["a"], self._queue(req, doc))
        return {}

    async def op_PurgeQueue(self, req: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
        self.store.purge(req["a"], self._queue(req, doc))
        return {}

    async def op_SendMessage(self, req: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
        name = self._queue(req, doc)
        body = doc.get("MessageBody")
        if not isinstance(body, str) or not body:
            raise invalid("The request must contain the parameter MessageBody.")
        _, attrs = self.store.attributes(req["a"], name)
        delay = doc.get("DelaySeconds")
        if delay is None:  # the queue's own delay
            delay = int(attrs.get("DelaySeconds", 0))
        if isinstance(delay, bool) or not isinstance(delay, int) or not 0 <= delay <= delay_s_max:
            raise invalid(f"DelaySeconds must be between 0 and {delay_s_max}")
        size_max = int(attrs.get("MaximumMessageSize", message_bytes_max))
        if len(body.encode()) > size_max:
            raise invalid(f"One or more parameters are invalid. Reason: Message must be shorter "
                          f"than {size_max} bytes.")
        m = self.store.send(req["a"], name, body, self.now_ms(), delay)
        self.counters["sent"] += 1
        return {"MessageId": m.id, "MD5OfMessageBody": m.md5}

    async def op_ReceiveMessage(self, req: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
        name = self._queue(req, doc)
        n = doc.get("MaxNumberOfMessages") or 1
        if not isinstance(n, int) or not 1 <= n <= receive_batch_max:
            raise invalid(f"MaxNumberOfMessages must be between 1 and {receive_batch_max}")
        vis = doc.get("VisibilityTimeout")
        wait = doc.get("WaitTimeSeconds")
        if wait is None:  # the queue's own long-poll wait
            wait = int(self.store.attributes(req["a"], name)[1].get(
                "ReceiveMessageWaitTimeSeconds", 0))
        if not isinstance(wait, int) or not 0 <= wait <= wait_time_s_max:
            raise invalid(f"WaitTimeSeconds must be between 0 and {wait_time_s_max}")
        deadline = time.monotonic() + wait
        while True:
            msgs = self.store.receive(req["a"], name, n, vis, self.now_ms())
            if msgs or time.monotonic() >= deadline:
                break
            await asyncio.sleep(long_poll_interval_s)  # long poll: re-check until the deadline
        self.counters["received"] += len(msgs)
        # Only the system attributes asked for (AttributeNames is the older name of
        # MessageSystemAttributeNames); cellcloud keeps these two.
        wanted = set(doc.get("AttributeNames") or []) | set(
            doc.get("MessageSystemAttributeNames") or [])
        out = []
        for m in msgs:
            every = {"ApproximateReceiveCount": str(m.receive_count),
                     "SentTimestamp": str(m.sent_ms)}
            attrs = every if "All" in wanted else {k: v for k, v in every.items() if k in wanted}
            out.append({"MessageId": m.id, "ReceiptHandle": m.receipt, "MD5OfBody": m.md5,
                        "Body": m.body, **({"Attributes": attrs} if attrs else {})})
        return {"Messages": out} if out else {}

    async def op_DeleteMessage(self, req: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
        name = self._queue(req, doc)
        receipt = doc.get("ReceiptHandle")
        if not isinstance(receipt, str) or not receipt:
            raise QueueError("ReceiptHandleIsInvalid", "ReceiptHandleIsInvalid",
                             "The input receipt handle is invalid.")
        self.store.delete(req["a"], name, receipt)
        self.counters["deleted"] += 1
        return {}

    async def op_DeleteMessageBatch(self, req: dict[str, Any],
                                    doc: dict[str, Any]) -> dict[str, Any]:
        name = self._queue(req, doc)
        ok = []
        for entry in (doc.get("Entries") or [])[:receive_batch_max]:
            self.store.delete(req["a"], name, str(entry.get("ReceiptHandle", "")))
            ok.append({"Id": entry.get("Id")})
        self.counters["deleted"] += len(ok)
        return {"Successful": ok, "Failed": []}

    async def op_GetQueueAttributes(self, req: dict[str, Any],
                                    doc: dict[str, Any]) -> dict[str, Any]:
        name = self._queue(req, doc)
        created, attrs = self.store.attributes(req["a"], name)
        visible, hidden = self.store.counts(req["a"], name, self.now_ms())
        every = {
            "QueueArn": queue_arn(self.region, req["a"], name),
            "ApproximateNumberOfMessages": str(visible),
            "ApproximateNumberOfMessagesNotVisible": str(hidden),
            "CreatedTimestamp": str(created // 1000),
            **{k: attrs.get(k, v) for k, v in _ATTR_DEFAULTS.items()},
        }
        wanted = doc.get("AttributeNames") or ["All"]
        if "All" in wanted:
            return {"Attributes": every}
        return {"Attributes": {k: v for k, v in every.items() if k in wanted}}
