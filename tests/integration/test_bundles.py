"""Code bundles through a real region (issue #11): zips whose members cannot be unpacked are
refused at upload, not at every invoke; a bundle nobody holds is freed, at the frontend and on
the agents, within seconds of the delete; DryRun writes nothing."""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable

import pytest

from cellcloud.sdk import CellcloudError
from tests.conftest import make_zip
from tests.malformed_zips import APP, malformed

from .conftest import Region

pytestmark = pytest.mark.integration

MALFORMED = malformed()


def call(region: Region, method: str, path: str, doc: dict[str, object]
         ) -> tuple[int, dict[str, str], dict[str, object]]:
    status, headers, body = region.client.request(
        method, path, json.dumps(doc).encode(), {"content-type": "application/json"})
    return status, headers, json.loads(body) if body else {}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def new_name() -> str:
    return f"bz-{uuid.uuid4().hex[:8]}"


def wait_for(cond: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_zip_refused_on_create_update_and_layer(region: Region, kind: str) -> None:
    data, why = MALFORMED[kind]
    name = new_name()
    status, headers, body = call(region, "POST", "/2015-03-31/functions", {
        "FunctionName": name, "Runtime": "python3.11", "Handler": "app.handler",
        "Code": {"ZipFile": b64(data)}})
    assert (status, headers.get("x-amzn-errortype")) == (400, "InvalidParameterValueException")
    assert why in str(body["message"]), body
    with pytest.raises(CellcloudError):
        region.client.get_function(name)  # nothing was created

    region.client.create_function(name, make_zip({"app.py": APP}), "app.handler")
    try:
        status, headers, body = call(region, "PUT", f"/2015-03-31/functions/{name}/code",
                                     {"ZipFile": b64(data)})
        assert (status, headers.get("x-amzn-errortype")) == (400, "InvalidParameterValueException")
        assert why in str(body["message"]), body
        assert region.client.invoke(name, {}).payload == b'{"ok": true}'  # the old code runs
    finally:
        region.client.delete_function(name)

    status, headers, body = call(region, "POST", f"/2018-10-31/layers/{name}/versions",
                                 {"Content": {"ZipFile": b64(data)}})
    assert (status, headers.get("x-amzn-errortype")) == (400, "InvalidParameterValueException")
    assert why in str(body["message"]), body


def _frontend_bundle(region: Region, sha: str) -> str:
    return os.path.join(region.state_dir, "cells", "cell-1", "frontend", "bundles", sha + ".zip")


def _agent_copies(region: Region, sha: str) -> list[str]:
    return glob.glob(os.path.join(region.state_dir, "cells", "*", "agents", "*", "bundles",
                                  sha + "*"))


def test_delete_frees_the_bundle_at_the_frontend_and_on_agents(region: Region) -> None:
    data = make_zip({"app.py": APP, "pad.txt": uuid.uuid4().hex})  # code no other test has
    sha = hashlib.sha256(data).hexdigest()
    name = new_name()
    region.client.create_function(name, data, "app.handler")
    assert region.client.invoke(name, {}).payload == b'{"ok": true}'
    assert os.path.exists(_frontend_bundle(region, sha))
    assert _agent_copies(region, sha)  # unpacked (and its .measure) on the agent that ran it
    region.client.delete_function(name)
    assert not os.path.exists(_frontend_bundle(region, sha))
    # The environment is destroyed and the agent told to forget the digest: within seconds.
    wait_for(lambda: not _agent_copies(region, sha), "the agents to drop the unpacked bundle")


def test_update_code_frees_the_old_bundle_and_dry_run_writes_nothing(region: Region) -> None:
    old = make_zip({"app.py": APP, "pad.txt": uuid.uuid4().hex})
    new = make_zip({"app.py": APP, "pad.txt": uuid.uuid4().hex})
    dry = make_zip({"app.py": APP, "pad.txt": uuid.uuid4().hex})
    name = new_name()
    region.client.create_function(name, old, "app.handler")
    try:
        region.client.invoke(name, {})
        status, _, body = call(region, "PUT", f"/2015-03-31/functions/{name}/code",
                               {"ZipFile": b64(dry), "DryRun": True})
        assert status == 200, body
        assert not os.path.exists(_frontend_bundle(region, hashlib.sha256(dry).hexdigest()))
        region.client.update_function_code(name, new)
        old_sha = hashlib.sha256(old).hexdigest()
        assert not os.path.exists(_frontend_bundle(region, old_sha))
        assert os.path.exists(_frontend_bundle(region, hashlib.sha256(new).hexdigest()))
        wait_for(lambda: not _agent_copies(region, old_sha), "the agents to drop the old code")
        assert region.client.invoke(name, {}).payload == b'{"ok": true}'
    finally:
        region.client.delete_function(name)


def test_status_reports_disk_space(region: Region) -> None:
    st = region.client.status()
    for cell in st["cells"].values():
        disks = [cell["disk"], *(a["disk"] for a in cell["agents"].values())]
        for d in disks:
            assert 0 < d["free_bytes"] <= d["total_bytes"]
    out = region.cli("status")
    assert "state disks" in out.stdout
