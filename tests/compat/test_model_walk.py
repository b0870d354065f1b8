"""Issue #15: every operation of the installed botocore's ``lambda`` model gets an AWS-shaped
answer — it works, or it answers as AWS answers where a feature is absent (an empty list, a
not-found error, a refusal naming the feature) — never an unknown route (404/405), never 501.

Each operation is sent through boto3 with a minimal valid input made from its model's shapes
(required members only; a FunctionName/LayerName/Resource names a real function or layer
version, fresh for each operation so deletes do no harm). The answer must be a success or an
error code the operation's model lists (or one botocore models for every Lambda operation).
The coverage is in docs/lambda-api.md, and checked against this walk.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import botocore.session
import pytest
from botocore.exceptions import ClientError
from botocore.model import Shape

from tests.conftest import make_zip
from tests.integration.conftest import Region

from .conftest import ROLE, SUM, lambda_client, new_name

pytestmark = pytest.mark.integration

MODEL = botocore.session.get_session().get_service_model("lambda")
#: answered "absent" although they succeed: the empty list / the empty setting AWS answers
#: where no such resource exists
ABSENT_BUT_OK = {"ListEventSourceMappings", "ListCodeSigningConfigs",
                 "ListCapacityProviders", "ListDurableExecutionsByFunction",
                 "GetFunctionCodeSigningConfig", "DeleteFunctionCodeSigningConfig"}
#: errors AWS answers for any Lambda operation: not found, a bad value, and the JSON protocol's
#: ValidationException for a member that fails the model's constraints (a generated string
#: need not match a pattern; botocore does not check patterns)
#: optional members a minimal call of the operation needs to do its work
_ALSO = {"CreateFunction": ("Runtime", "Handler"), "UpdateFunctionCode": ("ZipFile",),
         "GetProvisionedConcurrencyConfig": ("Qualifier",),
         "DeleteProvisionedConcurrencyConfig": ("Qualifier",),
         "UpdateFunctionEventInvokeConfig": ("MaximumRetryAttempts",)}
GENERIC = {"ResourceNotFoundException", "InvalidParameterValueException", "ValidationException"}


class Walk:
    def __init__(self, lam: Any, account: str, region: str) -> None:
        self.lam = lam
        self.account = account
        self.region = region

    def function(self) -> str:
        name = new_name("w")
        self.lam.create_function(FunctionName=name, Runtime="python3.11", Role=ROLE,
                                 Handler="app.handler", Code={"ZipFile": make_zip({"app.py": SUM})})
        return name

    def layer(self) -> tuple[str, int]:
        name = new_name("wl")
        out = self.lam.publish_layer_version(LayerName=name,
                                             Content={"ZipFile": make_zip({"x.txt": "x"})})
        return name, int(out["Version"])

    def value(self, op: str, name: str, shape: Shape, ctx: dict[str, Any]) -> Any:
        if name in ctx:
            return ctx[name]
        t = shape.type_name
        if t == "structure":
            return {m: self.value(op, m, shape.members[m], ctx) for m in shape.required_members}
        if t == "list":
            return [self.value(op, name, shape.member, ctx)]  # type: ignore[attr-defined]
        if t == "map":
            return {"k": self.value(op, name, shape.value, ctx)}  # type: ignore[attr-defined]
        if t in ("integer", "long"):
            return max(1, int(shape.metadata.get("min", 1)))
        if t == "boolean":
            return False
        if t == "blob":
            return b"{}"
        if t == "timestamp":
            return "2026-01-01T00:00:00Z"
        if shape.enum:
            return shape.enum[0]
        if name.endswith("Arn") or name.endswith("ARN"):
            return f"arn:aws:lambda:{self.region}:{self.account}:function:nothing"
        return "x" * max(1, int(shape.metadata.get("min", 1)))

    def call(self, op: str) -> tuple[str, str]:
        """("ok", "") or ("error", code) for one minimal call of ``op``."""
        shape = MODEL.operation_model(op).input_shape
        ctx: dict[str, Any] = {}
        members = shape.members if shape is not None else {}
        if "FunctionName" in members or "Resource" in members:
            fn = self.function()
            ctx["FunctionName"] = fn
            ctx["Resource"] = f"arn:aws:lambda:{self.region}:{self.account}:function:{fn}"
            ctx["Principal"] = "s3.amazonaws.com"
            ctx["Action"] = "lambda:InvokeFunction"
        if "LayerName" in members:
            ctx["LayerName"], ctx["VersionNumber"] = self.layer()
            ctx["Principal"] = self.account
            ctx["Action"] = "lambda:GetLayerVersion"
        ctx["StatementId"] = "s1"
        ctx["MaximumRetryAttempts"] = 1
        ctx["Qualifier"] = "1"  # replaced by a version published for the call
        ctx["FunctionVersion"] = "$LATEST"
        if op == "GetLayerVersionByArn":
            layer, version = self.layer()
            ctx["Arn"] = f"arn:aws:lambda:{self.region}:{self.account}:layer:{layer}:{version}"
        if op == "CreateFunction":
            ctx.update(FunctionName=new_name("w"), Runtime="python3.11", Role=ROLE,
                       Handler="app.handler", Code={"ZipFile": make_zip({"app.py": SUM})})
        if op == "PublishLayerVersion":
            ctx["Content"] = {"ZipFile": make_zip({"x.txt": "x"})}
        if op in ("UpdateFunctionCode",):
            ctx["ZipFile"] = make_zip({"app.py": SUM})
        if op in ("Invoke", "InvokeAsync", "InvokeWithResponseStream"):
            ctx["Payload"] = ctx["InvokeArgs"] = b'{"a": 1, "b": 2}'
        args = {} if shape is None else {
            m: self.value(op, m, shape.members[m], ctx) for m in shape.required_members}
        args.update({k: ctx[k] for k in _ALSO.get(op, ())})
        fn = ctx.get("FunctionName", "")
        if "Qualifier" in args:  # a published version
            args["Qualifier"] = self.lam.publish_version(FunctionName=fn)["Version"]
        if op in ("GetAlias", "UpdateAlias", "DeleteAlias"):
            self.lam.create_alias(FunctionName=fn, Name=args["Name"], FunctionVersion="$LATEST")
        if op in ("GetPolicy", "RemovePermission"):
            self.lam.add_permission(FunctionName=fn, StatementId="s1", Principal="s3.amazonaws.com",
                                    Action="lambda:InvokeFunction")
        if op in ("GetLayerVersionPolicy", "RemoveLayerVersionPermission"):
            self.lam.add_layer_version_permission(
                LayerName=ctx["LayerName"], VersionNumber=ctx["VersionNumber"], StatementId="s1",
                Principal=self.account, Action="lambda:GetLayerVersion")
        if op in ("GetFunctionEventInvokeConfig", "UpdateFunctionEventInvokeConfig"):
            self.lam.put_function_event_invoke_config(FunctionName=fn, MaximumRetryAttempts=0)
        if op in ("GetProvisionedConcurrencyConfig", "DeleteProvisionedConcurrencyConfig"):
            self.lam.put_provisioned_concurrency_config(
                FunctionName=fn, Qualifier=args["Qualifier"], ProvisionedConcurrentExecutions=1)
        try:
            getattr(self.lam, botocore.xform_name(op))(**args)
        except ClientError as e:
            return "error", str(e.response["Error"]["Code"])
        return "ok", ""


@pytest.fixture(scope="module")
def walked(region: Region) -> dict[str, tuple[str, str]]:
    w = Walk(lambda_client(region), str(region.doc["account_id"]),
             str(region.doc["region"]))
    return {op: w.call(op) for op in MODEL.operation_names}


def test_every_operation_answers_as_aws(walked: dict[str, tuple[str, str]]) -> None:
    wrong = {}
    for op, (kind, code) in walked.items():
        if kind == "ok":
            continue
        modelled = {s.name for s in MODEL.operation_model(op).error_shapes} | GENERIC
        if code not in modelled or code == "ServiceException":
            wrong[op] = code
    assert wrong == {}


def test_coverage_is_in_the_docs(walked: dict[str, tuple[str, str]]) -> None:
    ok = sorted(op for op, (kind, _) in walked.items() if kind == "ok")
    real = [op for op in ok if op not in ABSENT_BUT_OK]
    doc = (Path(__file__).parents[2] / "docs" / "lambda-api.md").read_text()
    found = re.search(r"(\d+) of the (\d+) operations of the installed botocore", doc)
    assert found is not None
    assert (int(found[1]), int(found[2])) == (len(ok), len(walked)), ok
    assert f"so {len(real)} do real work" in doc


def test_print_the_walk(walked: dict[str, tuple[str, str]]) -> None:
    for op, (kind, code) in sorted(walked.items()):
        print(f"{op:45} {kind} {code}")
