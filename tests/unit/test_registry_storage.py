"""The registry's storage shell on a real directory: uploads, digest checks that keep nothing,
manifests' references, tenant separation and collection with the time passed in (issue #14)."""

from __future__ import annotations

import json
import os

import pytest

from cellcloud.core.limits import Limits
from cellcloud.registry import core
from cellcloud.registry.core import RegistryError
from cellcloud.registry.storage import RegistryStore

A, B = "111111111111", "222222222222"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = "application/vnd.oci.image.config.v1+json"


def push_blob(st: RegistryStore, account: str, repo: str, data: bytes, now: int = 0,
              chunk: int = 3) -> str:
    s = st.upload_start(account, repo, now)
    for i in range(0, len(data), chunk):
        st.upload_append(s, data[i:i + chunk], i, now)
    digest = core.sha256_digest(data)
    st.upload_commit(s, digest, st.upload_digest(s), now)
    return digest


def manifest(config: str, layers: list[tuple[str, int]]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": core.OCI_MANIFEST,
                       "config": {"mediaType": CONFIG, "digest": config, "size": 2},
                       "layers": [{"mediaType": LAYER, "digest": d, "size": n}
                                  for d, n in layers]}).encode()


@pytest.fixture
def st(tmp_path: str) -> RegistryStore:
    s = RegistryStore(str(tmp_path), Limits(registry_upload_grace_ms=1000))
    s.create_repo(A, "team/app")
    s.create_repo(B, "team/app")  # the same name in another tenant: its own repository
    return s


def test_chunked_upload_and_read_back(st: RegistryStore) -> None:
    data = os.urandom(1000)
    d = push_blob(st, A, "team/app", data)
    assert st.blob_size(A, "team/app", d) == 1000
    assert st.blob_read(A, d, 10, 20) == data[10:30]
    assert st.blob_size(B, "team/app", d) is None  # another tenant's: unknown


def test_digest_mismatch_keeps_nothing(st: RegistryStore) -> None:
    s = st.upload_start(A, "team/app", 0)
    st.upload_append(s, b"hello", None, 0)
    wrong = core.sha256_digest(b"other")
    with pytest.raises(RegistryError) as e:
        st.upload_commit(s, wrong, st.upload_digest(s), 0)
    assert e.value.code == "DIGEST_INVALID"
    assert os.listdir(os.path.join(st.root, "uploads")) == []
    assert not os.path.exists(os.path.join(st.root, "blobs", A))
    assert st.statistics() == {"blobs": 0, "blob_bytes": 0, "uploads": 0}
    with pytest.raises(RegistryError):  # the session is gone too
        st.upload(A, "team/app", s.uuid)


def test_upload_session_of_another_tenant_is_unknown(st: RegistryStore) -> None:
    s = st.upload_start(A, "team/app", 0)
    with pytest.raises(RegistryError) as e:
        st.upload(B, "team/app", s.uuid)
    assert e.value.code == "BLOB_UPLOAD_UNKNOWN"


def test_manifest_naming_missing_blob_refused(st: RegistryStore) -> None:
    cfg = push_blob(st, A, "team/app", b"{}")
    missing = core.sha256_digest(b"never uploaded")
    with pytest.raises(RegistryError) as e:
        st.put_manifest(A, "team/app", "v1", manifest(cfg, [(missing, 14)]), core.OCI_MANIFEST)
    assert e.value.code == "MANIFEST_BLOB_UNKNOWN"
    assert st.images(A, "team/app") == []
    # A blob of tenant A does not satisfy tenant B's manifest.
    layer = push_blob(st, A, "team/app", b"layer")
    with pytest.raises(RegistryError) as e:
        st.put_manifest(B, "team/app", "v1", manifest(cfg, [(layer, 5)]), core.OCI_MANIFEST)
    assert e.value.code == "MANIFEST_BLOB_UNKNOWN"


def test_mount_within_tenant_only(st: RegistryStore) -> None:
    st.create_repo(A, "team/other")
    d = push_blob(st, A, "team/app", b"shared layer")
    assert st.mount(A, "team/other", "team/app", d, 0) == 12
    assert st.mount(B, "team/app", "team/app", d, 0) is None  # B's own team/app lacks it


def test_references_hold_blobs_and_collection_frees_the_rest(st: RegistryStore) -> None:
    cfg = push_blob(st, A, "team/app", b"{}", now=0)
    layer = push_blob(st, A, "team/app", b"layer", now=0)
    stray = push_blob(st, A, "team/app", b"stray", now=0)
    m = st.put_manifest(A, "team/app", "v1", manifest(cfg, [(layer, 5)]), core.OCI_MANIFEST)
    assert st.resolve(A, "team/app", "v1") == m.digest
    assert [d.digest for d in st.layers(A, "team/app", "v1")] == [layer]
    assert st.collect(999) == {"blobs_deleted": 0, "uploads_expired": 0,
                               "blobs_held": 0}  # within grace
    assert st.collect(1000)["blobs_deleted"] == 1  # the stray blob: no manifest names it
    assert not os.path.exists(st.blob_path(A, stray))
    assert os.path.exists(st.blob_path(A, layer))
    st.delete_manifest(A, "team/app", m.digest)
    assert st.collect(2000)["blobs_deleted"] == 2
    assert not os.path.exists(st.blob_path(A, layer))
    assert st.statistics()["blobs"] == 0


def test_idle_uploads_expire(tmp_path: str) -> None:
    st = RegistryStore(str(tmp_path), Limits(registry_upload_idle_ms=500))
    st.create_repo(A, "team/app")
    s = st.upload_start(A, "team/app", 0)
    assert st.collect(500)["uploads_expired"] == 0
    assert st.collect(501)["uploads_expired"] == 1
    assert os.listdir(os.path.join(st.root, "uploads")) == []
    assert s.uuid


def test_tags_pagination(st: RegistryStore) -> None:
    cfg = push_blob(st, A, "team/app", b"{}")
    body = manifest(cfg, [])
    for t in ["c", "a", "b", "d"]:
        st.put_manifest(A, "team/app", t, body, core.OCI_MANIFEST)
    assert st.tags(A, "team/app", 2, None) == ["a", "b"]
    assert st.tags(A, "team/app", 2, "b") == ["c", "d"]
    assert st.tags(B, "team/app", None, None) == []


def test_repository_not_empty_without_force(st: RegistryStore) -> None:
    from cellcloud.registry.storage import RepositoryNotEmpty

    cfg = push_blob(st, A, "team/app", b"{}")
    st.put_manifest(A, "team/app", "v1", manifest(cfg, []), core.OCI_MANIFEST)
    with pytest.raises(RepositoryNotEmpty):
        st.delete_repo(A, "team/app", force=False)
    st.delete_repo(A, "team/app", force=True)
    assert st.repo(A, "team/app") is None
    assert st.repo(B, "team/app") is not None


def test_a_blob_found_by_head_gets_its_grace_again(st: RegistryStore) -> None:
    cfg = push_blob(st, A, "team/app", b"{}", now=0)
    # A client HEADs the blob at 900 (and so skips uploading it), then pushes its manifest
    # after the first grace period would have ended: the blob must still be there.
    st.touch(A, cfg, 900)
    assert st.collect(1500)["blobs_deleted"] == 0
    st.put_manifest(A, "team/app", "v1", manifest(cfg, []), core.OCI_MANIFEST)
    assert st.collect(10_000)["blobs_deleted"] == 0


def test_repository_and_image_counts_are_capped(tmp_path: str) -> None:
    st = RegistryStore(str(tmp_path), Limits(registry_repos_per_tenant_max=2,
                                             registry_images_per_repo_max=1))
    st.create_repo(A, "one/a")
    st.create_repo(A, "one/b")
    with pytest.raises(RegistryError) as e:
        st.create_repo(A, "one/c")
    assert e.value.code == "DENIED"
    st.create_repo(B, "one/c")  # per tenant
    cfg = push_blob(st, A, "one/a", b"{}")
    layer = push_blob(st, A, "one/a", b"l")
    st.put_manifest(A, "one/a", "v1", manifest(cfg, []), core.OCI_MANIFEST)
    st.put_manifest(A, "one/a", "v2", manifest(cfg, []), core.OCI_MANIFEST)  # same image
    with pytest.raises(RegistryError) as e:
        st.put_manifest(A, "one/a", "v3", manifest(cfg, [(layer, 1)]), core.OCI_MANIFEST)
    assert e.value.code == "DENIED"
