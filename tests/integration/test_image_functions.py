"""Lambda functions from container images through a real region (issue #14): an image of this
host's Python with awslambdaric, pushed with skopeo (Debian) and with `cellcloud image push`,
created with boto3 as PackageType Image, invoked, updated to a second image that changes what
runs; another tenant's image is not reachable. Images are built here (tests/oci_images.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from tests.conftest import make_zip
from tests.integration.conftest import Region, create_tenant
from tests.integration.test_registry import Tenant
from tests.oci_images import host_python_layers, lambda_image

pytestmark = pytest.mark.skipif(shutil.which("skopeo") is None,
                                reason="skopeo is not installed (scripts/setup.sh installs it)")

ROLE = "arn:aws:iam::000000000000:role/r"
HANDLER = '''
import os
def handler(event, context):
    return {"version": "%s", "uid": os.getuid(), "cwd": os.getcwd(),
            "greeting": os.environ.get("GREETING"), "event": event}
'''


def _lambda(region: Region, t: Tenant) -> Any:
    return boto3.client("lambda", endpoint_url=region.endpoint,
                        region_name=str(region.doc["region"]), aws_access_key_id=t.akid,
                        aws_secret_access_key=t.secret)


@pytest.fixture(scope="module")
def tenants(region: Region) -> Iterator[tuple[Tenant, Tenant]]:
    a = Tenant(region, str(region.doc["account_id"]), str(region.doc["access_key_id"]),
               str(region.doc["secret_access_key"]))
    fields = create_tenant(region, "images-b")
    b = Tenant(region, fields["account_id"], fields["aws_access_key_id"],
               fields["aws_secret_access_key"])
    yield a, b


def test_image_function_create_invoke_update(region: Region, tenants: tuple[Tenant, Tenant],
                                             tmp_path: Any) -> None:
    a, b = tenants
    base = host_python_layers()
    v1 = lambda_image(str(tmp_path / "v1"), HANDLER % "v1", tag="v1",
                      env={"GREETING": "hello-v1"}, base=base)
    v2 = lambda_image(str(tmp_path / "v2"), HANDLER % "v2", tag="v2",
                      env={"GREETING": "hello-v2"}, base=base)
    a.ecr.create_repository(repositoryName="team/fn")
    r = a.skopeo(f"oci:{tmp_path / 'v1'}:v1", f"docker://{a.hostport}/team/fn:v1", check=False)
    assert r.returncode == 0, r.stderr
    archive = str(tmp_path / "v2.tar")
    subprocess.run(["tar", "-cf", archive, "-C", str(tmp_path / "v2"), "."], check=True)
    assert v2["manifest"] in region.cli("image", "push", archive, "team/fn:v2").stdout

    lam = _lambda(region, a)
    uri = f"{a.hostport}/team/fn:v1"
    created = lam.create_function(FunctionName="imgfn", PackageType="Image", Role=ROLE,
                                  Code={"ImageUri": uri}, Timeout=30,
                                  ImageConfig={"Command": ["app.handler"]})
    assert created["PackageType"] == "Image"
    assert created["CodeSha256"] == v1["manifest"].split(":")[1]
    assert created["ImageConfigResponse"] == {"ImageConfig": {"Command": ["app.handler"]}}
    assert "Runtime" not in created and "Handler" not in created
    # The first invokes at once: several environments created on agents lacking the layers
    # at the same moment (each layer is streamed to an agent once; the others wait for it).
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: lam.invoke(FunctionName="imgfn", Payload=b'{"n": 1}'),
                             range(4)))
    for out in outs:
        assert "FunctionError" not in out, out["Payload"].read()
    doc = json.loads(outs[0]["Payload"].read())
    assert doc["version"] == "v1" and doc["greeting"] == "hello-v1" and doc["event"] == {"n": 1}
    assert doc["cwd"] == "/var/task" and doc["uid"] != 0 and doc["uid"] != 1000

    got = lam.get_function(FunctionName="imgfn")
    assert got["Code"]["RepositoryType"] == "ECR" and got["Code"]["ImageUri"] == uri
    assert got["Code"]["ResolvedImageUri"] == f"{a.hostport}/team/fn@{v1['manifest']}"
    listed = {f["FunctionName"]: f for f in lam.list_functions()["Functions"]}
    assert listed["imgfn"]["PackageType"] == "Image"

    # The second image, by digest: what runs changes.
    updated = lam.update_function_code(FunctionName="imgfn",
                                       ImageUri=f"{a.hostport}/team/fn@{v2['manifest']}")
    assert updated["CodeSha256"] == v2["manifest"].split(":")[1]
    doc = json.loads(lam.invoke(FunctionName="imgfn", Payload=b"{}")["Payload"].read())
    assert doc["version"] == "v2" and doc["greeting"] == "hello-v2"

    # Another tenant's image, and an image that is not there: AWS-shaped refusals.
    lam_b = _lambda(region, b)
    for bad in (uri, f"{a.hostport}/team/fn:nope", f"{a.hostport}/none/such:v1"):
        with pytest.raises(ClientError) as e:
            lam_b.create_function(FunctionName="stolen", PackageType="Image", Role=ROLE,
                                  Code={"ImageUri": bad})
        assert e.value.response["Error"]["Code"] == "InvalidParameterValueException"
        assert "does not exist" in e.value.response["Error"]["Message"]
    # A bad override is refused; ImageConfig on a .zip function and Handler on an image
    # function are refused, not ignored.
    with pytest.raises(ClientError) as e:
        lam.update_function_configuration(FunctionName="imgfn", Handler="app.other")
    assert e.value.response["Error"]["Code"] == "InvalidParameterValueException"
    with pytest.raises(ClientError) as e:
        lam.update_function_configuration(FunctionName="imgfn",
                                          ImageConfig={"WorkingDirectory": "relative"})
    assert e.value.response["Error"]["Code"] == "InvalidParameterValueException"
    with pytest.raises(ClientError) as e:
        lam.create_function(FunctionName="zipfn", Runtime="python3.11", Role=ROLE,
                            Handler="app.handler",
                            Code={"ZipFile": make_zip({"app.py": "def handler(e, c): return 1"})},
                            ImageConfig={"Command": ["app.handler"]})
    assert e.value.response["Error"]["Code"] == "InvalidParameterValueException"
    # An override changes what runs (UpdateFunctionConfiguration ImageConfig).
    lam.update_function_configuration(FunctionName="imgfn",
                                      ImageConfig={"WorkingDirectory": "/tmp"})
    lam.get_waiter("function_updated_v2").wait(FunctionName="imgfn")
    doc = json.loads(lam.invoke(FunctionName="imgfn", Payload=b"{}")["Payload"].read())
    assert doc["cwd"] == "/tmp" and doc["version"] == "v2"
    lam.delete_function(FunctionName="imgfn")

    # The AWS CLI, as the "done when" names it.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": a.akid, "AWS_SECRET_ACCESS_KEY": a.secret,
           "AWS_DEFAULT_REGION": str(region.doc["region"])}
    aws = [sys.executable, "-m", "awscli", "--endpoint-url", region.endpoint, "lambda"]
    made = json.loads(subprocess.run(
        [*aws, "create-function", "--function-name", "clifn", "--package-type", "Image",
         "--code", f"ImageUri={a.hostport}/team/fn:v2", "--role", ROLE, "--timeout", "30"],
        env=env, capture_output=True, text=True, check=True, timeout=120).stdout)
    assert made["PackageType"] == "Image" and made["CodeSha256"] == v2["manifest"].split(":")[1]
    out_file = str(tmp_path / "out.json")
    r = subprocess.run([*aws, "invoke", "--function-name", "clifn",  # CLI v1: raw payload
                        "--payload", '{"cli": true}', out_file], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with open(out_file) as f:
        doc = json.load(f)
    assert doc["version"] == "v2" and doc["event"] == {"cli": True}
    lam.delete_function(FunctionName="clifn")


def test_a_deleted_image_fails_its_function(region: Region, tenants: tuple[Tenant, Tenant],
                                            tmp_path: Any) -> None:
    """As Lambda: a function whose image is deleted from the registry is Failed
    (StateReasonCode ImageDeleted) and its invocations fail, warm environment or not; the
    state is the registry's, so the same image pushed again makes it Active again."""
    a, _ = tenants
    img = lambda_image(str(tmp_path / "img"), HANDLER % "del", tag="v1",
                       base=host_python_layers())
    a.ecr.create_repository(repositoryName="team/del")
    archive = str(tmp_path / "img.tar")
    subprocess.run(["tar", "-cf", archive, "-C", str(tmp_path / "img"), "."], check=True)
    region.cli("image", "push", archive, "team/del:v1")
    lam = _lambda(region, a)
    lam.create_function(FunctionName="delfn", PackageType="Image", Role=ROLE, Timeout=30,
                        Code={"ImageUri": f"{a.hostport}/team/del:v1"},
                        ImageConfig={"Command": ["app.handler"]})
    assert "FunctionError" not in lam.invoke(FunctionName="delfn", Payload=b"{}")  # warm now

    gone = a.ecr.batch_delete_image(repositoryName="team/del", imageIds=[{"imageTag": "v1"}])
    assert gone["imageIds"] and not gone["failures"]
    conf = lam.get_function_configuration(FunctionName="delfn")
    assert conf["State"] == "Failed" and conf["StateReasonCode"] == "ImageDeleted"
    assert img["manifest"] in conf["StateReason"]
    assert lam.get_function(FunctionName="delfn")["Configuration"]["State"] == "Failed"
    listed = {f["FunctionName"]: f for f in lam.list_functions()["Functions"]}
    assert listed["delfn"]["State"] == "Failed"
    assert lam.list_versions_by_function(FunctionName="delfn")["Versions"][0]["State"] \
        == "Failed"
    for _ in range(2):  # the warm environment was retired with the image: nothing runs
        with pytest.raises(ClientError) as e:
            lam.invoke(FunctionName="delfn", Payload=b"{}")
        assert e.value.response["Error"]["Code"] == "ResourceConflictException"
        assert "Failed" in e.value.response["Error"]["Message"]

    region.cli("image", "push", archive, "team/del:v1")  # the same digest, back
    assert lam.get_function_configuration(FunctionName="delfn")["State"] == "Active"
    out = lam.invoke(FunctionName="delfn", Payload=b"{}")
    assert json.loads(out["Payload"].read())["version"] == "del"

    a.ecr.delete_repository(repositoryName="team/del", force=True)
    assert lam.get_function_configuration(FunctionName="delfn")["State"] == "Failed"
    with pytest.raises(ClientError) as e:
        lam.invoke(FunctionName="delfn", Payload=b"{}")
    assert e.value.response["Error"]["Code"] == "ResourceConflictException"
    lam.delete_function(FunctionName="delfn")
