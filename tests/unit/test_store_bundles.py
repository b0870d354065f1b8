"""Bundles are reference-counted and freed (issue #11): the frontend's store and Cell, in
process, without a region."""

from __future__ import annotations

import base64
import os
import sqlite3

import pytest

from cellcloud.core.errors import LambdaError
from cellcloud.core.limits import Limits
from cellcloud.frontend.cell import Cell
from cellcloud.frontend.store import SqliteFunctionStore
from tests.conftest import make_zip

ACCOUNT = "123456789012"


def code(tag: str) -> str:
    return base64.b64encode(make_zip({"app.py": f"# {tag}\ndef handler(e, c):\n    return 1\n"})
                            ).decode()


def bundle_files(store: SqliteFunctionStore) -> list[str]:
    return sorted(os.listdir(store.bundles_dir))


@pytest.fixture
def cell(tmp_path: str) -> Cell:
    return Cell("cell-t", SqliteFunctionStore(str(tmp_path)), {})


def create(cell: Cell, name: str, tag: str, **kw: object) -> dict[str, object]:
    return cell.catalog.create_function(ACCOUNT, {"FunctionName": name, "Runtime": "python3.11",
                                          "Handler": "app.handler",
                                          "Code": {"ZipFile": code(tag)}, **kw})


def test_delete_function_frees_its_bundle(cell: Cell) -> None:
    create(cell, "f1", "a")
    create(cell, "f2", "a")  # the same code: one file, two holders
    create(cell, "f3", "b")
    assert len(bundle_files(cell.store)) == 2
    cell.catalog.delete_function(ACCOUNT, "f1")
    assert len(bundle_files(cell.store)) == 2  # f2 still holds "a"
    cell.catalog.delete_function(ACCOUNT, "f2")
    cell.catalog.delete_function(ACCOUNT, "f3")
    assert bundle_files(cell.store) == []


def test_update_code_frees_the_old_bundle_unless_a_version_holds_it(cell: Cell) -> None:
    create(cell, "f", "a", Publish=True)  # version 1 holds "a"
    cell.catalog.update_code(ACCOUNT, "f", {"ZipFile": code("b")})
    assert len(bundle_files(cell.store)) == 2
    cell.catalog.update_code(ACCOUNT, "f", {"ZipFile": code("c")})  # "b" was held by $LATEST only
    assert len(bundle_files(cell.store)) == 2
    cell.catalog.delete_function(ACCOUNT, "f", "1")  # the version goes: "a" is free
    assert len(bundle_files(cell.store)) == 1
    cell.catalog.delete_function(ACCOUNT, "f")
    assert bundle_files(cell.store) == []


def test_dry_run_writes_no_bundle(cell: Cell) -> None:
    create(cell, "f", "a")
    before = bundle_files(cell.store)
    cell.catalog.update_code(ACCOUNT, "f", {"ZipFile": code("b"), "DryRun": True})
    assert bundle_files(cell.store) == before


def test_refused_create_leaves_no_bundle(tmp_path: str) -> None:
    # Refused after the zip was decoded: code and layer together are over the unzipped limit.
    cell = Cell("cell-t", SqliteFunctionStore(str(tmp_path)), {},
                limits=Limits(unzipped_bytes_max=60))
    doc = cell.catalog.publish_layer_version(ACCOUNT, "lib",
                                             {"Content": {"ZipFile": code("layer")}})
    before = bundle_files(cell.store)
    with pytest.raises(LambdaError) as e:
        create(cell, "g", "c", Layers=[doc["LayerVersionArn"]])
    assert "combined with layers" in e.value.message
    assert bundle_files(cell.store) == before


def test_layer_bundle_held_by_layer_versions_and_functions(cell: Cell) -> None:
    doc = cell.catalog.publish_layer_version(ACCOUNT, "lib",
                                             {"Content": {"ZipFile": code("layer")}})
    create(cell, "f", "a", Layers=[doc["LayerVersionArn"]])
    assert len(bundle_files(cell.store)) == 2
    cell.catalog.delete_layer_version(ACCOUNT, "lib", 1)
    assert len(bundle_files(cell.store)) == 2  # the function still uses the layer's code
    cell.catalog.update_configuration(ACCOUNT, "f", {"Layers": []})
    assert len(bundle_files(cell.store)) == 1


def test_freed_digests_are_queued_for_every_agent(tmp_path: str) -> None:
    cell = Cell("cell-t", SqliteFunctionStore(str(tmp_path)),
                {"agent-a": ("127.0.0.1", 1), "agent-b": ("127.0.0.1", 1)})
    create(cell, "f", "a")
    digest = cell.catalog.function(ACCOUNT, "f").code_sha256
    cell.catalog.delete_function(ACCOUNT, "f")
    assert cell._forget_pending == {"agent-a": {digest}, "agent-b": {digest}}


def test_a_bundle_being_pushed_is_freed_when_the_push_ends(cell: Cell) -> None:
    create(cell, "f", "a")
    digest = cell.catalog.function(ACCOUNT, "f").code_sha256
    cell.catalog.pin_bundles({digest})  # an environment is being created from it
    cell.catalog.delete_function(ACCOUNT, "f")
    assert len(bundle_files(cell.store)) == 1 and digest in cell.catalog.bundles_deferred


def test_start_sweeps_temp_files_and_orphans_and_builds_refs(tmp_path: str) -> None:
    store = SqliteFunctionStore(str(tmp_path))
    cell = Cell("cell-t", store, {})
    create(cell, "f", "a")
    digest = cell.catalog.function(ACCOUNT, "f").code_sha256
    held = bundle_files(store)
    orphan = os.path.join(store.bundles_dir, "f" * 64 + ".zip")
    tmp = os.path.join(store.bundles_dir, "e" * 64 + ".zip.tmp-1-2")
    for path in (orphan, tmp):
        with open(path, "wb") as f:
            f.write(b"x")
    # A state dir from before reference counting: no bundle_refs table.
    store.db.execute("DROP TABLE bundle_refs")
    store.db.close()
    again = SqliteFunctionStore(str(tmp_path))
    assert bundle_files(again) == held
    assert again.unreferenced([digest]) == []


def test_a_failed_write_rolls_back(tmp_path: str) -> None:
    store = SqliteFunctionStore(str(tmp_path))
    with pytest.raises(sqlite3.Error), store._tx("test"):
        store.db.execute("INSERT INTO nope VALUES (1)")
    assert not store.db.in_transaction
