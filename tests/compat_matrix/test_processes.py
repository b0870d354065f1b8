"""The compatibility matrix with real processes on loopback: a region whose components are
capped (``--protocol-max``) as builds of the previous version would be, next to ones of this
version, serves invokes; each link speaks the version expected, as the processes' own status
reports it. Two regions:

- ``old-agent``: the frontend (version 2) over an agent capped at agent protocol 1 (a new
  client, an old server), and the router's leases straight to it (the same);
- ``old-frontend``: the router (2) to a frontend capped at 1 for every protocol (a new client,
  an old server), and that frontend's agent client (1) to an agent of version 2 (an old
  client, a new server).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import pytest

from cellcloud import sdk
from cellcloud.region.supervisor import Supervisor
from cellcloud.security import pki
from cellcloud.transport import Client, VersionRefused, disable_mtls, enable_mtls
from tests.conftest import make_zip

pytestmark = pytest.mark.integration

# (whose status, protocol, side) -> the versions its links must include; a capped process's
# links speak no other version (its window is checked too)
CASES = {
    "old-agent": ({"agent": ["--protocol-max", "agent=1"]},
                  {("agent", "agent", "server"): {"1"}, ("frontend", "agent", "client"): {"1"},
                   ("frontend", "frontend", "server"): {"2"}},
                  {"agent": {"agent": [1, 1]}}),
    "old-frontend": ({"frontend": ["--protocol-max", "1"]},
                     {("agent", "agent", "server"): {"1"},
                      ("frontend", "agent", "client"): {"1"},
                      ("frontend", "frontend", "server"): {"1"},
                      ("router", "frontend", "client"): {"1"}},
                     {"frontend": {"agent": [1, 1], "frontend": [1, 1]}}),
}


def links(doc: Any, protocol: str, side: str) -> set[str]:
    return set((((doc or {}).get(protocol) or {}).get("links") or {}).get(side) or {})


@pytest.mark.parametrize("case", sorted(CASES))
def test_mixed_versions_serve_invokes(case: str, tmp_path: Any) -> None:
    extra, expected, capped = CASES[case]

    async def main() -> dict[str, Any]:
        sup = Supervisor(str(tmp_path), cells=1, agents_per_cell=1, port=0, extra_args=extra,
                         zones_per_cell=0)
        doc = await sup.start()
        with open(doc["operator_token_file"]) as f:  # status: the operator's whole view
            token = json.load(f)["token"]
        client = sdk.Client(doc["endpoint"], doc["api_key"], timeout_s=60,
                            operator_token=token)
        try:
            def work() -> dict[str, Any]:
                client.create_function("mix", make_zip(
                    {"app.py": "def handler(e, c):\n    return e['n'] * 2\n"}), "app.handler")
                for n in range(5):  # cold, then warm (the router's leases once it has one)
                    assert client.invoke("mix", {"n": n}).json() == n * 2
                return client.status()

            st = await asyncio.to_thread(work)
            if case == "old-agent":
                # A peer outside the agent's window (a client that speaks only version 2, as
                # the control plane would): refused, both windows named, counted in status.
                agent = next(c for c in sup.components if c.kind == "agent")
                enable_mtls(pki.tls_config(str(tmp_path), "cc-local-1", "control", "region",
                                           "matrix"), "control")
                try:
                    new = Client(agent.info["host"], agent.info["port"], expect_role="agent",
                                 versions=(2, 2))
                    with pytest.raises(VersionRefused, match=r"2\.\.2.*1\.\.1"):
                        await new.call("status", None, timeout_s=30)
                finally:
                    disable_mtls()
                st = await asyncio.to_thread(client.status)
                out = await asyncio.to_thread(subprocess.run, [
                    sys.executable, "-m", "cellcloud", "status", "--state-dir", str(tmp_path)],
                    capture_output=True, text=True, timeout=120)
                assert "cell-1-agent-0: 1 agent peer(s) refused" in out.stdout, out
            return st
        finally:
            client.close()
            await sup.stop()

    st = asyncio.run(main())
    cell = st["cells"]["cell-1"]
    agent = next(iter(cell["agents"].values()))
    docs = {"router": st["router"].get("protocols"), "frontend": cell.get("protocols"),
            "agent": agent.get("protocols")}
    for (who, protocol, side), versions in expected.items():
        assert versions <= links(docs[who], protocol, side), (who, protocol, side, docs[who])
    for who, windows in capped.items():
        for protocol, window in windows.items():
            doc = docs[who][protocol]  # type: ignore[index]
            assert doc["window"] == window, (who, doc)
            assert all(set(by) == {"1"} for by in doc["links"].values()), (who, doc)
    refused = {(who, name): p["refused"] for who, doc in docs.items()
               for name, p in doc.items() if p.get("refused")}  # type: ignore[union-attr]
    # nothing refused, but the peer this test sent outside the window
    assert refused == ({("agent", "agent"): {"server": 1}} if case == "old-agent" else {})
    if case == "old-agent":
        assert "no version in common" in docs["agent"]["agent"]["last_refusal"]  # type: ignore[index]
