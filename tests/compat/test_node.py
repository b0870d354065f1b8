"""Node.js runtimes (nodejs20.x, nodejs22.x, nodejs24.x) through boto3, as Lambda runs them.

A major whose Node is not installed on this host (``scripts/setup.sh`` installs all three) is
skipped; one that this test process finds (the same search as the region's) must work.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import pytest

from cellcloud.sandbox import runtimes
from tests.conftest import make_zip

from .conftest import ROLE, new_name

pytestmark = pytest.mark.integration

INSTALLED = runtimes.find_node()
MAJORS = [pytest.param(m, marks=pytest.mark.skipif(m not in INSTALLED,
                                                   reason=f"Node {m} is not installed"))
          for m in runtimes.NODE_MAJORS]
# One major for the error paths that do not differ between them (keeps the run short).
ONE = [pytest.param(min(INSTALLED) if INSTALLED else 20,
                    marks=pytest.mark.skipif(not INSTALLED, reason="no Node installed"))]

INDEX_JS = r"""
const writeCode = () => {  // the Node install is bound read-only into the environment
  try { require("fs").writeFileSync(process.execPath + ".tamper", "x"); return "written"; }
  catch (e) { return e.code; }
};
exports.handler = async (event, context) => {
  console.log("hello from", process.version, "\nsecond line");
  return {
    event, major: Number(process.versions.node.split(".")[0]),
    functionName: context.functionName, functionVersion: context.functionVersion,
    invokedFunctionArn: context.invokedFunctionArn, memoryLimitInMB: context.memoryLimitInMB,
    awsRequestId: context.awsRequestId, logGroupName: context.logGroupName,
    logStreamName: context.logStreamName, left: context.getRemainingTimeInMillis(),
    waits: context.callbackWaitsForEmptyEventLoop, nodePath: process.env.NODE_PATH,
    execEnv: process.env.AWS_EXECUTION_ENV, gc: typeof global.gc, runtimeTree: writeCode(),
  };
};
exports.fails = async () => {
  const e = new TypeError("bad input");
  throw e;
};
exports.callback = (event, context, callback) => {
  // The answer is serialised once the event loop is empty: after the timer has fired.
  const result = { via: "callback", timerFired: false };
  setTimeout(() => { result.timerFired = true; }, 50);
  callback(null, result);
};
exports.nowait = (event, context, callback) => {
  context.callbackWaitsForEmptyEventLoop = false;
  const result = { via: "nowait", timerFired: false };
  setTimeout(() => { result.timerFired = true; }, 60000);  // would hold the answer a minute
  callback(null, result);
};
"""
ESM_MJS = """
import { platform } from "node:os";
export const handler = async (event) => ({ esm: true, platform: platform(), n: event.n });
"""
SUB_PACKAGE = '{"type": "module"}'
SUB_APP = "export const handler = async () => ({ esmJs: typeof require });\n"


def invoke(lam: Any, name: str, event: Any, **kw: Any) -> tuple[Any, dict[str, Any], str]:
    res = lam.invoke(FunctionName=name, Payload=json.dumps(event).encode(), LogType="Tail", **kw)
    return (json.loads(res["Payload"].read()), res,
            base64.b64decode(res.get("LogResult", "")).decode(errors="replace"))


def set_handler(lam: Any, name: str, handler: str) -> None:
    lam.update_function_configuration(FunctionName=name, Handler=handler)
    lam.get_waiter("function_updated_v2").wait(FunctionName=name)


@pytest.mark.parametrize("major", MAJORS)
def test_node_handlers(lam: Any, major: int) -> None:
    runtime = f"nodejs{major}.x"
    name = new_name(f"n{major}")
    lam.create_function(
        FunctionName=name, Runtime=runtime, Role=ROLE, Handler="index.handler", Timeout=30,
        Code={"ZipFile": make_zip({"index.js": INDEX_JS, "esm.mjs": ESM_MJS,
                                   "sub/package.json": SUB_PACKAGE, "sub/app.js": SUB_APP})})
    out, res, logs = invoke(lam, name, {"a": 1})
    assert "FunctionError" not in res, out
    request_id = res["ResponseMetadata"]["HTTPHeaders"]["x-amzn-requestid"]
    assert out["event"] == {"a": 1} and out["major"] == major
    assert out["functionName"] == name and out["functionVersion"] == "$LATEST"
    assert out["invokedFunctionArn"].endswith(f":function:{name}")
    assert out["memoryLimitInMB"] == "128"  # a string, as Lambda's Node runtime gives it
    assert out["awsRequestId"] == request_id
    assert out["logGroupName"] == f"/aws/lambda/{name}" and out["logStreamName"]
    assert 0 < out["left"] <= 30_000
    assert out["execEnv"] == f"AWS_Lambda_{runtime}" and out["gc"] == "function"
    assert out["runtimeTree"] == "EROFS"
    assert out["nodePath"].split(":")[:2] == [f"/opt/nodejs/node{major}/node_modules",
                                              "/opt/nodejs/node_modules"]
    # nodejs24.x dropped the callback API from the context, as Lambda's did.
    assert out.get("waits") == (True if major < 24 else None)
    # console.log: "<ISO time>\t<request id>\tINFO\t<message>", one line per call.
    assert re.search(rf"^\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}Z\t{request_id}\tINFO\t"
                     rf"hello from v{major}\.\d+\.\d+ \r?second line$", logs, re.M), logs

    # A thrown error: Lambda's Node shape, with the stack as a trace array.
    set_handler(lam, name, "index.fails")
    out, res, logs = invoke(lam, name, {})
    assert res["FunctionError"] == "Unhandled"
    assert out["errorType"] == "TypeError" and out["errorMessage"] == "bad input"
    assert out["trace"][0] == "TypeError: bad input"
    assert any("/var/task/index.js" in line for line in out["trace"])
    assert "\tERROR\tInvoke Error \t" in logs

    # ES modules: a .mjs file, and a .js file under "type": "module".
    set_handler(lam, name, "esm.handler")
    out, res, _ = invoke(lam, name, {"n": 7})
    assert out == {"esm": True, "platform": "linux", "n": 7}, out
    set_handler(lam, name, "sub/app.handler")
    out, res, _ = invoke(lam, name, {})
    assert out == {"esmJs": "undefined"}, out

    # The callback form: Node 20/22 answer when the event loop is empty (or at once with
    # callbackWaitsForEmptyEventLoop = false); Node 24 refuses callback handlers at init.
    set_handler(lam, name, "index.callback")
    out, res, _ = invoke(lam, name, {})
    if major >= 24:
        assert res["FunctionError"] == "Unhandled"
        assert out["errorType"] == "Runtime.CallbackHandlerDeprecated", out
        return
    assert "FunctionError" not in res, out
    assert out == {"via": "callback", "timerFired": True}
    set_handler(lam, name, "index.nowait")
    out, res, _ = invoke(lam, name, {})  # the pending one-minute timer does not hold it
    assert out == {"via": "nowait", "timerFired": False}, out
    out, res, _ = invoke(lam, name, {})  # the same (warm) environment serves the next one
    assert out == {"via": "nowait", "timerFired": False}, out


@pytest.mark.parametrize("major", MAJORS)
def test_node_layer_and_published_version(lam: Any, major: int) -> None:
    runtime = f"nodejs{major}.x"
    layer = lam.publish_layer_version(
        LayerName=new_name("nl"), CompatibleRuntimes=[runtime],
        Content={"ZipFile": make_zip({
            "nodejs/node_modules/greeter/package.json": '{"name": "greeter", "main": "lib.js"}',
            "nodejs/node_modules/greeter/lib.js": "exports.greet = (n) => `hi ${n} from a layer`;\n",
        })})
    code = ("const { greet } = require('greeter');\n"
            "exports.handler = async (e) => ({ msg: greet(e.who), v: process.env.AWS_LAMBDA_FUNCTION_VERSION });\n")
    name = new_name(f"nl{major}")
    lam.create_function(FunctionName=name, Runtime=runtime, Role=ROLE, Handler="index.handler",
                        Timeout=30, Layers=[layer["LayerVersionArn"]],
                        Code={"ZipFile": make_zip({"index.js": code})})
    out, res, _ = invoke(lam, name, {"who": "ann"})
    assert out == {"msg": "hi ann from a layer", "v": "$LATEST"}, out
    version = lam.publish_version(FunctionName=name)["Version"]
    assert version == "1"
    out, res, logs = invoke(lam, name, {"who": "bob"}, Qualifier=version)
    assert out == {"msg": "hi bob from a layer", "v": "1"}, out
    assert res["ExecutedVersion"] == "1"


@pytest.mark.parametrize("major", ONE)
def test_node_init_errors(lam: Any, major: int) -> None:
    runtime = f"nodejs{major}.x"
    name = new_name("nie")
    lam.create_function(
        FunctionName=name, Runtime=runtime, Role=ROLE, Handler="index.nothere", Timeout=30,
        Code={"ZipFile": make_zip({"index.js": "exports.handler = async () => 1;\n",
                                   "broken.js": "exports.handler = async () => {{ oops\n"})})
    out, res, logs = invoke(lam, name, {})
    assert res["FunctionError"] == "Unhandled"
    assert out["errorType"] == "Runtime.HandlerNotFound", out
    assert out["errorMessage"] == "index.nothere is undefined or not exported"
    assert isinstance(out["trace"], list)
    assert "Runtime.HandlerNotFound" in logs

    set_handler(lam, name, "broken.handler")
    out, res, _ = invoke(lam, name, {})
    assert out["errorType"] == "Runtime.UserCodeSyntaxError", out
    assert out["errorMessage"].startswith("SyntaxError:")

    set_handler(lam, name, "missing.handler")
    out, res, _ = invoke(lam, name, {})
    assert out["errorType"] == "Runtime.ImportModuleError", out
    assert "Cannot find module 'missing'" in out["errorMessage"]


@pytest.mark.parametrize("major", ONE)
def test_node_timeout(lam: Any, major: int) -> None:
    name = new_name("nto")
    code = "exports.handler = () => new Promise((resolve) => setTimeout(resolve, 60000));\n"
    lam.create_function(FunctionName=name, Runtime=f"nodejs{major}.x", Role=ROLE,
                        Handler="index.handler", Timeout=1,
                        Code={"ZipFile": make_zip({"index.js": code})})
    out, res, _ = invoke(lam, name, {})
    assert res["FunctionError"] == "Unhandled"
    assert out["errorType"] == "Sandbox.Timedout", out
    assert "Task timed out after 1.00 seconds" in out["errorMessage"]


def test_unknown_node_runtime_is_refused(lam: Any) -> None:
    with pytest.raises(lam.exceptions.InvalidParameterValueException) as info:
        lam.create_function(FunctionName=new_name("n99"), Runtime="nodejs99.x", Role=ROLE,
                            Handler="index.handler",
                            Code={"ZipFile": make_zip({"index.js": "exports.handler = 1;\n"})})
    message = info.value.response["Error"]["Message"]
    assert "nodejs99.x" in message
    for major in INSTALLED:  # names the Node runtimes this host has
        assert f"nodejs{major}.x" in message.split("Node.js runtimes on this host")[1]
    if not INSTALLED:
        assert "no Node.js runtime is installed" in message
