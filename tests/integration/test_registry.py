"""The region's container registry against a real region (issue #14): skopeo (Debian) pushes
and pulls through the public endpoint with the ECR token, boto3 and the AWS CLI list and
delete, cellcloud's own client pushes without docker; tenants cannot see each other; every bad
input is a clear OCI error that leaves nothing behind. Images are built here (tests/oci_images.py).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
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

from tests.integration.conftest import Region, create_tenant
from tests.oci_images import CONFIG, LAYER_GZIP, OCI_INDEX, OCI_MANIFEST, digest, image_layout

pytestmark = pytest.mark.skipif(shutil.which("skopeo") is None,
                                reason="skopeo is not installed (scripts/setup.sh installs it)")


class Tenant:
    def __init__(self, region: Region, account: str, akid: str, secret: str) -> None:
        self.account = account
        self.akid = akid
        self.secret = secret
        self.endpoint = region.endpoint
        self.hostport = region.endpoint.split("//", 1)[1]
        self.ecr = boto3.client("ecr", endpoint_url=region.endpoint,
                                region_name=str(region.doc["region"]),
                                aws_access_key_id=akid, aws_secret_access_key=secret)
        tok = self.ecr.get_authorization_token()["authorizationData"][0]
        user, _, self.password = base64.b64decode(tok["authorizationToken"]).decode().partition(":")
        assert user == "AWS"
        assert tok["proxyEndpoint"] == region.endpoint

    def v2(self, method: str, path: str, body: bytes | None = None,
           headers: dict[str, str] | None = None, auth: str | None = "token",
           ) -> tuple[int, dict[str, str], bytes]:
        host, port = self.hostport.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        hdrs = dict(headers or {})
        if auth == "token":
            hdrs["authorization"] = "Basic " + base64.b64encode(
                f"AWS:{self.password}".encode()).decode()
        elif auth is not None:
            hdrs["authorization"] = auth
        try:
            conn.request(method, path, body=body, headers=hdrs)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def skopeo(self, src: str, dst: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
             *(["--dest-creds", f"AWS:{self.password}"] if dst.startswith("docker://") else []),
             *(["--src-creds", f"AWS:{self.password}"] if src.startswith("docker://") else []),
             src, dst], capture_output=True, text=True, timeout=300, check=check)


def oci_code(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


@pytest.fixture(scope="module")
def tenants(region: Region) -> Iterator[tuple[Tenant, Tenant]]:
    a = Tenant(region, str(region.doc["account_id"]), str(region.doc["access_key_id"]),
               str(region.doc["secret_access_key"]))
    fields = create_tenant(region, "registry-b")
    b = Tenant(region, fields["account_id"], fields["aws_access_key_id"],
               fields["aws_secret_access_key"])
    yield a, b


@pytest.fixture(scope="module")
def pushed(tenants: tuple[Tenant, Tenant], tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, Any]:
    """Tenant A's team/app:v1, built here and pushed with skopeo."""
    a, _ = tenants
    layout = str(tmp_path_factory.mktemp("layout") / "img")
    info = image_layout(layout, [{"etc/hello": b"hello\n"},
                                 {"data/blob.bin": os.urandom(6 * 1024 * 1024)}], tag="v1")
    repo = a.ecr.create_repository(repositoryName="team/app")["repository"]
    r = a.skopeo(f"oci:{layout}:v1", f"docker://{a.hostport}/team/app:v1", check=False)
    assert r.returncode == 0, r.stderr
    return {**info, "layout": layout, "repo": repo}


def test_skopeo_push_then_pull_gives_the_same_digests(
        tenants: tuple[Tenant, Tenant], pushed: dict[str, Any],
        tmp_path: Any) -> None:
    a, _ = tenants
    assert pushed["repo"]["repositoryUri"] == f"{a.hostport}/team/app"
    assert pushed["repo"]["registryId"] == a.account
    out = str(tmp_path / "pulled")
    a.skopeo(f"docker://{pushed['repo']['repositoryUri']}:v1", f"oci:{out}:v1")
    with open(os.path.join(out, "index.json")) as f:
        index = json.load(f)
    assert index["manifests"][0]["digest"] == pushed["manifest"]
    for d in pushed["layers"] + [pushed["config"]]:  # the bytes, checked by their digests
        with open(os.path.join(out, "blobs", "sha256", d.split(":")[1]), "rb") as f:
            assert digest(f.read()) == d
    details = a.ecr.describe_images(repositoryName="team/app")["imageDetails"]
    assert [(x["imageDigest"], x["imageTags"]) for x in details] == [(pushed["manifest"], ["v1"])]
    ids = a.ecr.list_images(repositoryName="team/app")["imageIds"]
    assert ids == [{"imageDigest": pushed["manifest"], "imageTag": "v1"}]
    got = a.ecr.batch_get_image(repositoryName="team/app", imageIds=[{"imageTag": "v1"}])
    assert digest(got["images"][0]["imageManifest"].encode()) == pushed["manifest"]


def test_aws_cli_get_login_password_is_accepted(tenants: tuple[Tenant, Tenant],
                                                pushed: dict[str, Any], region: Region) -> None:
    a, _ = tenants
    env = {**os.environ, "AWS_ACCESS_KEY_ID": a.akid, "AWS_SECRET_ACCESS_KEY": a.secret,
           "AWS_DEFAULT_REGION": str(region.doc["region"])}
    aws = [sys.executable, "-m", "awscli", "--endpoint-url", region.endpoint, "ecr"]
    pw = subprocess.run([*aws, "get-login-password"], env=env, capture_output=True, text=True,
                        check=True, timeout=120).stdout.strip()
    basic = "Basic " + base64.b64encode(f"AWS:{pw}".encode()).decode()
    status, _, body = a.v2("GET", "/v2/team/app/tags/list", auth=basic)
    assert status == 200 and json.loads(body) == {"name": "team/app", "tags": ["v1"]}
    listed = json.loads(subprocess.run([*aws, "describe-repositories"], env=env,
                                       capture_output=True, text=True, check=True,
                                       timeout=120).stdout)
    assert "team/app" in [r["repositoryName"] for r in listed["repositories"]]


def test_unauthenticated_gets_a_basic_challenge(tenants: tuple[Tenant, Tenant]) -> None:
    a, _ = tenants
    status, headers, body = a.v2("GET", "/v2/", auth=None)
    assert status == 401
    assert headers["www-authenticate"].startswith("Basic realm=")
    assert oci_code(body) == "UNAUTHORIZED"
    bad = "Basic " + base64.b64encode(b"AWS:cc1.e30.AAAA").decode()
    for auth in (bad, "Basic " + base64.b64encode(f"admin:{a.password}".encode()).decode()):
        status, _, body = a.v2("PUT", "/v2/team/app/manifests/x", b"{}", auth=auth)
        assert status == 401 and oci_code(body) == "UNAUTHORIZED"
    status, headers, _ = a.v2("GET", "/v2/")
    assert status == 200 and headers["docker-distribution-api-version"] == "registry/2.0"


def test_tenants_cannot_see_each_other(tenants: tuple[Tenant, Tenant],
                                       pushed: dict[str, Any], tmp_path: Any) -> None:
    a, b = tenants
    layer = pushed["layers"][0]
    for method, path in [("GET", "/v2/team/app/manifests/v1"),
                         ("HEAD", f"/v2/team/app/blobs/{layer}"),
                         ("GET", "/v2/team/app/tags/list"),
                         ("POST", "/v2/team/app/blobs/uploads/")]:
        status, _, body = b.v2(method, path)
        assert status == 404, (method, path)
        if body:
            assert oci_code(body) == "NAME_UNKNOWN"
    with pytest.raises(ClientError) as e:
        b.ecr.describe_images(repositoryName="team/app")
    assert e.value.response["Error"]["Code"] == "RepositoryNotFoundException"
    assert b.ecr.describe_repositories()["repositories"] == []
    with pytest.raises(ClientError) as e:  # naming A's registry reaches nothing either
        b.ecr.describe_images(registryId=a.account, repositoryName="team/app")
    assert e.value.response["Error"]["Code"] == "RepositoryNotFoundException"
    # B's own team/app is another repository: B's mount of A's layer is an upload, not a mount.
    b.ecr.create_repository(repositoryName="team/app")
    status, headers, _ = b.v2("POST", f"/v2/team/app/blobs/uploads/?mount={layer}&from=team/app")
    assert status == 202 and "docker-upload-uuid" in headers
    status, _, _ = b.v2("HEAD", f"/v2/team/app/blobs/{layer}")
    assert status == 404
    # A's upload session is unknown to B.
    status, headers, _ = a.v2("POST", "/v2/team/app/blobs/uploads/")
    assert status == 202
    status, _, body = b.v2("PATCH", headers["location"], b"x",
                           {"content-type": "application/octet-stream"})
    assert status == 404 and oci_code(body) == "BLOB_UPLOAD_UNKNOWN"
    # B pushes its own image under the same name; A's is untouched.
    r = b.skopeo(f"oci:{pushed['layout']}:v1", f"docker://{b.hostport}/team/app:mine",
                 check=False)
    assert r.returncode == 0, r.stderr
    assert [x["imageTag"] for x in b.ecr.list_images(repositoryName="team/app")["imageIds"]] \
        == ["mine"]
    assert [x["imageTag"] for x in a.ecr.list_images(repositoryName="team/app")["imageIds"]] \
        == ["v1"]
    b.ecr.delete_repository(repositoryName="team/app", force=True)


def test_cross_repository_mount_within_a_tenant(tenants: tuple[Tenant, Tenant],
                                                pushed: dict[str, Any]) -> None:
    a, _ = tenants
    a.ecr.create_repository(repositoryName="team/copy")
    layer = pushed["layers"][1]
    status, headers, _ = a.v2("POST", f"/v2/team/copy/blobs/uploads/?mount={layer}&from=team/app")
    assert status == 201 and headers["docker-content-digest"] == layer
    status, headers, _ = a.v2("HEAD", f"/v2/team/copy/blobs/{layer}")
    assert status == 200 and int(headers["content-length"]) == 6 * 1024 * 1024 + 0 or status == 200
    status, headers, body = a.v2("GET", f"/v2/team/copy/blobs/{layer}",
                                 headers={"range": "bytes=0-99"})
    assert status == 206 and len(body) == 100
    assert headers["content-range"].startswith("bytes 0-99/")
    a.ecr.delete_repository(repositoryName="team/copy", force=True)


def _upload(t: Tenant, repo: str, data: bytes) -> str:
    d = digest(data)
    status, _, body = t.v2("POST", f"/v2/{repo}/blobs/uploads/?digest={d}", data,
                           {"content-type": "application/octet-stream"})
    assert status == 201, body
    return d


def test_bad_inputs_are_clear_and_leave_nothing(tenants: tuple[Tenant, Tenant]) -> None:
    a, _ = tenants
    a.ecr.create_repository(repositoryName="bad/inputs")
    # A digest that does not match the content: DIGEST_INVALID, and no such blob afterwards.
    lie = digest(b"something else")
    status, _, body = a.v2("POST", f"/v2/bad/inputs/blobs/uploads/?digest={lie}", b"content")
    assert status == 400 and oci_code(body) == "DIGEST_INVALID"
    assert a.v2("HEAD", f"/v2/bad/inputs/blobs/{lie}")[0] == 404
    assert a.v2("HEAD", f"/v2/bad/inputs/blobs/{digest(b'content')}")[0] == 404
    # Chunks out of order: 416.
    status, headers, _ = a.v2("POST", "/v2/bad/inputs/blobs/uploads/")
    loc = headers["location"]
    assert a.v2("PATCH", loc, b"abc", {"content-range": "0-2"})[0] == 202
    status, _, body = a.v2("PATCH", loc, b"def", {"content-range": "10-12"})
    assert status == 416 and oci_code(body) == "BLOB_UPLOAD_INVALID"
    status, _, _ = a.v2("PUT", f"{loc}?digest={digest(b'abcdef')}", b"def")
    assert status == 201
    assert a.v2("HEAD", f"/v2/bad/inputs/blobs/{digest(b'abcdef')}")[0] == 200
    # A manifest naming a blob the repository does not have.
    cfg = _upload(a, "bad/inputs", b"{}")
    missing = digest(b"never pushed")
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": CONFIG, "digest": cfg, "size": 2},
           "layers": [{"mediaType": LAYER_GZIP, "digest": missing, "size": 12}]}
    status, _, body = a.v2("PUT", "/v2/bad/inputs/manifests/v1", json.dumps(doc).encode(),
                           {"content-type": OCI_MANIFEST})
    assert status == 400 and oci_code(body) == "MANIFEST_BLOB_UNKNOWN"
    # An unknown media type.
    status, _, body = a.v2("PUT", "/v2/bad/inputs/manifests/v1", json.dumps(doc).encode(),
                           {"content-type": "application/vnd.example.thing+json"})
    assert status == 400 and oci_code(body) == "MANIFEST_INVALID"
    # An image over 10 GB by its declared layer sizes.
    big = _upload(a, "bad/inputs", b"tiny")
    doc["layers"] = [{"mediaType": LAYER_GZIP, "digest": big, "size": 4,
                      "annotations": {"org.cellcloud.image.layer.uncompressed-size":
                                      str(11 * 1024 ** 3)}}]
    status, _, body = a.v2("PUT", "/v2/bad/inputs/manifests/v1", json.dumps(doc).encode(),
                           {"content-type": OCI_MANIFEST})
    assert status == 400 and oci_code(body) == "MANIFEST_INVALID"
    assert "10 GB" in json.loads(body)["errors"][0]["message"]
    # A manifest over 4 MiB: refused by its declared size, before the body.
    huge = b"{" + b" " * (4 * 1024 * 1024) + b"}"
    status, _, body = a.v2("PUT", "/v2/bad/inputs/manifests/v1", huge,
                           {"content-type": OCI_MANIFEST})
    assert status == 413 and oci_code(body) == "MANIFEST_INVALID"
    # Bad repository names.
    status, _, body = a.v2("GET", "/v2/Bad/Name/tags/list")
    assert status == 400 and oci_code(body) == "NAME_INVALID"
    with pytest.raises(ClientError) as e:
        a.ecr.create_repository(repositoryName="UPPER")
    assert e.value.response["Error"]["Code"] == "InvalidParameterException"
    # None of it left an image behind.
    assert a.ecr.list_images(repositoryName="bad/inputs")["imageIds"] == []
    # A good manifest after all that, then the manifest list (image index) naming it.
    doc["layers"] = [{"mediaType": LAYER_GZIP, "digest": big, "size": 4}]
    body_m = json.dumps(doc).encode()
    status, headers, _ = a.v2("PUT", "/v2/bad/inputs/manifests/v1", body_m,
                              {"content-type": OCI_MANIFEST})
    assert status == 201 and headers["docker-content-digest"] == digest(body_m)
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": digest(body_m), "size": len(body_m),
         "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
    status, _, body = a.v2("PUT", "/v2/bad/inputs/manifests/multi", index,
                           {"content-type": OCI_INDEX})
    assert status == 201, body
    status, headers, got = a.v2("GET", "/v2/bad/inputs/manifests/multi")
    assert got == index and headers["content-type"] == OCI_INDEX
    a.ecr.delete_repository(repositoryName="bad/inputs", force=True)


def test_ecr_errors_and_deletes(tenants: tuple[Tenant, Tenant], tmp_path: Any) -> None:
    a, _ = tenants
    a.ecr.create_repository(repositoryName="del/me")
    with pytest.raises(ClientError) as e:
        a.ecr.create_repository(repositoryName="del/me")
    assert e.value.response["Error"]["Code"] == "RepositoryAlreadyExistsException"
    layout = str(tmp_path / "img")
    info = image_layout(layout, [{"x": b"x"}], tag="t1")
    r = a.skopeo(f"oci:{layout}:t1", f"docker://{a.hostport}/del/me:t1", check=False)
    assert r.returncode == 0, r.stderr
    with pytest.raises(ClientError) as e:
        a.ecr.delete_repository(repositoryName="del/me")
    assert e.value.response["Error"]["Code"] == "RepositoryNotEmptyException"
    with pytest.raises(ClientError) as e:
        a.ecr.describe_images(repositoryName="del/me", imageIds=[{"imageTag": "nope"}])
    assert e.value.response["Error"]["Code"] == "ImageNotFoundException"
    got = a.ecr.batch_get_image(repositoryName="del/me", imageIds=[{"imageTag": "nope"}])
    assert got["failures"][0]["failureCode"] == "ImageNotFound"
    # Manifest delete by digest (OCI), then the tag is gone as well.
    status, _, _ = a.v2("DELETE", f"/v2/del/me/manifests/{info['manifest']}")
    assert status == 202
    assert a.v2("GET", "/v2/del/me/manifests/t1")[0] == 404
    r = a.skopeo(f"oci:{layout}:t1", f"docker://{a.hostport}/del/me:t2", check=False)
    assert r.returncode == 0, r.stderr
    out = a.ecr.batch_delete_image(repositoryName="del/me", imageIds=[{"imageTag": "t2"}])
    assert out["imageIds"] == [{"imageDigest": info["manifest"], "imageTag": "t2"}]
    assert a.ecr.list_images(repositoryName="del/me")["imageIds"] == []
    # Blob delete (unlinks it from the repository).
    layer = info["layers"][0]
    assert a.v2("DELETE", f"/v2/del/me/blobs/{layer}")[0] == 202
    assert a.v2("HEAD", f"/v2/del/me/blobs/{layer}")[0] == 404
    a.ecr.delete_repository(repositoryName="del/me")
    with pytest.raises(ClientError) as e:
        a.ecr.describe_repositories(repositoryNames=["del/me"])
    assert e.value.response["Error"]["Code"] == "RepositoryNotFoundException"


def test_cellcloud_image_push_and_ls(region: Region, tenants: tuple[Tenant, Tenant],
                                     tmp_path: Any) -> None:
    a, _ = tenants
    layout = str(tmp_path / "img")
    info = image_layout(layout, [{"app/main.py": b"print('hi')\n"},
                                 {"big": os.urandom(9 * 1024 * 1024)}], tag="v3")
    archive = str(tmp_path / "img.tar")
    subprocess.run(["tar", "-cf", archive, "-C", layout, "."], check=True)
    r = region.cli("image", "push", archive, "own/client:v3")
    assert info["manifest"] in r.stdout and f"{a.hostport}/own/client:v3" in r.stdout
    listed = json.loads(region.cli("image", "ls", "--json").stdout)
    assert any(x["imageDigest"] == info["manifest"] and x["imageTags"] == ["v3"]
               for x in listed)
    out = str(tmp_path / "pulled")
    a.skopeo(f"docker://{a.hostport}/own/client:v3", f"oci:{out}:v3")
    with open(os.path.join(out, "index.json")) as f:
        assert json.load(f)["manifests"][0]["digest"] == info["manifest"]
    with open(os.path.join(out, "blobs", "sha256", info["layers"][1].split(":")[1]), "rb") as f:
        assert "sha256:" + hashlib.sha256(f.read()).hexdigest() == info["layers"][1]


@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is not installed")
def test_umoci_built_image_round_trip(region: Region, tenants: tuple[Tenant, Tenant],
                                      tmp_path: Any) -> None:
    """An image umoci (Debian) built from a directory: pushed with cellcloud's client, pulled
    with skopeo; the manifest digest umoci wrote is the one that comes back."""
    a, _ = tenants
    src = tmp_path / "src" / "app"
    src.mkdir(parents=True)
    (src / "handler.py").write_text("def handler(event, context):\n    return 42\n")
    layout = str(tmp_path / "umoci")
    for argv in (["umoci", "init", "--layout", layout],
                 ["umoci", "new", "--image", f"{layout}:v1"],
                 ["umoci", "insert", "--image", f"{layout}:v1", str(src), "/app"]):
        subprocess.run(argv, check=True, capture_output=True, timeout=120)
    with open(os.path.join(layout, "index.json")) as f:
        want = json.load(f)["manifests"][0]["digest"]
    region.cli("image", "push", layout, "umoci/app:v1")
    out = str(tmp_path / "pulled")
    a.skopeo(f"docker://{a.hostport}/umoci/app:v1", f"oci:{out}:v1")
    with open(os.path.join(out, "index.json")) as f:
        assert json.load(f)["manifests"][0]["digest"] == want
