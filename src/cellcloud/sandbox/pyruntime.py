"""cellcloud's Python runtime: the Lambda Runtime API client loop, like awslambdaric's.

Standard library only, so any Python 3 on the host can run it as a script
(``python3.X pyruntime.py`` with ``AWS_LAMBDA_RUNTIME_API`` set). The guest agent also runs the
same :func:`run_loop` in a thread for the built-in python runtime, through an in-process client
bound to the same Runtime API state machine.
"""

from __future__ import annotations

import http.client
import importlib
import json
import logging
import os
import sys
import time
import traceback
from typing import Any, Protocol

RUNTIME_PATH = "/2018-06-01/runtime"


class RuntimeClient(Protocol):
    def next(self) -> tuple[str, bytes, int, str, str]: ...
    def respond(self, request_id: str, body: bytes) -> None: ...
    def error(self, request_id: str, body: bytes) -> None: ...
    def init_error(self, body: bytes) -> None: ...


class HttpRuntimeClient:
    """Talks to ``$AWS_LAMBDA_RUNTIME_API`` over one keep-alive connection."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self._conn = http.client.HTTPConnection(host, int(port))

    def _call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> http.client.HTTPResponse:
        self._conn.request(method, RUNTIME_PATH + path, body=body, headers=headers or {})
        resp = self._conn.getresponse()
        resp.read()
        return resp

    def next(self) -> tuple[str, bytes, int, str, str]:
        self._conn.request("GET", RUNTIME_PATH + "/invocation/next")
        resp = self._conn.getresponse()
        payload = resp.read()
        return (
            resp.headers["Lambda-Runtime-Aws-Request-Id"],
            payload,
            int(resp.headers["Lambda-Runtime-Deadline-Ms"]),
            resp.headers.get("Lambda-Runtime-Invoked-Function-Arn", ""),
            resp.headers.get("Lambda-Runtime-Trace-Id", ""),
        )

    def respond(self, request_id: str, body: bytes) -> None:
        self._call("POST", f"/invocation/{request_id}/response", body)

    def error(self, request_id: str, body: bytes) -> None:
        self._call(
            "POST",
            f"/invocation/{request_id}/error",
            body,
            {"Lambda-Runtime-Function-Error-Type": "Unhandled"},
        )

    def init_error(self, body: bytes) -> None:
        self._call("POST", "/init/error", body)


class LambdaContext:
    """The context object of AWS Lambda's Python runtime (same attribute names and types)."""

    # An environment's identity never changes: read it from os.environ once per process, not
    # once per invocation (os.environ access encodes on every lookup).
    _static: tuple[str, str, str, str, str] | None = None

    def __init__(self, request_id: str, deadline_ms: int, arn: str) -> None:
        if LambdaContext._static is None:
            env = os.environ
            LambdaContext._static = (
                env.get("AWS_LAMBDA_FUNCTION_NAME", ""),
                env.get("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
                env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", ""),
                env.get("AWS_LAMBDA_LOG_GROUP_NAME", ""),
                env.get("AWS_LAMBDA_LOG_STREAM_NAME", ""))
        (self.function_name, self.function_version, self.memory_limit_in_mb,
         self.log_group_name, self.log_stream_name) = LambdaContext._static
        self.aws_request_id = request_id
        self.invoked_function_arn = arn
        self.identity = None
        self.client_context = None
        self.tenant_id = None
        self._deadline_ms = deadline_ms

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int(self._deadline_ms - time.time() * 1000))

    def __repr__(self) -> str:
        return (
            f"LambdaContext([aws_request_id={self.aws_request_id},"
            f"function_name={self.function_name},"
            f"function_version={self.function_version}])"
        )


def error_doc(type_: str, message: str, stack: list[str] | None = None) -> dict[str, Any]:
    return {"errorMessage": message, "errorType": type_, "requestId": "", "stackTrace": stack or []}


def load_handler(handler: str) -> tuple[Any, dict[str, Any] | None]:
    try:
        modname, fname = handler.rsplit(".", 1)
    except ValueError as e:
        return None, error_doc("Runtime.MalformedHandlerName", f"Bad handler '{handler}': {e}")
    modname = modname.replace("/", ".")
    try:
        module = importlib.import_module(modname)
    except ImportError as e:
        return None, error_doc(
            "Runtime.ImportModuleError", f"Unable to import module '{modname}': {e}"
        )
    except SyntaxError as e:
        return None, error_doc(
            "Runtime.UserCodeSyntaxError", f"Syntax error in module '{modname}': {e}"
        )
    except Exception as e:
        return None, error_doc(
            type(e).__name__,
            str(e),
            traceback.format_list(traceback.extract_tb(e.__traceback__)[1:]),
        )
    fn = getattr(module, fname, None)
    if fn is None or not callable(fn):
        return None, error_doc(
            "Runtime.HandlerNotFound", f"Handler '{fname}' missing on module '{modname}'"
        )
    return fn, None


class _RequestIdFilter(logging.Filter):
    request_id = ""

    def filter(self, record: logging.LogRecord) -> bool:
        record.aws_request_id = self.request_id
        return True


_request_filter = _RequestIdFilter()


class _JsonFormatter(logging.Formatter):
    """LogFormat JSON (``AWS_LAMBDA_LOG_FORMAT=JSON``): one JSON object per record, the
    fields awslambdaric writes."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "message": record.getMessage(), "logger": record.name,
            "requestId": getattr(record, "aws_request_id", "")}
        if record.exc_info and record.exc_info[0] is not None:
            doc["errorType"] = record.exc_info[0].__name__
            doc["errorMessage"] = str(record.exc_info[1])
            doc["stackTrace"] = traceback.format_tb(record.exc_info[2])
        return json.dumps(doc, default=str)


# AWS_LAMBDA_LOG_LEVEL (ApplicationLogLevel) -> the root logger's level
_LEVELS = {"TRACE": 5, "DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARN": logging.WARNING,
           "ERROR": logging.ERROR, "FATAL": logging.CRITICAL}


def setup_logging() -> None:
    """The root logger writes Lambda's tab-separated lines with the request id, or JSON
    records at the function's application log level when its LogFormat is JSON."""
    handler = logging.StreamHandler(sys.stdout)
    if os.environ.get("AWS_LAMBDA_LOG_FORMAT") == "JSON":
        handler.setFormatter(_JsonFormatter())
        logging.getLogger().setLevel(_LEVELS.get(os.environ.get("AWS_LAMBDA_LOG_LEVEL", ""),
                                                 logging.INFO))
    else:
        handler.setFormatter(
            logging.Formatter(
                "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s",
                "%Y-%m-%dT%H:%M:%S",
            )
        )
    handler.addFilter(_request_filter)
    logging.Formatter.converter = time.gmtime
    logging.getLogger().addHandler(handler)


def _emit_error(err: dict[str, Any]) -> None:
    try:
        sys.stderr.write(
            f"[ERROR] {err['errorType']}: {err['errorMessage']}\n"
            + "".join(err.get("stackTrace") or [])
        )
        sys.stderr.flush()
    except (OSError, ValueError):  # the handler closed stderr
        pass


def init(handler_name: str) -> tuple[Any, dict[str, Any] | None]:
    """Lambda's init phase: put the task root and /opt/python on the path, import the handler."""
    task_root = os.environ.get("LAMBDA_TASK_ROOT", "/var/task")
    for p in (task_root, "/opt/python"):
        if p not in sys.path:
            sys.path.insert(0, p)
    fn, init_error = load_handler(handler_name)
    if init_error is not None:
        _emit_error(init_error)
    return fn, init_error


def handle_one(fn: Any, client: RuntimeClient) -> None:
    """One turn of the runtime loop: next, run the handler, respond (or report the error)."""
    request_id, payload, deadline_ms, arn, trace_id = client.next()
    _request_filter.request_id = request_id
    # As Lambda's runtimes (awslambdaric's update_xray_env_variable) do: the X-Ray SDK and
    # OpenTelemetry's propagators read the invocation's trace header from here.
    if trace_id:
        os.environ["_X_AMZN_TRACE_ID"] = trace_id
    else:
        os.environ.pop("_X_AMZN_TRACE_ID", None)
    try:
        event = json.loads(payload) if payload else {}
        result = fn(event, LambdaContext(request_id, deadline_ms, arn))
    except Exception as e:
        stack = traceback.format_list(traceback.extract_tb(e.__traceback__)[1:])
        err = {"errorMessage": str(e), "errorType": type(e).__name__,
               "requestId": request_id, "stackTrace": stack}
        _emit_error(err)
        client.error(request_id, json.dumps(err).encode())
        return
    try:
        body = json.dumps(result).encode()
    except (TypeError, ValueError) as e:
        err = {"errorMessage": f"Unable to marshal response: {e}",
               "errorType": "Runtime.MarshalError", "requestId": request_id, "stackTrace": []}
        _emit_error(err)
        client.error(request_id, json.dumps(err).encode())
        return
    client.respond(request_id, body)


def run_loop(client: RuntimeClient, handler_name: str, max_invocations: int | None = None) -> None:
    """Initialise the handler, then serve invocations until told to stop (or forever)."""
    fn, init_error = init(handler_name)
    if init_error is not None:
        client.init_error(json.dumps(init_error).encode())
        return
    served = 0
    while max_invocations is None or served < max_invocations:
        handle_one(fn, client)
        served += 1


def main() -> None:
    address = os.environ["AWS_LAMBDA_RUNTIME_API"]
    handler = sys.argv[1] if len(sys.argv) > 1 else os.environ["_HANDLER"]
    setup_logging()
    run_loop(HttpRuntimeClient(address), handler)


if __name__ == "__main__":
    main()
