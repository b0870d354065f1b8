"""A full state disk (issue #11), on a real small tmpfs: writes answer 507 ServiceException
(not 500 "OSError"), deletes still work (the store's reserve file gives SQLite the room), and
once space is freed, creates work again."""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from cellcloud.frontend.store import FunctionRecord, SqliteFunctionStore, StateDiskFull
from tests.conftest import make_zip
from tests.malformed_zips import APP

from .conftest import Region, start_region, stop_region

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def tmpfs(path: str, size: str) -> Iterator[str]:
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=True)


def fill(path: str) -> str:
    """Write a filler file until the filesystem is full (to the last byte); returns its path."""
    filler = os.path.join(path, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\xff" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def rec(name: str, sha: str) -> FunctionRecord:
    return FunctionRecord("123456789012", name, "python3.11", "app.handler", sha, 10)


@pytest.mark.parametrize("reserve_bytes", [0, 1 << 20])
def test_store_delete_on_a_full_disk_needs_the_reserve(tmp_path: str, reserve_bytes: int) -> None:
    """The negative control (no reserve) shows a delete really needs room on this disk."""
    with tmpfs(os.path.join(str(tmp_path), "state"), "4m") as state:
        store = SqliteFunctionStore(state, reserve_bytes=reserve_bytes)
        for i in range(50):
            store.put_bundle(f"{i:064x}", b"x" * 100)
            store.put_new(rec(f"f{i}", f"{i:064x}"))
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the WAL has no room left over
        filler = fill(state)
        with pytest.raises(StateDiskFull) as e:
            store.put_bundle("f" * 64, b"y" * 8192)
        assert e.value.status == 507 and "No space left" in e.value.message
        assert [n for n in os.listdir(store.bundles_dir) if ".tmp-" in n] == []
        if reserve_bytes == 0:
            with pytest.raises(StateDiskFull):
                store.delete("123456789012", "f1")
            assert store.get("123456789012", "f1") is not None  # rolled back, still usable
        else:
            assert store.delete("123456789012", "f1")
            assert store.get("123456789012", "f1") is None
            assert store.disk_space().reserve_bytes == 0  # given up for the delete
            os.unlink(filler)
            assert store.restore_reserve() and store.disk_space().reserve_bytes == reserve_bytes
        store.db.close()


def _call(region: Region, method: str, path: str, doc: dict[str, object] | None = None
          ) -> tuple[int, dict[str, str], dict[str, object]]:
    status, headers, body = region.client.request(
        method, path, json.dumps(doc).encode() if doc is not None else None,
        {"content-type": "application/json"})
    return status, headers, json.loads(body) if body else {}


def _create(region: Region, name: str) -> tuple[int, dict[str, str], dict[str, object]]:
    code = make_zip({"app.py": APP, "pad.txt": uuid.uuid4().hex * 200})
    return _call(region, "POST", "/2015-03-31/functions", {
        "FunctionName": name, "Runtime": "python3.11", "Handler": "app.handler",
        "Code": {"ZipFile": base64.b64encode(code).decode()}})


def test_region_on_a_full_disk(tmp_path: str) -> None:
    with tmpfs(os.path.join(str(tmp_path), "region"), "256m") as state:
        region = start_region(state, "--agents-per-cell", "1")
        filler = None
        try:
            assert _create(region, "keep")[0] == 201
            assert _create(region, "doomed")[0] == 201
            assert region.client.invoke("keep", {}).payload == b'{"ok": true}'
            before = region.client.status()["cells"]["cell-1"].get("disk")
            filler = fill(state)

            status, headers, body = _create(region, "refused")
            assert (status, headers.get("x-amzn-errortype")) == (507, "ServiceException"), body
            assert "No space left on the region's state disk" in str(body["message"])
            code = make_zip({"app.py": APP, "pad.txt": uuid.uuid4().hex * 200})
            status, headers, body = _call(region, "PUT", "/2015-03-31/functions/keep/code",
                                          {"ZipFile": base64.b64encode(code).decode()})
            assert (status, headers.get("x-amzn-errortype")) == (507, "ServiceException"), body
            status, _, body = _call(region, "POST", "/2018-10-31/layers/l/versions",
                                    {"Content": {"ZipFile": base64.b64encode(code).decode()}})
            assert status == 507, body

            # The way out: deletes work on the full disk.
            status, _, body = _call(region, "DELETE", "/2015-03-31/functions/doomed")
            assert status == 204, body
            assert _call(region, "GET", "/2015-03-31/functions/doomed")[0] == 404
            assert region.client.invoke("keep", {}).payload == b'{"ok": true}'
            disk = region.client.status()["cells"]["cell-1"]["disk"]  # the free space shows
            assert before is not None and disk["free_bytes"] < before["free_bytes"]
            assert disk["total_bytes"] == before["total_bytes"]

            os.unlink(filler)
            filler = None
            assert _create(region, "after")[0] == 201
            assert region.client.invoke("after", {}).payload == b'{"ok": true}'
            st = json.loads(region.cli("status", "--json").stdout)["status"]
            assert st["cells"]["cell-1"]["disk"]["total_bytes"] == before["total_bytes"]
        finally:
            if filler is not None:
                os.unlink(filler)
            stop_region(region)
