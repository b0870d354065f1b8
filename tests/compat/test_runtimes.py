"""Runtimes through the Lambda Runtime API: a shell bootstrap (provided.al2023), the unmodified
awslambdaric from PyPI, other Python versions found on the host, and Powertools handlers."""

from __future__ import annotations

import io
import json
import shutil
import stat
import sys
import zipfile
from typing import Any

import pytest

from tests.conftest import make_zip

from .conftest import ROLE, new_name

pytestmark = pytest.mark.integration


def zip_with_modes(files: dict[str, tuple[str, int]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, (content, mode) in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | mode) << 16
            zf.writestr(info, content)
    return buf.getvalue()


def invoke(lam: Any, name: str, event: Any) -> tuple[Any, dict[str, Any]]:
    res = lam.invoke(FunctionName=name, Payload=json.dumps(event).encode(), LogType="Tail")
    return json.loads(res["Payload"].read()), res


SHELL_BOOTSTRAP = r"""#!/bin/sh
# A custom runtime in shell, as in AWS's tutorial: poll next, answer, repeat.
set -eu
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
while true; do
  HEADERS="$(mktemp)"
  EVENT=$(curl -sS -LD "$HEADERS" "$API/invocation/next")
  REQUEST_ID=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)
  echo "shell runtime got $EVENT"
  curl -sS -X POST "$API/invocation/$REQUEST_ID/response" \
       -d "{\"echo\": $EVENT, \"handler\": \"$_HANDLER\", \"task\": \"$LAMBDA_TASK_ROOT\"}" >/dev/null
done
"""


@pytest.mark.skipif(shutil.which("curl") is None, reason="the shell bootstrap uses curl")
def test_provided_al2023_shell_bootstrap(lam: Any) -> None:
    name = new_name("sh")
    lam.create_function(FunctionName=name, Runtime="provided.al2023", Role=ROLE,
                        Handler="function.handler",
                        Code={"ZipFile": zip_with_modes({"bootstrap": (SHELL_BOOTSTRAP, 0o755)})})
    out, res = invoke(lam, name, {"x": 1})
    assert out == {"echo": {"x": 1}, "handler": "function.handler", "task": "/var/task"}
    assert "FunctionError" not in res
    import base64

    assert "shell runtime got" in base64.b64decode(res["LogResult"]).decode()
    out, _ = invoke(lam, name, {"x": 2})  # the same runtime process serves the next one
    assert out["echo"] == {"x": 2}


def test_provided_without_bootstrap_is_a_clear_error(lam: Any) -> None:
    name = new_name("nob")
    lam.create_function(FunctionName=name, Runtime="provided.al2023", Role=ROLE,
                        Handler="x", Code={"ZipFile": make_zip({"readme.txt": "no bootstrap"})})
    out, res = invoke(lam, name, {})
    assert res["FunctionError"] == "Unhandled"
    assert out["errorType"] == "Runtime.InvalidEntrypoint"


def test_runtime_that_exits_is_reported(lam: Any) -> None:
    name = new_name("exit")
    boot = "#!/bin/sh\necho 'dying' >&2\nexit 3\n"
    lam.create_function(FunctionName=name, Runtime="provided.al2023", Role=ROLE, Handler="x",
                        Code={"ZipFile": zip_with_modes({"bootstrap": (boot, 0o755)})})
    out, res = invoke(lam, name, {})
    assert res["FunctionError"] == "Unhandled"
    assert out["errorType"] == "Runtime.ExitError" and "exit status 3" in out["errorMessage"]


def test_awslambdaric_unmodified(lam: Any) -> None:
    pytest.importorskip("awslambdaric")
    # The bundle's bootstrap runs the unmodified awslambdaric from PyPI (installed in the
    # interpreter it names) against our Runtime API.
    boot = f"#!/bin/sh\nexec {sys.executable} -m awslambdaric \"$_HANDLER\"\n"
    code = ("import os\n"
            "def handler(event, context):\n"
            "    print('via awslambdaric')\n"
            "    return {'ric': True, 'sum': event['a'] + event['b'],\n"
            "            'rid': context.aws_request_id,\n"
            "            'left': context.get_remaining_time_in_millis() > 0}\n")
    name = new_name("ric")
    lam.create_function(FunctionName=name, Runtime="provided.al2023", Role=ROLE,
                        Handler="app.handler", Timeout=10,
                        Code={"ZipFile": zip_with_modes({"bootstrap": (boot, 0o755),
                                                         "app.py": (code, 0o644)})})
    out, res = invoke(lam, name, {"a": 2, "b": 3})
    assert out["ric"] is True and out["sum"] == 5 and out["left"] is True
    assert out["rid"] == res["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]
    # awslambdaric's error path goes through /invocation/{id}/error.
    lam.update_function_code(FunctionName=name, ZipFile=zip_with_modes({
        "bootstrap": (boot, 0o755),
        "app.py": ("def handler(e, c):\n    raise KeyError('nope')\n", 0o644)}))
    out, res = invoke(lam, name, {})
    assert res["FunctionError"] == "Unhandled" and out["errorType"] == "KeyError"


@pytest.mark.parametrize("runtime", ["python3.12", "python3.13"])
def test_other_python_versions(lam: Any, runtime: str) -> None:
    runtimes = lam.meta.events  # noqa: F841  (keeps the client import-time check honest)
    code = "import sys\ndef handler(e, c):\n    return list(sys.version_info[:2])\n"
    name = new_name("py")
    try:
        lam.create_function(FunctionName=name, Runtime=runtime, Role=ROLE,
                            Handler="app.handler", Timeout=10,
                            Code={"ZipFile": make_zip({"app.py": code})})
    except lam.exceptions.InvalidParameterValueException:
        pytest.skip(f"{runtime} is not installed on this host")
    out, res = invoke(lam, name, {})
    assert "FunctionError" not in res, out
    assert out == [3, int(runtime.split(".")[1])]


def test_powertools_logger_and_event_handler(lam: Any) -> None:
    pytest.importorskip("aws_lambda_powertools")
    code = (
        "from aws_lambda_powertools import Logger\n"
        "from aws_lambda_powertools.event_handler import APIGatewayRestResolver\n"
        "logger = Logger(service='greeter')\n"
        "app = APIGatewayRestResolver()\n"
        "@app.get('/hello/<name>')\n"
        "def hello(name):\n"
        "    logger.info('greeting', extra={'who': name})\n"
        "    return {'message': f'hello {name}'}\n"
        "@logger.inject_lambda_context\n"
        "def handler(event, context):\n"
        "    return app.resolve(event, context)\n"
    )
    name = new_name("pt")
    lam.create_function(FunctionName=name, Runtime="python3.11", Role=ROLE,
                        Handler="app.handler", Timeout=10, MemorySize=256,
                        Code={"ZipFile": make_zip({"app.py": code})})
    event = {"resource": "/hello/{name}", "path": "/hello/bob", "httpMethod": "GET",
             "headers": {}, "multiValueHeaders": {}, "queryStringParameters": None,
             "multiValueQueryStringParameters": None, "pathParameters": {"name": "bob"},
             "stageVariables": None, "body": None, "isBase64Encoded": False,
             "requestContext": {"resourcePath": "/hello/{name}", "httpMethod": "GET",
                                "path": "/prod/hello/bob", "stage": "prod",
                                "requestId": "r-1", "identity": {}}}
    out, res = invoke(lam, name, event)
    assert out["statusCode"] == 200, out
    assert json.loads(out["body"]) == {"message": "hello bob"}
    import base64

    logs = base64.b64decode(res["LogResult"]).decode()
    line = next(json.loads(x) for x in logs.splitlines() if x.startswith("{") and "greeting" in x)
    assert line["service"] == "greeter" and line["who"] == "bob"
    assert line["function_name"] == name and line["function_request_id"]
