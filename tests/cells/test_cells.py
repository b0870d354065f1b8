"""Cells with real processes: the control plane's map push, router static stability, tenant
migration under continuous invokes, and the blast-radius experiment (slow)."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
import zipfile
from collections.abc import Callable, Iterator

import pytest

from cellcloud import sdk
from cellcloud.region.tenants import create_tenant
from tests.integration.conftest import Region, running_region

deadline_s = 30.0


def wait_for(what: str, cond: Callable[[], bool]) -> None:
    end = time.monotonic() + deadline_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("app.py", "def handler(event, context):\n    return event\n")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    with running_region(tmp_path_factory, "cells", "--cells", "2",
                     "--agents-per-cell", "1") as r:
        yield r


def router_map(r: Region) -> dict[str, object]:
    doc: dict[str, object] = r.client.status()["router"]["cell_map"]
    return doc


def test_control_pushes_the_map_and_assigns_new_tenants(cells: Region) -> None:
    t = create_tenant(cells.state_dir, "pushed")
    wait_for("the new tenant in the router's map", lambda: t["account_id"] in json.load(
        open(os.path.join(cells.state_dir, "cellmap.json")))["assignments"])
    before = router_map(cells)["pushes"]
    wait_for("another push", lambda: router_map(cells)["pushes"] != before)  # constant work
    assert router_map(cells)["stale"] is False


def test_router_keeps_serving_when_the_control_plane_is_gone(cells: Region) -> None:
    cells.client.create_function("echo", _zip(), "app.handler", runtime="python3.11")
    pid = int(cells.region_json()["components"]["control"]["pid"])  # type: ignore[index]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for("the router to report a stale map", lambda: router_map(cells)["stale"] is True)
        for i in range(20):
            assert cells.client.invoke("echo", {"i": i}).json() == {"i": i}
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for("fresh pushes again", lambda: router_map(cells)["stale"] is False)


def test_migration_under_continuous_invokes(cells: Region) -> None:
    t = create_tenant(cells.state_dir, "mover")
    client = sdk.Client(cells.endpoint, (t["access_key_id"], t["secret_access_key"]))
    wait_for("the tenant's assignment", lambda: t["account_id"] in json.load(
        open(os.path.join(cells.state_dir, "cellmap.json")))["assignments"])
    source = json.load(open(os.path.join(cells.state_dir, "cellmap.json")))["assignments"][
        t["account_id"]]
    target = "cell-2" if source == "cell-1" else "cell-1"
    client.create_function("echo", _zip(), "app.handler", runtime="python3.11")
    # Versions, aliases and concurrency settings move with the function.
    api = "/2015-03-31/functions/echo"
    assert client.request("POST", f"{api}/versions", b"{}")[0] == 201
    assert client.request("POST", f"{api}/aliases",
                          b'{"Name": "live", "FunctionVersion": "1"}')[0] == 201
    assert client.request("PUT", "/2017-10-31/functions/echo/concurrency",
                          b'{"ReservedConcurrentExecutions": 50}')[0] == 200
    stop = threading.Event()
    results: list[object] = []

    def load() -> None:
        c = sdk.Client(cells.endpoint, (t["access_key_id"], t["secret_access_key"]))
        i = 0
        while not stop.is_set():
            try:
                results.append(c.invoke("echo", {"i": i}).json() == {"i": i})
            except sdk.CellcloudError as e:
                results.append(e)
            i += 1
        c.close()

    th = threading.Thread(target=load)
    th.start()
    try:
        wait_for("some invokes before the move", lambda: len(results) >= 10)
        out = cells.cli("migrate", "mover", "--to", target)
        n = len(results)
        wait_for("some invokes after the move", lambda: len(results) >= n + 10)
    finally:
        stop.set()
        th.join(timeout=30)
    assert "done_s" in out.stdout, out.stdout
    assert all(r is True for r in results), [r for r in results if r is not True][:3]
    cellmap = json.load(open(os.path.join(cells.state_dir, "cellmap.json")))
    assert cellmap["assignments"][t["account_id"]] == target
    assert client.invoke("echo", {"after": 1}).json() == {"after": 1}
    status, headers, body = client.request("POST", f"{api}/invocations",
                                           b'{"via": "alias"}', query={"Qualifier": "live"})
    assert status == 200 and json.loads(body) == {"via": "alias"}
    assert headers["x-amz-executed-version"] == "1"
    status, _, body = client.request("GET", "/2019-09-30/functions/echo/concurrency")
    assert json.loads(body) == {"ReservedConcurrentExecutions": 50}
    client.close()


@pytest.mark.slow
def test_blast_radius_experiment(tmp_path: object) -> None:
    from cellcloud.experiment import blast

    r = blast.main(str(tmp_path), agents=8, tenants=200, control_down_s=3)
    assert r["baseline_success"] == 1.0
    assert r["control_down"]["success"] == 1.0
    assert r["cell_killed"]["success_other_cells"] == 1.0
    for p in r["poison"]:
        assert p["sets_equal"], p
        assert p["prediction_holds"], p
        assert p["published_shards_differing_from_recomputation"] == 0, p
        assert p["failures_after_retry_reached_live"] == 0, p
