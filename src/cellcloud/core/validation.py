"""Validation of Lambda parameters, with Lambda's own constraints and messages."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import LambdaError, invalid
from .limits import DEFAULT_LIMITS, Limits

# Lambda's FunctionName pattern: a bare name, a partial ARN or a full ARN, optional qualifier.
_FUNCTION_REF = re.compile(
    r"^(arn:(aws[a-zA-Z-]*)?:lambda:)?([a-z]{2}(-gov)?-[a-z]+-\d{1}:)?(?P<account>\d{12}:)?"
    r"(function:)?(?P<name>[a-zA-Z0-9-_]{1,64})(:(?P<qualifier>\$LATEST|[a-zA-Z0-9-_]{1,128}))?$"
)
_NAME = re.compile(r"^[a-zA-Z0-9-_]{1,64}$")
_HANDLER = re.compile(r"^[^\s]{1,128}$")
_ENV_KEY = re.compile(r"^[a-zA-Z]([a-zA-Z0-9_])+$")
_RESERVED_ENV = frozenset(
    {
        "_HANDLER", "_X_AMZN_TRACE_ID", "AWS_DEFAULT_REGION", "AWS_REGION",
        "AWS_EXECUTION_ENV", "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        "AWS_LAMBDA_FUNCTION_VERSION", "AWS_LAMBDA_INITIALIZATION_TYPE",
        "AWS_LAMBDA_LOG_GROUP_NAME", "AWS_LAMBDA_LOG_STREAM_NAME", "AWS_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
        "AWS_LAMBDA_RUNTIME_API", "LAMBDA_TASK_ROOT", "LAMBDA_RUNTIME_DIR",
    }
)


@dataclass(frozen=True)
class FunctionRef:
    name: str
    qualifier: str | None
    account: str | None


def parse_function_ref(ref: str) -> FunctionRef:
    m = _FUNCTION_REF.match(ref or "")
    if not m:
        raise LambdaError(
            400,
            "ValidationException",
            f"1 validation error detected: Value '{ref}' at 'functionName' failed to satisfy "
            "constraint: Member must satisfy regular expression pattern: "
            "(arn:(aws[a-zA-Z-]*)?:lambda:)?([a-z]{2}(-gov)?-[a-z]+-\\d{1}:)?(\\d{12}:)?"
            "(function:)?([a-zA-Z0-9-_]+)(:(\\$LATEST|[a-zA-Z0-9-_]+))?",
        )
    account = m.group("account")
    return FunctionRef(m.group("name"), m.group("qualifier"), account[:-1] if account else None)


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise LambdaError(
            400,
            "ValidationException",
            f"1 validation error detected: Value '{name}' at 'functionName' failed to satisfy "
            "constraint: Member must satisfy regular expression pattern: [a-zA-Z0-9-_]+ "
            "and have length between 1 and 64",
        )
    return name


def check_handler(handler: object) -> str:
    """Lambda's own constraint (``[^\\s]+``, ≤ 128 characters). A python handler without a
    module part is accepted and fails at invoke with Runtime.MalformedHandlerName, as on AWS;
    a custom runtime's handler is any string its bootstrap understands."""
    if not isinstance(handler, str) or not _HANDLER.match(handler):
        raise invalid(
            f"Value '{handler}' at 'handler' failed to satisfy constraint: Member must satisfy "
            "regular expression pattern: [^\\s]+ and have length at most 128"
        )
    return handler


def check_memory(memory_mb: object, limits: Limits = DEFAULT_LIMITS) -> int:
    if (
        not isinstance(memory_mb, int)
        or isinstance(memory_mb, bool)
        or not limits.memory_mb_min <= memory_mb <= limits.memory_mb_max
    ):
        raise invalid(
            f"'MemorySize' value failed to satisfy constraint: Member must have value between "
            f"{limits.memory_mb_min} and {limits.memory_mb_max}, got {memory_mb!r}"
        )
    return memory_mb


def check_timeout(timeout_s: object, limits: Limits = DEFAULT_LIMITS) -> int:
    if (
        not isinstance(timeout_s, int)
        or isinstance(timeout_s, bool)
        or not limits.timeout_s_min <= timeout_s <= limits.timeout_s_max
    ):
        raise invalid(
            f"'Timeout' value failed to satisfy constraint: Member must have value between "
            f"{limits.timeout_s_min} and {limits.timeout_s_max}, got {timeout_s!r}"
        )
    return timeout_s


def check_env(variables: object, limits: Limits = DEFAULT_LIMITS) -> dict[str, str]:
    if variables is None:
        return {}
    if not isinstance(variables, dict):
        raise invalid("Environment.Variables must be a map of string to string")
    size = 0
    for k, v in variables.items():
        if not isinstance(k, str) or not _ENV_KEY.match(k):
            raise invalid(f"Environment variable name '{k}' does not match [a-zA-Z]([a-zA-Z0-9_])+")
        if k in _RESERVED_ENV:
            raise invalid(
                f"Lambda was unable to configure your environment variables because the "
                f"environment variables you have provided contains reserved keys that are "
                f"currently not supported for modification. Reserved keys used in this "
                f"request: {k}"
            )
        if not isinstance(v, str):
            raise invalid(f"Environment variable '{k}' must be a string")
        size += len(k.encode()) + len(v.encode())
    if size > limits.env_vars_bytes_max:
        raise invalid(
            f"Lambda was unable to configure your environment variables because the "
            f"environment variables you have provided exceeded the 4KB limit. "
            f"String measured: {size} bytes"
        )
    return dict(variables)
