"""A deleted image while functions point at it (frontend/image_functions.py, registry
collection): the functions on it are Failed (ImageDeleted) and refused at invoke, their
environments retired; the registry keeps the layers a function record still names."""

from __future__ import annotations

import os
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest

from cellcloud.core.errors import LambdaError
from cellcloud.core.limits import Limits
from cellcloud.frontend import image_functions
from cellcloud.frontend.store import FunctionRecord, SqliteFunctionStore
from cellcloud.registry import core
from cellcloud.registry.storage import RegistryStore
from tests.unit.test_registry_storage import A, manifest, push_blob


def _image_rec(name: str, repo: str, digest: str, layers: list[str]) -> FunctionRecord:
    return FunctionRecord(account=A, name=name, runtime="", handler="",
                          code_sha256=digest.split(":")[1], code_size=1, package_type="Image",
                          image={"uri": f"127.0.0.1:9/{repo}:v1", "repo": repo,
                                 "digest": digest, "layers": layers, "entrypoint": ["x"],
                                 "cmd": [], "workdir": "", "env": {}})


@pytest.fixture
def world(tmp_path: Any) -> SimpleNamespace:
    reg = RegistryStore(os.path.join(tmp_path, "registry"), Limits(registry_upload_grace_ms=1000))
    reg.create_repo(A, "team/app")
    cfg = push_blob(reg, A, "team/app", b"{}")
    layer = push_blob(reg, A, "team/app", b"layer")
    m = reg.put_manifest(A, "team/app", "v1", manifest(cfg, [(layer, 5)]), core.OCI_MANIFEST)
    store = SqliteFunctionStore(os.path.join(tmp_path, "functions"))
    retired: list[str] = []
    catalog = SimpleNamespace(registry=reg, store=store,
                              envs=SimpleNamespace(retire_function=retired.append))
    return SimpleNamespace(reg=reg, store=store, catalog=catalog, retired=retired, cfg=cfg,
                           layer=layer, digest=m.digest)


def test_a_function_on_a_deleted_image_is_failed_and_refused(world: Any) -> None:
    rec = _image_rec("fn", "team/app", world.digest, [world.layer])
    assert image_functions.state_fields(world.catalog, rec) == {}
    image_functions.check_runnable(world.catalog, rec)  # Active: no error
    world.reg.delete_manifest(A, "team/app", world.digest)
    fields = image_functions.state_fields(world.catalog, rec)
    assert fields["State"] == "Failed" and fields["StateReasonCode"] == "ImageDeleted"
    assert f"team/app@{world.digest}" in fields["StateReason"]
    with pytest.raises(LambdaError) as e:
        image_functions.check_runnable(world.catalog, rec)
    assert e.value.status == 409 and e.value.type == "ResourceConflictException"
    zip_rec = replace(rec, package_type="Zip", image={})
    assert image_functions.state_fields(world.catalog, zip_rec) == {}


def test_deleting_an_image_retires_exactly_the_functions_on_it(world: Any) -> None:
    on_it = _image_rec("on-it", "team/app", world.digest, [world.layer])
    other_repo = _image_rec("other-repo", "team/other", world.digest, [world.layer])
    other_image = _image_rec("other-image", "team/app", "sha256:" + "2" * 64, [world.layer])
    for rec in (on_it, other_repo, other_image):
        assert world.store.put_new(rec)
    v1 = world.store.publish_version(on_it)
    zip_rec = FunctionRecord(account=A, name="zip", runtime="python3.11", handler="a.h",
                             code_sha256="3" * 64, code_size=1)
    assert world.store.put_new(zip_rec)
    image_functions.images_deleted(world.catalog, A, "team/app", {world.digest})
    assert sorted(world.retired) == sorted([on_it.key, v1.key])


def test_collection_keeps_the_layers_a_function_names(world: Any) -> None:
    rec = _image_rec("fn", "team/app", world.digest, [world.layer])
    assert world.store.put_new(rec)
    world.reg.delete_manifest(A, "team/app", world.digest)

    def keep(account: str) -> set[str]:
        return image_functions.held_layers(world.catalog, account)

    got = world.reg.collect(10_000, keep)
    assert got["blobs_deleted"] == 1 and got["blobs_held"] == 1  # the config goes
    assert os.path.exists(world.reg.blob_path(A, world.layer))
    assert not os.path.exists(world.reg.blob_path(A, world.cfg))
    assert world.store.delete(A, "fn")  # no record names it any more: collected
    assert world.reg.collect(20_000, keep)["blobs_deleted"] == 1
    assert not os.path.exists(world.reg.blob_path(A, world.layer))
