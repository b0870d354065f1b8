"""The previous release's code, for real: a region of this build whose cell (agent, then
frontend) is replaced by processes of the code from before protocol versions (checked out of
git into a temporary directory), then rolled back. Invokes and a deploy work throughout; this
build's router, control plane and dispatcher speak version 1 to the old frontend (whose hello
answer is UnknownOperation), and the old frontend, sending no hello, is taken for version 1
by the agent once that is new again. Skipped where git has not that commit (a shallow clone).
Slow (``-m slow``): the capped-process matrix (test_processes.py) runs by default."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import tarfile
from typing import Any

import pytest

from cellcloud import sdk
from cellcloud.region.supervisor import Supervisor
from tests.conftest import make_zip

# ~26 s on a busy machine
pytestmark = [pytest.mark.integration, pytest.mark.slow]

PREVIOUS = "b303740"  # the last commit before protocol versions (the v1 fixtures' source)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def previous_build(into: str) -> str:
    out = subprocess.run(["git", "-C", REPO, "archive", PREVIOUS, "src"], capture_output=True,
                         timeout=120)
    if out.returncode != 0:
        pytest.skip(f"no commit {PREVIOUS} here: {out.stderr.decode()[:200]}")
    with tarfile.open(fileobj=io.BytesIO(out.stdout)) as tar:
        tar.extractall(into, filter="data")
    return os.path.join(into, "src")


def test_a_cell_of_the_previous_build_under_this_one(tmp_path: Any) -> None:
    old_src = previous_build(str(tmp_path / "previous"))
    seen: dict[str, Any] = {}

    async def main() -> None:
        sup = Supervisor(str(tmp_path / "region"), cells=1, agents_per_cell=1, port=0,
                         restart=False, zones_per_cell=0)
        doc = await sup.start()
        with open(doc["operator_token_file"]) as f:
            token = json.load(f)["token"]
        client = sdk.Client(doc["endpoint"], doc["api_key"], timeout_s=60, operator_token=token)
        comps = {c.name: c for c in sup.components}

        async def swap(src: str | None) -> None:
            saved = os.environ.get("PYTHONPATH")
            if src is not None:
                os.environ["PYTHONPATH"] = src
            try:
                for name in ("cell-1-agent-0", "cell-1-frontend"):  # a rollout's order
                    await sup._restart(comps[name])
            finally:
                if saved is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = saved

        def invokes(name: str, n: int) -> None:
            for i in range(n):
                assert client.invoke(name, {"n": i}).json() == i * 3

        def deploy(name: str) -> None:
            client.create_function(name, make_zip(
                {"app.py": "def handler(e, c):\n    return e['n'] * 3\n"}), "app.handler")

        try:
            await asyncio.to_thread(deploy, "before")
            await asyncio.to_thread(invokes, "before", 3)
            await swap(old_src)
            seen["old"] = await asyncio.to_thread(client.status)
            await asyncio.to_thread(invokes, "before", 3)  # cold again: a new agent
            await asyncio.to_thread(deploy, "during")  # the router's http request, as v1
            await asyncio.to_thread(invokes, "during", 3)
            seen["during"] = await asyncio.to_thread(client.status)
            await swap(None)  # rolled back to this build
            await asyncio.to_thread(invokes, "during", 3)
            seen["after"] = await asyncio.to_thread(client.status)
        finally:
            client.close()
            await sup.stop()

    asyncio.run(main())
    cell = seen["old"]["cells"]["cell-1"]
    assert "protocols" not in cell  # the previous build's frontend ...
    assert all("protocols" not in a for a in cell["agents"].values())  # ... and agent
    router = seen["during"]["router"]["protocols"]
    assert "1" in router["frontend"]["links"]["client"]
    assert not any(p.get("refused") for p in router.values())
    cell = seen["after"]["cells"]["cell-1"]
    assert set(cell["protocols"]["frontend"]["links"]["server"]) == {"2"}
    assert set(cell["protocols"]["agent"]["links"]["client"]) == {"2"}
