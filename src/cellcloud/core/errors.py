"""Lambda-shaped errors: an HTTP status, a modelled error type, a message.

botocore's rest-json parser reads the type from the ``x-amzn-ErrorType`` header and the message
from the body, so boto3 raises the modelled exception (``ResourceNotFoundException``…).
"""

from __future__ import annotations

import json


class LambdaError(Exception):
    def __init__(self, status: int, type_: str, message: str, *,
                 http_headers: dict[str, str] | None = None, **extra: str) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.extra = extra
        self.http_headers = http_headers or {}

    def body(self) -> bytes:
        doc: dict[str, str] = {"Type": "User", "message": self.message}
        doc.update(self.extra)
        return json.dumps(doc).encode()

    def headers(self) -> dict[str, str]:
        h = {"x-amzn-errortype": self.type, "content-type": "application/json"}
        if self.status == 429:
            h["retry-after"] = "1"
        h.update(self.http_headers)
        return h


def not_found(what: str) -> LambdaError:
    return LambdaError(404, "ResourceNotFoundException", what)


def invalid(message: str) -> LambdaError:
    return LambdaError(400, "InvalidParameterValueException", message)


def conflict(message: str) -> LambdaError:
    return LambdaError(409, "ResourceConflictException", message)


def too_many(message: str, reason: str) -> LambdaError:
    return LambdaError(429, "TooManyRequestsException", message, Reason=reason)


def too_large(message: str) -> LambdaError:
    return LambdaError(413, "RequestTooLargeException", message)


def service(message: str) -> LambdaError:
    return LambdaError(500, "ServiceException", message)
