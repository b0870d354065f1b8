"""The SQS JSON protocol (``X-Amz-Target: AmazonSQS.<Op>``, ``application/x-amz-json-1.0``)
over :class:`QueueStore`: what boto3's ``sqs`` client sends, answered as SQS answers.

A request is ``{"target", "b" (body), "a" (account), "host"}`` from the router (or from the
cell's dispatcher, which sends destination records); the reply is ``{"s", "h", "b"}``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from ..core import fifo, params
from ..core.jsondepth import json_depth_within
from ..core.limits import DEFAULT_LIMITS
from . import query
from .store import (
    Message,
    Outgoing,
    QueueError,
    QueueStore,
    invalid,
    md5_of_attributes,
    message_bytes_max,
    no_such_queue,
    receipt_invalid,
    receive_batch_max,
    retention_s_max,
    visibility_timeout_s_max,
)

log = logging.getLogger("cellcloud.queues")

_NAME = re.compile(r"^(?=.{1,80}$)[a-zA-Z0-9_-]+(\.fifo)?$")
_GROUP_ID = re.compile(r"^[!-~]{1,128}$")
#: a FIFO queue's attributes and their defaults
_FIFO_DEFAULTS = {"FifoQueue": "true", "ContentBasedDeduplication": "false",
                  "DeduplicationScope": "queue", "FifoThroughputLimit": "perQueue"}
#: how long a ReceiveRequestAttemptId is remembered
receive_attempt_ms = 300_000
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


_ATTR_NAME = re.compile(r"^[a-zA-Z0-9_.-]{1,256}$")
_DATA_TYPE = re.compile(r"^(String|Number|Binary)(\.[a-zA-Z0-9_.-]{1,246})?$")
_BATCH_ID = re.compile(r"^[a-zA-Z0-9_-]{1,80}$")
_TAG_KEY = re.compile(r"^[\w\s+=.:/@-]{1,128}$")
message_attributes_max = 10
tags_per_queue_max = 50
max_receive_count_max = 1000
#: the system attributes ReceiveMessage can return
_SYSTEM_ATTRS = ("ApproximateFirstReceiveTimestamp", "ApproximateReceiveCount", "SenderId",
                 "SentTimestamp", "AWSTraceHeader")


def _bad_attr(msg: str) -> QueueError:
    return invalid(msg)


def check_message_attributes(attrs: Any, *, system: bool = False) -> tuple[dict[str, Any], int]:
    """Validated message (or system) attributes as stored, and their size in bytes
    (counted into the message's size as SQS counts it: name + type + value)."""
    if attrs is None:
        return {}, 0
    if not isinstance(attrs, dict):
        raise invalid("MessageAttributes must be a map")
    if len(attrs) > message_attributes_max:
        raise invalid(f"Number of message attributes [{len(attrs)}] exceeds the allowed "
                      f"maximum [{message_attributes_max}].")
    out: dict[str, Any] = {}
    size = 0
    for name, a in attrs.items():
        if system:
            if name != "AWSTraceHeader":
                raise invalid(f"Message system attribute name '{name}' is invalid.")
        elif (not isinstance(name, str) or not _ATTR_NAME.match(name) or name.startswith(".")
              or name.endswith(".") or ".." in name
              or name.lower().startswith(("aws.", "amazon."))):
            raise invalid(f"Message attribute name '{name}' is invalid.")
        if not isinstance(a, dict):
            raise invalid(f"The message attribute '{name}' must be a structure.")
        unknown = set(a) - {"DataType", "StringValue", "BinaryValue", "StringListValues",
                            "BinaryListValues"}
        if unknown or a.get("StringListValues") or a.get("BinaryListValues"):
            raise invalid(f"The message attribute '{name}' has an unsupported member "
                          "(list values are reserved by SQS for future use).")
        dtype = a.get("DataType")
        if not isinstance(dtype, str) or not _DATA_TYPE.match(dtype) or (
                system and dtype != "String"):
            raise invalid(f"The message attribute '{name}' has an invalid message attribute "
                          f"type, the set of supported type prefixes is Binary, Number, and "
                          f"String.")
        if dtype.startswith("Binary"):
            bv = a.get("BinaryValue")
            if not isinstance(bv, str) or not bv or a.get("StringValue") is not None:
                raise invalid(f"The message attribute '{name}' with type 'Binary' must use "
                              f"field 'Binary'.")
            try:
                raw = base64.b64decode(bv, validate=True)
            except ValueError:
                raise invalid(f"The message attribute '{name}' has an invalid binary "
                              "value.") from None
            if not raw:
                raise invalid(f"The message attribute '{name}' must contain non-empty "
                              "message attribute value.")
            out[name] = {"DataType": dtype, "BinaryValue": bv}
            size += len(raw)
        else:
            sv = a.get("StringValue")
            if not isinstance(sv, str) or not sv or a.get("BinaryValue") is not None:
                raise invalid(f"The message attribute '{name}' must contain non-empty "
                              "message attribute value for message attribute type "
                              f"'{dtype.split('.')[0]}'.")
            if dtype.startswith("Number"):
                try:
                    float(sv)
                except ValueError:
                    raise invalid(f"Can't cast the value of message (user) attribute "
                                  f"'{name}' to a number.") from None
            out[name] = {"DataType": dtype, "StringValue": sv}
            size += len(sv.encode())
        size += len(name.encode()) + len(dtype.encode())
    return out, size


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
        #: message move tasks, newest first, per (account, source queue ARN); kept in memory
        #: (a task has completed before StartMessageMoveTask answers)
        self.tasks: dict[tuple[str, str], list[dict[str, Any]]] = {}
        #: ReceiveRequestAttemptId -> (when, the answer), per (account, queue), for 5 minutes
        self.attempts: dict[tuple[str, str, str], tuple[int, dict[str, Any]]] = {}
        #: called with (account, queue) after messages were sent to a queue (the event source
        #: mappings' pollers wake up instead of waiting for their next poll)
        self.sent_listeners: list[Callable[[str, str], None]] = []

    def _sent_to(self, account: str, name: str) -> None:
        for listener in self.sent_listeners:
            listener(account, name)

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
        """A JSON-protocol request, or (``req["proto"] == "query"``) a query-protocol one."""
        if req.get("proto") == "query":
            return await self._handle_query(req)
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
            result = await self._run(req, op, doc)
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

    async def _handle_query(self, req: dict[str, Any]) -> dict[str, Any]:
        rid = str(uuid.uuid4())
        op = ""
        try:
            op, doc = query.parse(req.get("b") or b"", str(req.get("q") or ""))
            path = str(req.get("p") or "/").rstrip("/")
            # an older client posts to the queue's own URL instead of naming it
            if "QueueUrl" not in doc and path.count("/") == 2 and "QueueUrl" in params.SQS.get(
                    op, {}):
                doc["QueueUrl"] = f"http://{req.get('host') or 'cellcloud.internal'}{path}"
            result = await self._run(req, op, doc)
            return {"s": 200, "h": {"content-type": query.XML},
                    "b": query.response(op, result, rid)}
        except QueueError as e:
            return {"s": e.status, "h": {"content-type": query.XML}, "b": query.error(e, rid)}
        except Exception as e:  # a bug: answer SQS-shaped, keep serving
            log.exception("queues (query): %s", op)
            return {"s": 500, "h": {"content-type": query.XML},
                    "b": query.error(QueueError("InternalError", "InternalError",
                                                f"Internal error: {type(e).__name__}", 500),
                                     rid)}

    async def _run(self, req: dict[str, Any], op: str, doc: dict[str, Any]) -> dict[str, Any]:
        fn = getattr(self, f"op_{op}", None)
        if fn is None or op not in params.SQS:
            raise QueueError("UnsupportedOperation", "AWS.SimpleQueueService.UnsupportedOperation",
                             f"cellcloud queues do not support {op}")
        found = params.refusal(params.SQS, op, doc, ctx={"account": str(req.get("a"))})
        if found is not None:
            attr = found.name.removeprefix("Attributes.")
            if attr != found.name and f"Attributes.{attr}" not in params.SQS[op]:
                raise QueueError("InvalidAttributeName", "InvalidAttributeName",
                                 f"Unknown Attribute {attr}.")
            raise invalid(found.message)
        result: dict[str, Any] = await fn(req, doc)
        return result

    def _check_queue_attributes(self, req: dict[str, Any], name: str,
                                attrs: Any) -> dict[str, str]:
        """Validated queue attributes as stored (all or none)."""
        if not isinstance(attrs, dict):
            raise invalid("Attributes must be a map of attribute name to value")
        out: dict[str, str] = {}
        for k, v in attrs.items():
            if k in _ATTR_RANGES:
                low, high = _ATTR_RANGES[k]  # core/params.py let only known ones through
                if not str(v).isdigit() or not low <= int(v) <= high:
                    raise QueueError("InvalidAttributeValue", "InvalidAttributeValue",
                                     f"Invalid value for the parameter {k}: must be an integer "
                                     f"from {low} to {high}.")
                out[k] = str(int(v))
            elif k == "RedrivePolicy":
                out[k] = self._check_redrive_policy(req, name, v)
            elif k == "RedriveAllowPolicy":
                out[k] = _check_redrive_allow_policy(v)
            elif k in _FIFO_DEFAULTS and fifo.is_fifo(name):
                out[k] = str(v)
            else:
                raise QueueError("InvalidAttributeName", "InvalidAttributeName",
                                 f"Unknown Attribute {k}.")
        if fifo.is_fifo(name):
            if out.get("FifoQueue", "true") != "true":
                raise QueueError("InvalidAttributeValue", "InvalidAttributeValue",
                                 "Invalid value for the parameter FifoQueue: a queue whose "
                                 "name ends .fifo is a FIFO queue.")
            current = self.store.attributes(req["a"], name)[1] if self.store.exists(
                req["a"], name) else {}
            merged = {**_FIFO_DEFAULTS, **current, **out}
            try:
                fifo.check_settings(merged["ContentBasedDeduplication"],
                                    merged["DeduplicationScope"], merged["FifoThroughputLimit"])
            except fifo.FifoError as e:
                raise QueueError("InvalidAttributeValue", "InvalidAttributeValue",
                                 str(e)) from None
        return out

    def _check_redrive_policy(self, req: dict[str, Any], name: str, v: Any) -> str:
        if v == "":
            return ""
        bad = f"Value {v} for parameter RedrivePolicy is invalid. Reason: "
        try:
            doc = json.loads(v) if isinstance(v, str) else None
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or set(doc) != {"deadLetterTargetArn", "maxReceiveCount"}:
            raise QueueError("InvalidAttributeValue", "InvalidAttributeValue",
                             bad + "Redrive policy is not a valid JSON map with "
                                   "deadLetterTargetArn and maxReceiveCount.")
        count = doc["maxReceiveCount"]
        if isinstance(count, bool) or not (isinstance(count, int) or (
                isinstance(count, str) and count.isdigit())) or not (
                1 <= int(count) <= max_receive_count_max):
            raise QueueError("InvalidAttributeValue", "InvalidAttributeValue",
                             bad + f"Invalid value for maxReceiveCount: {count}, valid values "
                                   f"are from 1 to {max_receive_count_max} both inclusive.")
        arn = doc["deadLetterTargetArn"]
        prefix = f"arn:aws:sqs:{self.region}:{req['a']}:"
        dlq = arn[len(prefix):] if isinstance(arn, str) and arn.startswith(prefix) else ""
        if not _NAME.match(dlq) or not self.store.exists(req["a"], dlq):
            raise QueueError("InvalidAttributeValue", "InvalidAttributeValue",
                             bad + "Dead letter target does not exist.")
        if fifo.is_fifo(dlq) != fifo.is_fifo(name):
            raise QueueError("InvalidAttributeValue", "InvalidAttributeValue",
                             bad + "Dead-letter queue must be of the same type as the source "
                                   "queue (FIFO or standard).")
        if dlq == name:
            raise QueueError("InvalidAttributeValue", "InvalidAttributeValue",
                             bad + "A queue cannot be its own dead-letter queue.")
        allow = self.store.attributes(req["a"], dlq)[1].get("RedriveAllowPolicy")
        if allow:
            policy = json.loads(allow)
            source = queue_arn(self.region, req["a"], name)
            if policy["redrivePermission"] == "denyAll" or (
                    policy["redrivePermission"] == "byQueue"
                    and source not in policy.get("sourceQueueArns", [])):
                raise QueueError("InvalidAttributeValue", "InvalidAttributeValue",
                                 bad + "The dead-letter queue's RedriveAllowPolicy does not "
                                       "allow this queue as a source.")
        return json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": int(count)},
                          separators=(",", ":"))

    async def op_CreateQueue(self, req: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
        name = doc.get("QueueName")
        if not isinstance(name, str) or not _NAME.match(name):
            raise invalid("Can only include alphanumeric characters, hyphens, or underscores. "
                          "1 to 80 in length")
        given = doc.get("Attributes") or {}
        if isinstance(given, dict) and (given.get("FifoQueue") == "true") != fifo.is_fifo(name):
            raise invalid("The name of a FIFO queue can only include alphanumeric characters, "
                          "hyphens, or underscores, must end with .fifo suffix and be 1 to 80 "
                          "in length; a FIFO queue needs the attribute FifoQueue true.")
        attrs = self._check_queue_attributes(req, name, given)
        if fifo.is_fifo(name):
            attrs = {**_FIFO_DEFAULTS, **attrs}
        tags = _check_tags(doc.get("tags") or {})
        self.store.create(req["a"], name, {k: v for k, v in attrs.items() if v != ""},
                          self.now_ms(), tags)
        return {"QueueUrl": self._url(req, name)}

    async def op_SetQueueAttributes(self, req: dict[str, Any],
                                    doc: dict[str, Any]) -> dict[str, Any]:
        name = self._queue(req, doc)
        given = doc.get("Attributes") or {}
        if isinstance(given, dict) and "FifoQueue" in given and (
                given["FifoQueue"] != "true" or not fifo.is_fifo(name)):
            raise QueueError("InvalidAttributeName", "InvalidAttributeName",
                             "Unknown Attribute FifoQueue: a queue's type cannot change.")
        attrs = self._check_queue_attributes(req, name, given)
        self.store.set_attributes(req["a"], name, attrs)
        return {}

    async def op_TagQueue(self, req: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
        name = self._queue(req, doc)
        tags = {**self.store.tags(req["a"], name), **_check_tags(doc.get("Tags") or {})}
        if len(tags) > tags_per_queue_max:
            raise invalid(f"Too many tags added for queue {name}: a queue may have at most "
                          f"{tags_per_queue_max}.")
        self.store.set_tags(req["a"], name, tags)
        return {}

    async def op_UntagQueue(self, req: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
        name = self._queue(req, doc)
        keys = doc.get("TagKeys")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise invalid("TagKeys must be a list of tag keys")
        tags = self.store.tags(req["a"], name)
        self.store.set_tags(req["a"], name, {k: v for k, v in tags.items() if k not in keys})
        return {}

    async def op_ListQueueTags(self, req: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
        tags = self.store.tags(req["a"], self._queue(req, doc))
        return {"Tags": tags} if tags else {}

    async def op_ListDeadLetterSourceQueues(self, req: dict[str, Any],
                                            doc: dict[str, Any]) -> dict[str, Any]:
        name = self._queue(req, doc)
        names = self.store.dead_letter_sources(req["a"], queue_arn(self.region, req["a"], name))
        limit = doc.get("MaxResults")
        start = 0
        token = doc.get("NextToken")
        if token is not None:
            if not isinstance(token, str) or not token.isdigit():
                raise invalid("Invalid NextToken value.")
            start = int(token)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or not 1 <= limit <= 1000):
            raise invalid("MaxResults must be an integer from 1 to 1000.")
        end = len(names) if limit is None else start + limit
        out: dict[str, Any] = {"queueUrls": [self._url(req, n) for n in names[start:end]]}
        if limit is not None and end < len(names):
            out["NextToken"] = str(end)
        return out

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

    def _outgoing(self, name: str, entry: dict[str, Any], attrs: dict[str, str]) -> Outgoing:
        """One message to send, validated (SendMessage's request or a batch entry)."""
        body = entry.get("MessageBody")
        if not isinstance(body, str) or not body:
            raise invalid("The request must contain the parameter MessageBody.")
        group, dedup = entry.get("MessageGroupId"), entry.get("MessageDeduplicationId")
        if not fifo.is_fifo(name):
            for k in ("MessageGroupId", "MessageDeduplicationId"):
                if entry.get(k) is not None:
                    raise invalid(f"The request include parameter {k} that is not valid for "
                                  f"this queue type (only FIFO queues take it).")
        else:
            if group is None:
                raise QueueError("MissingParameter", "MissingParameter",
                                 "The request must contain the parameter MessageGroupId.")
            for k, v in (("MessageGroupId", group), ("MessageDeduplicationId", dedup)):
                if v is not None and (not isinstance(v, str) or not _GROUP_ID.match(v)):
                    raise invalid(f"Value {v} for parameter {k} is invalid. Reason: 1 to 128 "
                                  f"printable ASCII characters.")
            if entry.get("DelaySeconds") not in (None, 0):
                raise invalid("Value for parameter DelaySeconds is invalid. Reason: The "
                              "request include parameter that is not valid for this queue "
                              "type (FIFO queues delay per queue, not per message).")
            try:
                dedup = fifo.dedup_id(dedup, body, attrs.get("ContentBasedDeduplication")
                                      == "true")
            except fifo.FifoError as e:
                raise invalid(str(e)) from None
        delay = entry.get("DelaySeconds")
        if delay is None:  # the queue's own delay
            delay = int(attrs.get("DelaySeconds", 0))
        if isinstance(delay, bool) or not isinstance(delay, int) or not 0 <= delay <= delay_s_max:
            raise invalid(f"Value {delay} for parameter DelaySeconds is invalid. Reason: must "
                          f"be between 0 and {delay_s_max}.")
        mattrs, size = check_message_attributes(entry.get("MessageAttributes"))
        sattrs, _ = check_message_attributes(entry.get("MessageSystemAttributes"), system=True)
        size_max = int(attrs.get("MaximumMessageSize", message_bytes_max))
        if len(body.encode()) + size > size_max:
            raise invalid(f"One or more parameters are invalid. Reason: Message must be shorter "
                          f"than {size_max} bytes.")
        return Outgoing(body, delay, {**mattrs, **({"$system": sattrs} if sattrs else {})},
                        group=group, dedup=dedup,
                        dedup_scope_key=fifo.dedup_scope_key(
                            attrs.get("DeduplicationScope", "queue"), str(group)))

    @staticmethod
    def _sent(m: Outgoing, stored: Message) -> dict[str, Any]:
        out: dict[str, Any] = {"MessageId": stored.id, "MD5OfMessageBody": stored.md5}
        if stored.seq is not None:
            out["SequenceNumber"] = fifo.sequence_number(stored.seq)
        user = {k: v for k, v in m.attrs.items() if k != "$system"}
        if user:
            out["MD5OfMessageAttributes"] = md5_of_attributes(user)
        if m.attrs.get("$system"):
            out["MD5OfMessageSystemAttributes"] = md5_of_attributes(m.attrs["$system"])
        return out

    async def op_SendMessage(self, req: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
        name = self._queue(req, doc)
        _, attrs = self.store.attributes(req["a"], name)
        out = self._outgoing(name, doc, attrs)
        m = self.store.send_many(req["a"], name, [out], self.now_ms())[0]
        self.counters["sent"] += 1
        self._sent_to(req["a"], name)
        return self._sent(out, m)

    async def op_SendMessageBatch(self, req: dict[str, Any],
                                  doc: dict[str, Any]) -> dict[str, Any]:
        name = self._queue(req, doc)
        entries = _batch_entries(doc)
        for e in entries:  # an entry's members are SendMessage's: refused ones refuse the batch
            found = params.refusal(params.SQS, "SendMessage",
                                   {k: v for k, v in e.items() if k != "Id"})
            if found is not None:
                raise invalid(found.message)
        _, attrs = self.store.attributes(req["a"], name)
        total = sum(len(str(e.get("MessageBody", "")).encode()) for e in entries)
        ok: list[tuple[str, Outgoing]] = []
        failed = []
        for e in entries:
            try:
                o = self._outgoing(name, e, attrs)
                total += check_message_attributes(  # attributes count, as SQS counts
                    {k: v for k, v in o.attrs.items() if k != "$system"})[1]
            except QueueError as err:
                failed.append({"Id": e["Id"], "SenderFault": True, "Code": err.code,
                               "Message": err.message})
                continue
            ok.append((e["Id"], o))
        size_max = int(attrs.get("MaximumMessageSize", message_bytes_max))
        if total > size_max:
            raise QueueError("BatchRequestTooLong", "AWS.SimpleQueueService.BatchRequestTooLong",
                             f"Batch requests cannot be longer than {size_max} bytes. You have "
                             f"sent {total} bytes.")
        sent = self.store.send_many(req["a"], name, [o for _, o in ok], self.now_ms())
        self.counters["sent"] += len(sent)
        if sent:
            self._sent_to(req["a"], name)
        return {"Successful": [{"Id": i, **self._sent(o, m)}
                               for (i, o), m in zip(ok, sent, strict=True)],
                "Failed": failed}

    async def op_ReceiveMessage(self, req: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
        name = self._queue(req, doc)
        n = doc.get("MaxNumberOfMessages") or 1
        if not isinstance(n, int) or not 1 <= n <= receive_batch_max:
            raise invalid(f"Value {n} for parameter MaxNumberOfMessages is invalid. Reason: "
                          f"Must be between 1 and {receive_batch_max}, if provided.")
        vis = doc.get("VisibilityTimeout")
        if vis is not None and (isinstance(vis, bool) or not isinstance(vis, int)
                                or not 0 <= vis <= visibility_timeout_s_max):
            raise invalid(f"Value {vis} for parameter VisibilityTimeout is invalid. Reason: "
                          f"Must be between 0 and {visibility_timeout_s_max}.")
        wait = doc.get("WaitTimeSeconds")
        if wait is None:  # the queue's own long-poll wait
            wait = int(self.store.attributes(req["a"], name)[1].get(
                "ReceiveMessageWaitTimeSeconds", 0))
        if not isinstance(wait, int) or not 0 <= wait <= wait_time_s_max:
            raise invalid(f"WaitTimeSeconds must be between 0 and {wait_time_s_max}")
        attempt = doc.get("ReceiveRequestAttemptId")
        if attempt is not None:
            if not isinstance(attempt, str) or not _GROUP_ID.match(attempt):
                raise invalid("ReceiveRequestAttemptId is 1 to 128 printable ASCII characters")
            key = (str(req["a"]), name, attempt)
            now = self.now_ms()
            for k in [k for k, (t, _) in self.attempts.items() if now - t >= receive_attempt_ms]:
                del self.attempts[k]
            if key in self.attempts:  # a retried receive: the same messages, the same handles
                return self.attempts[key][1]
        deadline = time.monotonic() + wait
        while True:
            msgs = self.store.receive(req["a"], name, n, vis, self.now_ms())
            if msgs or time.monotonic() >= deadline:
                break
            await asyncio.sleep(long_poll_interval_s)  # long poll: re-check until the deadline
        self.counters["received"] += len(msgs)
        # Only the system attributes asked for (AttributeNames is the older name of
        # MessageSystemAttributeNames).
        wanted = set(doc.get("AttributeNames") or []) | set(
            doc.get("MessageSystemAttributeNames") or [])
        names = list(doc.get("MessageAttributeNames") or [])
        out = []
        for m in msgs:
            system = m.attrs.get("$system") or {}
            every = {"ApproximateReceiveCount": str(m.receive_count),
                     "ApproximateFirstReceiveTimestamp": str(m.first_receive_ms),
                     "SenderId": str(req["a"]),
                     "SentTimestamp": str(m.sent_ms),
                     **{k: v["StringValue"] for k, v in system.items()}}
            if m.seq is not None:
                every.update(MessageGroupId=str(m.group), MessageDeduplicationId=str(m.dedup),
                             SequenceNumber=fifo.sequence_number(m.seq))
            sys_out = every if "All" in wanted else {
                k: v for k, v in every.items() if k in wanted}
            user = {k: v for k, v in m.attrs.items() if k != "$system" and _wanted(k, names)}
            item: dict[str, Any] = {"MessageId": m.id, "ReceiptHandle": m.receipt,
                                    "MD5OfBody": m.md5, "Body": m.body}
            if sys_out:
                item["Attributes"] = sys_out
            if user:
                item["MessageAttributes"] = user
                item["MD5OfMessageAttributes"] = md5_of_attributes(user)
            out.append(item)
        result = {"Messages": out} if out else {}
        if attempt is not None and out:
            self.attempts[(str(req["a"]), name, attempt)] = (self.now_ms(), result)
        return result

    def _receipt_arg(self, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise receipt_invalid()
        return value

    async def op_DeleteMessage(self, req: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
        name = self._queue(req, doc)
        self.store.delete(req["a"], name, self._receipt_arg(doc.get("ReceiptHandle")))
        self.counters["deleted"] += 1
        return {}

    async def op_DeleteMessageBatch(self, req: dict[str, Any],
                                    doc: dict[str, Any]) -> dict[str, Any]:
        name = self._queue(req, doc)
        ok, failed, receipts = [], [], []
        for entry in _batch_entries(doc):
            try:
                receipt = self._receipt_arg(entry.get("ReceiptHandle"))
                self.store.check_receipt(req["a"], name, receipt)
            except QueueError as e:
                failed.append({"Id": entry["Id"], "SenderFault": True, "Code": e.code,
                               "Message": e.message})
                continue
            receipts.append(receipt)
            ok.append({"Id": entry["Id"]})
        self.store.delete_many(req["a"], name, receipts)
        self.counters["deleted"] += len(ok)
        return {"Successful": ok, "Failed": failed}

    def _visibility_arg(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not (
                0 <= value <= visibility_timeout_s_max):
            raise invalid(f"Value {value} for parameter VisibilityTimeout is invalid. Reason: "
                          f"Must be between 0 and {visibility_timeout_s_max}.")
        return value

    async def op_ChangeMessageVisibility(self, req: dict[str, Any],
                                         doc: dict[str, Any]) -> dict[str, Any]:
        name = self._queue(req, doc)
        receipt = self._receipt_arg(doc.get("ReceiptHandle"))
        timeout = self._visibility_arg(doc.get("VisibilityTimeout"))
        self.store.change_visibility(req["a"], name, receipt, timeout, self.now_ms())
        return {}

    async def op_ChangeMessageVisibilityBatch(self, req: dict[str, Any],
                                              doc: dict[str, Any]) -> dict[str, Any]:
        name = self._queue(req, doc)
        ok, failed = [], []
        now = self.now_ms()
        for entry in _batch_entries(doc):
            try:
                receipt = self._receipt_arg(entry.get("ReceiptHandle"))
                timeout = self._visibility_arg(entry.get("VisibilityTimeout"))
                self.store.change_visibility(req["a"], name, receipt, timeout, now)
            except QueueError as e:
                failed.append({"Id": entry["Id"], "SenderFault": True, "Code": e.code,
                               "Message": e.message})
                continue
            ok.append({"Id": entry["Id"]})
        return {"Successful": ok, "Failed": failed}

    # -- redrive back from a dead-letter queue. A task moves every message the DLQ holds when
    # it starts, in one transaction, so it is COMPLETED by the time StartMessageMoveTask
    # answers; MaxNumberOfMessagesPerSecond is refused (core/params.py): there is no pacing.

    def _arn_queue(self, req: dict[str, Any], arn: Any, what: str) -> str:
        prefix = f"arn:aws:sqs:{self.region}:{req['a']}:"
        name = arn[len(prefix):] if isinstance(arn, str) and arn.startswith(prefix) else ""
        if not _NAME.match(name) or not self.store.exists(req["a"], name):
            raise QueueError("ResourceNotFoundException", "ResourceNotFoundException",
                             f"The resource that you specified for the {what} parameter "
                             f"doesn't exist.", 404)
        return name

    async def op_StartMessageMoveTask(self, req: dict[str, Any],
                                      doc: dict[str, Any]) -> dict[str, Any]:
        source = self._arn_queue(req, doc.get("SourceArn"), "SourceArn")
        arn = queue_arn(self.region, req["a"], source)
        if not self.store.dead_letter_sources(req["a"], arn):
            raise invalid("Source queue must be configured as a Dead Letter Queue.")
        dest_arn = doc.get("DestinationArn")
        dest = None if dest_arn is None else self._arn_queue(req, dest_arn, "DestinationArn")
        now = self.now_ms()
        to_move = sum(self.store.counts3(req["a"], source, now))
        moved = self.store.move_back(req["a"], source, dest, now)
        handle = base64.urlsafe_b64encode(json.dumps(
            {"a": req["a"], "s": arn, "t": uuid.uuid4().hex}).encode()).decode()
        task = {"TaskHandle": handle, "Status": "COMPLETED", "SourceArn": arn,
                "ApproximateNumberOfMessagesMoved": moved,
                "ApproximateNumberOfMessagesToMove": to_move, "StartedTimestamp": now}
        if dest_arn is not None:
            task["DestinationArn"] = dest_arn
        if moved < to_move:
            task["FailureReason"] = ("Messages whose source queue no longer exists were not "
                                     "moved.")
        self.tasks.setdefault((req["a"], arn), []).insert(0, task)
        del self.tasks[(req["a"], arn)][10:]
        return {"TaskHandle": handle}

    async def op_ListMessageMoveTasks(self, req: dict[str, Any],
                                      doc: dict[str, Any]) -> dict[str, Any]:
        source = self._arn_queue(req, doc.get("SourceArn"), "SourceArn")
        limit = doc.get("MaxResults", 1)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10:
            raise invalid("MaxResults must be an integer from 1 to 10.")
        arn = queue_arn(self.region, req["a"], source)
        return {"Results": [dict(t) for t in self.tasks.get((req["a"], arn), [])[:limit]]}

    async def op_CancelMessageMoveTask(self, req: dict[str, Any],
                                       doc: dict[str, Any]) -> dict[str, Any]:
        handle = doc.get("TaskHandle")
        for (account, _), tasks in self.tasks.items():
            for t in tasks:
                if account == req["a"] and t["TaskHandle"] == handle:
                    # every task completes before StartMessageMoveTask answers
                    raise QueueError("FailedPrecondition", "FailedPrecondition",
                                     "Only active tasks can be cancelled: this task has "
                                     "completed.")
        raise QueueError("ResourceNotFoundException", "ResourceNotFoundException",
                         "The resource that you specified for the TaskHandle parameter "
                         "doesn't exist.", 404)

    async def op_GetQueueAttributes(self, req: dict[str, Any],
                                    doc: dict[str, Any]) -> dict[str, Any]:
        name = self._queue(req, doc)
        created, attrs = self.store.attributes(req["a"], name)
        visible, in_flight, delayed = self.store.counts3(req["a"], name, self.now_ms())
        every: dict[str, str] = {
            "QueueArn": queue_arn(self.region, req["a"], name),
            "ApproximateNumberOfMessages": str(visible),
            "ApproximateNumberOfMessagesNotVisible": str(in_flight),
            "ApproximateNumberOfMessagesDelayed": str(delayed),
            "CreatedTimestamp": str(created // 1000),
            "LastModifiedTimestamp": str(created // 1000),
            **{k: attrs.get(k, v) for k, v in _ATTR_DEFAULTS.items()},
            **{k: attrs[k] for k in ("RedrivePolicy", "RedriveAllowPolicy") if k in attrs},
            **({k: attrs.get(k, v) for k, v in _FIFO_DEFAULTS.items()}
               if fifo.is_fifo(name) else {}),
        }
        wanted = doc.get("AttributeNames") or ["All"]
        if "All" in wanted:
            return {"Attributes": every}
        return {"Attributes": {k: v for k, v in every.items() if k in wanted}}


def _wanted(name: str, patterns: list[str]) -> bool:
    """Whether ReceiveMessage's MessageAttributeNames asks for attribute ``name``
    ("All", ".*", a prefix ending ".*", or the name itself)."""
    for p in patterns:
        if p in ("All", ".*") or p == name or (p.endswith(".*") and name.startswith(p[:-1])):
            return True
    return False


def _batch_entries(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """A batch request's entries, checked as SQS checks them before doing any."""
    entries = doc.get("Entries")
    if not isinstance(entries, list) or not entries:
        raise QueueError("EmptyBatchRequest", "AWS.SimpleQueueService.EmptyBatchRequest",
                         "There should be at least one Entry in the request.")
    if len(entries) > receive_batch_max:
        raise QueueError("TooManyEntriesInBatchRequest",
                         "AWS.SimpleQueueService.TooManyEntriesInBatchRequest",
                         f"Maximum number of entries per request are {receive_batch_max}. "
                         f"You have sent {len(entries)}.")
    seen = set()
    for e in entries:
        i = e.get("Id") if isinstance(e, dict) else None
        if not isinstance(i, str) or not _BATCH_ID.match(i):
            raise QueueError("InvalidBatchEntryId", "AWS.SimpleQueueService.InvalidBatchEntryId",
                             "A batch entry id can only contain alphanumeric characters, "
                             "hyphens and underscores. It can be at most 80 letters long.")
        if i in seen:
            raise QueueError("BatchEntryIdsNotDistinct",
                             "AWS.SimpleQueueService.BatchEntryIdsNotDistinct",
                             f"Id {i} repeated.")
        seen.add(i)
    return entries


def _check_tags(tags: Any) -> dict[str, str]:
    if not isinstance(tags, dict):
        raise invalid("Tags must be a map of tag key to value")
    for k, v in tags.items():
        if not isinstance(k, str) or not _TAG_KEY.match(k) or k.lower().startswith("aws:") \
                or not isinstance(v, str) or len(v) > 256:
            raise invalid(f"Tag {k!r} is invalid: keys are 1-128 characters (not starting "
                          f"aws:), values at most 256.")
    if len(tags) > tags_per_queue_max:
        raise invalid(f"A queue may have at most {tags_per_queue_max} tags.")
    return {str(k): str(v) for k, v in tags.items()}


def _check_redrive_allow_policy(v: Any) -> str:
    if v == "":
        return ""
    bad = f"Value {v} for parameter RedriveAllowPolicy is invalid. Reason: "
    try:
        doc = json.loads(v) if isinstance(v, str) else None
    except ValueError:
        doc = None
    perm = doc.get("redrivePermission") if isinstance(doc, dict) else None
    if perm not in ("allowAll", "denyAll", "byQueue") or not isinstance(doc, dict) or (
            set(doc) - {"redrivePermission", "sourceQueueArns"}):
        raise QueueError("InvalidAttributeValue", "InvalidAttributeValue",
                         bad + "redrivePermission must be allowAll, denyAll or byQueue.")
    arns = doc.get("sourceQueueArns")
    if perm == "byQueue":
        if not isinstance(arns, list) or not 1 <= len(arns) <= 10 or not all(
                isinstance(a, str) for a in arns):
            raise QueueError("InvalidAttributeValue", "InvalidAttributeValue",
                             bad + "byQueue needs 1 to 10 sourceQueueArns.")
    elif arns is not None:
        raise QueueError("InvalidAttributeValue", "InvalidAttributeValue",
                         bad + "sourceQueueArns is only for redrivePermission byQueue.")
    return json.dumps(doc, separators=(",", ":"))
