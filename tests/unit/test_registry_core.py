"""The registry's pure core: digests, names, routes, manifests, upload sessions, collection,
the registry token and the layer entry checker (issue #14)."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cellcloud.core.limits import DEFAULT_LIMITS, Limits
from cellcloud.registry import core
from cellcloud.registry.core import RegistryError, TarEntry

D1 = "sha256:" + "a" * 64
D2 = "sha256:" + "b" * 64
D3 = "sha256:" + "c" * 64
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = "application/vnd.oci.image.config.v1+json"


def image(layers: list[dict[str, object]] | None = None, **extra: object) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": core.OCI_MANIFEST,
           "config": {"mediaType": CONFIG, "digest": D1, "size": 10},
           "layers": layers if layers is not None else [
               {"mediaType": LAYER, "digest": D2, "size": 100}], **extra}
    return json.dumps(doc).encode()


def code(e: pytest.ExceptionInfo[RegistryError]) -> tuple[int, str]:
    return e.value.status, e.value.code


# -- digests, names, references ----------------------------------------------------------------

def test_digest_shapes() -> None:
    assert core.parse_digest(D1) == "a" * 64
    for bad in ["sha256:" + "A" * 64, "sha256:abc", "sha512:" + "a" * 128, "a" * 64,
                "sha256:" + "a" * 64 + "\n", "sha256:../../etc/passwd"]:
        with pytest.raises(RegistryError) as e:
            core.parse_digest(bad)
        assert code(e) == (400, "DIGEST_INVALID")


@pytest.mark.parametrize("name", ["team/app", "ab", "a/b/c", "my-app_1.x", "x" * 256])
def test_good_repository_names(name: str) -> None:
    assert core.check_repo_name(name) == name


@pytest.mark.parametrize("name", ["a", "Team/app", "team//app", "/app", "app/", "../app",
                                  "team/../app", "a" * 257, "app:tag", "app@x", "-app", "app-"])
def test_bad_repository_names(name: str) -> None:
    with pytest.raises(RegistryError) as e:
        core.check_repo_name(name)
    assert code(e) == (400, "NAME_INVALID")


def test_references() -> None:
    assert core.check_reference("v1.0") == "v1.0"
    assert core.check_reference(D1) == D1
    with pytest.raises(RegistryError):
        core.check_reference(".hidden")
    with pytest.raises(RegistryError):
        core.check_reference("sha256:short")


# -- routes -------------------------------------------------------------------------------------

def test_routes_with_slashes_in_names() -> None:
    assert core.parse_v2_path("/v2/") == core.V2Route("base")
    assert core.parse_v2_path("/v2/team/app/manifests/v1") == core.V2Route(
        "manifest", "team/app", "v1")
    assert core.parse_v2_path(f"/v2/a/b/c/blobs/{D1}") == core.V2Route("blob", "a/b/c", D1)
    assert core.parse_v2_path("/v2/team/app/blobs/uploads/") == core.V2Route(
        "upload_start", "team/app")
    assert core.parse_v2_path("/v2/team/app/blobs/uploads/1234-abcd") == core.V2Route(
        "upload", "team/app", "1234-abcd")
    assert core.parse_v2_path("/v2/team/app/tags/list") == core.V2Route("tags", "team/app")
    with pytest.raises(RegistryError) as e:
        core.parse_v2_path("/v2/Bad/manifests/v1")
    assert code(e) == (400, "NAME_INVALID")


def test_route_body_caps() -> None:
    manifest = core.parse_v2_path("/v2/team/app/manifests/v1")
    upload = core.parse_v2_path("/v2/team/app/blobs/uploads/x")
    blob = core.parse_v2_path(f"/v2/team/app/blobs/{D1}")
    assert core.route_body_bytes_max(manifest, "PUT") == DEFAULT_LIMITS.registry_manifest_bytes_max
    assert core.route_body_bytes_max(manifest, "GET") == 0
    assert core.route_body_bytes_max(upload, "PATCH") == DEFAULT_LIMITS.registry_blob_bytes_max
    assert core.route_body_bytes_max(blob, "GET") == 0


# -- manifests ----------------------------------------------------------------------------------

def test_image_manifest_parsed() -> None:
    body = image()
    m = core.parse_manifest(body, core.OCI_MANIFEST)
    assert m.digest == core.sha256_digest(body)
    assert m.blob_digests() == [D1, D2]
    assert not m.is_index


def test_docker_v2_and_index_types() -> None:
    doc = json.loads(image())
    doc["mediaType"] = core.DOCKER_MANIFEST
    doc["config"]["mediaType"] = "application/vnd.docker.container.image.v1+json"
    doc["layers"][0]["mediaType"] = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    m = core.parse_manifest(json.dumps(doc).encode(), core.DOCKER_MANIFEST)
    assert m.media_type == core.DOCKER_MANIFEST
    index = json.dumps({"schemaVersion": 2, "mediaType": core.DOCKER_LIST, "manifests": [
        {"mediaType": core.DOCKER_MANIFEST, "digest": D3, "size": 5,
         "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
    i = core.parse_manifest(index, core.DOCKER_LIST)
    assert i.is_index and [d.digest for d in i.manifests] == [D3]
    assert core.missing_references(i, set(), set()) == [D3]
    assert core.missing_references(i, set(), {D3}) == []


def test_manifest_too_large_is_413() -> None:
    small = Limits(registry_manifest_bytes_max=100)
    with pytest.raises(RegistryError) as e:
        core.parse_manifest(image(), core.OCI_MANIFEST, small)
    assert code(e) == (413, "MANIFEST_INVALID")


@pytest.mark.parametrize("body,ctype", [
    (b"not json", core.OCI_MANIFEST),
    (b"[]", core.OCI_MANIFEST),
    (json.dumps({"schemaVersion": 1}).encode(), core.OCI_MANIFEST),
    (image(), "application/vnd.example.unknown+json"),
    (image(layers=[{"mediaType": "text/plain", "digest": D2, "size": 1}]), core.OCI_MANIFEST),
    (image(layers=[{"mediaType": LAYER, "digest": "md5:x", "size": 1}]), core.OCI_MANIFEST),
    (image(layers=[{"mediaType": LAYER, "digest": D2, "size": -1}]), core.OCI_MANIFEST),
    (image(), core.OCI_INDEX),  # mediaType in the body disagrees with Content-Type
])
def test_bad_manifests_are_manifest_invalid(body: bytes, ctype: str) -> None:
    with pytest.raises(RegistryError) as e:
        core.parse_manifest(body, ctype)
    assert e.value.code == "MANIFEST_INVALID"
    assert e.value.status == 400


def test_image_over_ten_gigabytes_declared() -> None:
    gib = 1024 ** 3
    over = [{"mediaType": LAYER, "digest": D2, "size": 6 * gib},
            {"mediaType": LAYER, "digest": D3, "size": 5 * gib}]
    with pytest.raises(RegistryError) as e:
        core.parse_manifest(image(over), core.OCI_MANIFEST)
    assert code(e) == (400, "MANIFEST_INVALID")
    # A small compressed layer that declares a huge uncompressed size counts the declared one.
    annotated = [{"mediaType": LAYER, "digest": D2, "size": 1000,
                  "annotations": {core.UNCOMPRESSED_SIZE_ANNOTATION: str(11 * gib)}}]
    with pytest.raises(RegistryError):
        core.parse_manifest(image(annotated), core.OCI_MANIFEST)
    under = [{"mediaType": LAYER, "digest": D2, "size": 9 * gib}]
    assert core.parse_manifest(image(under), core.OCI_MANIFEST).declared_bytes() == 9 * gib


def test_descriptor_size_must_match_blob() -> None:
    m = core.parse_manifest(image(), core.OCI_MANIFEST)
    core.check_blob_sizes(m, {D1: 10, D2: 100})
    with pytest.raises(RegistryError) as e:
        core.check_blob_sizes(m, {D1: 10, D2: 99})
    assert e.value.code == "MANIFEST_INVALID"


def test_missing_blobs_named() -> None:
    m = core.parse_manifest(image(), core.OCI_MANIFEST)
    assert core.missing_references(m, {D1}, set()) == [D2]


# -- upload sessions ----------------------------------------------------------------------------

def test_upload_session_in_order() -> None:
    s = core.UploadSession("u", "111111111111", "team/app", 0, 0)
    s.check_append(0, 10)
    s.appended(10, 5)
    s.check_append(None, 10)
    s.appended(10, 6)
    assert s.offset == 20 and s.touched_ms == 6
    with pytest.raises(RegistryError) as e:
        s.check_append(5, 10)
    assert code(e) == (416, "BLOB_UPLOAD_INVALID")
    assert e.value.headers["range"] == "0-19"


def test_upload_over_blob_cap() -> None:
    s = core.UploadSession("u", "1", "r", 0, 0)
    with pytest.raises(RegistryError) as e:
        s.check_append(None, 101, Limits(registry_blob_bytes_max=100))
    assert code(e) == (413, "SIZE_INVALID")


def test_upload_commit_digest_mismatch() -> None:
    s = core.UploadSession("u", "1", "r", 3, 0)
    s.check_commit(D1, D1)
    with pytest.raises(RegistryError) as e:
        s.check_commit(D1, D2)
    assert code(e) == (400, "DIGEST_INVALID")


def test_upload_expiry_with_time_passed_in() -> None:
    lim = Limits(registry_upload_idle_ms=1000)
    s = core.UploadSession("u", "1", "r", 0, touched_ms=10_000)
    assert not s.expired(11_000, lim)
    assert s.expired(11_001, lim)


def test_content_range() -> None:
    assert core.parse_content_range("0-99") == (0, 99)
    assert core.parse_content_range("bytes=100-199") == (100, 199)
    assert core.parse_content_range(None) is None
    for bad in ["x-y", "10", "-5", "20-3"]:
        with pytest.raises(RegistryError):
            core.parse_content_range(bad)


def test_range() -> None:
    assert core.parse_range("bytes=0-9", 100) == (0, 9)
    assert core.parse_range("bytes=90-", 100) == (90, 99)
    assert core.parse_range("bytes=-10", 100) == (90, 99)
    assert core.parse_range("bytes=50-500", 100) == (50, 99)
    with pytest.raises(RegistryError) as e:
        core.parse_range("bytes=100-", 100)
    assert e.value.status == 416


# -- collection ---------------------------------------------------------------------------------

def test_unreferenced_blobs_collected_after_grace() -> None:
    lim = Limits(registry_upload_grace_ms=1000)
    blobs = [core.BlobState(D1, refs=1, linked_ms=0),      # referenced: kept forever
             core.BlobState(D2, refs=0, linked_ms=0),      # unreferenced, old: collected
             core.BlobState(D3, refs=0, linked_ms=500)]    # unreferenced, within grace
    assert core.collectable(blobs, 999, lim) == []
    assert core.collectable(blobs, 1000, lim) == [D2]
    assert core.collectable(blobs, 1500, lim) == [D2, D3]


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10_000)), max_size=20),
       st.integers(0, 20_000))
def test_collect_never_takes_a_referenced_blob(rows: list[tuple[int, int]], now: int) -> None:
    blobs = [core.BlobState(f"sha256:{i:064x}", refs, t) for i, (refs, t) in enumerate(rows)]
    taken = set(core.collectable(blobs, now, Limits(registry_upload_grace_ms=5000)))
    for b in blobs:
        assert (b.digest in taken) == (b.refs == 0 and now - b.linked_ms >= 5000)


# -- the registry token -------------------------------------------------------------------------

KEY = b"k" * 32


def test_token_round_trip_and_expiry() -> None:
    pw, expires = core.make_password(KEY, "123456789012", 1000, 43_200)
    assert expires == 44_200
    assert core.verify_password(KEY, pw, 1000) == "123456789012"
    assert core.verify_password(KEY, pw, 44_199) == "123456789012"
    assert core.verify_password(KEY, pw, 44_200) is None  # expired
    assert core.verify_password(b"x" * 32, pw, 1000) is None  # another region's key
    tok = core.authorization_token(pw)
    assert base64.b64decode(tok).decode() == f"AWS:{pw}"


def test_token_cannot_be_edited_to_another_tenant() -> None:
    pw, _ = core.make_password(KEY, "111111111111", 0, 100)
    prefix, payload, sig = pw.split(".")
    forged_payload = base64.urlsafe_b64encode(
        json.dumps({"a": "222222222222", "e": 100}, separators=(",", ":")).encode()).decode()
    assert core.verify_password(KEY, f"{prefix}.{forged_payload}.{sig}", 0) is None
    assert core.verify_password(KEY, "garbage", 0) is None
    assert core.verify_password(KEY, "cc1.!!.!!", 0) is None


def test_basic_header() -> None:
    hdr = "Basic " + base64.b64encode(b"AWS:pw:with:colons").decode()
    assert core.parse_basic(hdr) == ("AWS", "pw:with:colons")
    assert core.parse_basic("Bearer x") is None
    assert core.parse_basic("Basic !!!") is None
    assert core.parse_basic("Basic " + base64.b64encode(b"nocolon").decode()) is None


# -- layer entries (the later unpack step) ------------------------------------------------------

@pytest.mark.parametrize("entry", [
    TarEntry("../etc/passwd", "file"),
    TarEntry("a/../../x", "file"),
    TarEntry("dev/sda", "blockdev"),
    TarEntry("dev/tty", "chardev"),
    TarEntry("p", "fifo"),
    TarEntry("bin/su", "file", 0o4755),
    TarEntry("bin/sg", "file", 0o2755),
    TarEntry("lib/evil", "symlink", linkname="../../../etc/shadow"),
    TarEntry("h", "hardlink", linkname="../outside"),
])
def test_tar_entries_refused(entry: TarEntry) -> None:
    assert core.tar_entry_problem(entry) is not None


@pytest.mark.parametrize("entry", [
    TarEntry("usr/bin/python3", "file", 0o755),
    TarEntry("./etc/", "dir", 0o755),
    TarEntry("lib/libc.so", "symlink", linkname="libc.so.6"),
    TarEntry("usr/lib/x", "symlink", linkname="../../lib/x"),
    TarEntry("bin/sh", "symlink", linkname="/bin/dash"),  # absolute: resolved inside the root
])
def test_tar_entries_allowed(entry: TarEntry) -> None:
    assert core.tar_entry_problem(entry) is None
