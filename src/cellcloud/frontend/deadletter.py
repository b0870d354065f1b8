"""A function's ``DeadLetterConfig``: the SQS queue (same region and account) that receives an
async event once its retries are exhausted or it is too old, as Lambda sends it: the event's
payload as the body, with the message attributes ``RequestID`` (String), ``ErrorCode`` (Number,
the last attempt's HTTP status) and ``ErrorMessage`` (String, its first 1 KiB). It is sent in
addition to an on-failure destination when both are configured.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ..core import errors
from .events import SQS_ARN

error_message_bytes_max = 1024


def check(value: Any, region: str, account: str,
          queue_exists: Callable[[str, str], bool] | None) -> str:
    """The TargetArn to store ("" removes it), or InvalidParameterValueException."""
    if not isinstance(value, dict) or set(value) - {"TargetArn"}:
        raise errors.invalid("DeadLetterConfig must be an object with TargetArn")
    arn = value.get("TargetArn")
    if arn in (None, ""):
        return ""
    m = SQS_ARN.match(arn) if isinstance(arn, str) else None
    if m is None:
        raise errors.invalid(f"The provided target ARN {arn!r} is invalid: DeadLetterConfig "
                             "takes a standard SQS queue's ARN (SNS topics and FIFO queues are "
                             "not supported).")
    if m["region"] != region or m["account"] != account:
        raise errors.invalid(f"The dead-letter queue {arn} must be in this region ({region}) "
                             "and account.")
    if queue_exists is None or not queue_exists(account, m["name"]):
        raise errors.invalid(f"The dead-letter queue {arn} does not exist.")
    return str(arn)


def echo(target: str) -> dict[str, Any]:
    """GetFunctionConfiguration's member (absent when none is set, as Lambda)."""
    return {"DeadLetterConfig": {"TargetArn": target}} if target else {}


def send_message_body(account: str, target: str, request_id: str, status: int,
                      error_message: str, payload: bytes) -> bytes:
    """The SQS SendMessage request (JSON protocol) Lambda's dead-letter delivery makes."""
    m = SQS_ARN.match(target)
    assert m is not None  # checked when it was configured
    body = payload.decode(errors="replace") or "{}"
    msg = error_message.encode()[:error_message_bytes_max].decode(errors="ignore") or "Error"
    return json.dumps({
        "QueueUrl": f"http://cellcloud.internal/{account}/{m['name']}",
        "MessageBody": body,
        "MessageAttributes": {
            "RequestID": {"DataType": "String", "StringValue": request_id},
            "ErrorCode": {"DataType": "Number", "StringValue": str(status or 500)},
            "ErrorMessage": {"DataType": "String", "StringValue": msg},
        }}).encode()
