"""`cellcloud up` gives environments the network by default; `cellcloud down` removes it."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from cellcloud.network import policy
from cellcloud.sandbox import runtimes
from tests.conftest import make_zip
from tests.integration.conftest import start_region, stop_region

from .conftest import World, leftovers, sh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CODE = '''
import socket, urllib.request
def handler(event, context):
    if event.get("stream"):
        return {"stream": context.log_stream_name,
                "body": urllib.request.urlopen(event["url"], timeout=10).read().decode()}
    body = urllib.request.urlopen(event["url"], timeout=10).read().decode()
    try:
        socket.create_connection((event["host"], event["port"]), timeout=5).close()
        host = "reached"
    except OSError as e:
        host = type(e).__name__
    return {"body": body, "host": host}
'''


NODE_CODE = """
import http from "node:http";
export const handler = (event) => new Promise((resolve, reject) => {
  http.get(event.url, (res) => {
    let body = "";
    res.on("data", (c) => { body += c; });
    res.on("end", () => resolve({ body }));
  }).on("error", reject);
});
"""


def _prefixes(state_dir: str, agents: list[str]) -> list[str]:
    """The helper prefix of each agent, as agent/server.py derives it."""
    import hashlib
    import os

    out = []
    for a in agents:
        sd = os.path.abspath(os.path.join(state_dir, "cells", "cell-1", "agents", a))
        group = f"{a}-{hashlib.sha256(sd.encode()).hexdigest()[:8]}"
        out.append(policy.prefix_for(group))
    return out


def test_region_default_egress_and_cleanup(world: World) -> None:
    import tempfile

    d = tempfile.mkdtemp(prefix="cellcloud-netregion-")
    region = start_region(d, "--agents-per-cell", "1")
    prefixes = _prefixes(d, ["cell-1-agent-0"])
    try:
        region.client.create_function("netfn", make_zip({"app.py": CODE}), "app.handler")
        port = int(region.endpoint.rsplit(":", 1)[1])
        res = region.client.invoke("netfn", {"url": f"http://{world.addr}:8080/",
                                             "host": "127.0.0.1", "port": port})
        out = res.json()
        assert out["body"] == world.token, out
        # A Node.js function with default settings reaches it too (scripts/setup.sh installs
        # Node; a host without it fails here rather than skipping).
        majors = runtimes.find_node()
        assert majors, "no Node.js runtime installed (scripts/setup.sh installs them)"
        region.client.create_function(
            "netnode", make_zip({"index.mjs": NODE_CODE}), "index.handler",
            runtime=f"nodejs{sorted(majors)[0]}.x", timeout_s=20)
        res = region.client.invoke("netnode", {"url": f"http://{world.addr}:8080/"})
        assert res.function_error is None, res.payload
        assert res.json() == {"body": world.token}
        # The router's port on this host: local to the host, so denied (from the
        # environment 127.0.0.1 is its own loopback; the host's world-facing address is not).
        res = region.client.invoke("netfn", {"url": f"http://{world.addr}:8080/",
                                             "host": world.host_addr, "port": port})
        assert res.json()["host"] != "reached"
        status = json.loads(region.cli("status", "--json").stdout)
        nets = list(_find(status, "network"))
        assert any(isinstance(n, dict) and n.get("tx_bytes", 0) > 0 for n in nets), status
        assert any(isinstance(n, dict) and n.get("mode") == "egress" and n.get("subnet")
                   for n in nets), status
        assert leftovers(prefixes[0])
    finally:
        stop_region(region)
    assert leftovers(prefixes[0]) == []


def test_region_network_none() -> None:
    """`cellcloud up --network none`: environments have only their loopback; no helper, no
    objects on the host."""
    import tempfile

    code = ("def handler(event, context):\n"
            "    lines = open('/proc/net/dev').read().splitlines()[2:]\n"
            "    return sorted(line.split(':')[0].strip() for line in lines)\n")
    d = tempfile.mkdtemp(prefix="cellcloud-netnone-")
    region = start_region(d, "--agents-per-cell", "1", "--network", "none")
    prefix = _prefixes(d, ["cell-1-agent-0"])[0]
    try:
        region.client.create_function("nonet", make_zip({"app.py": code}), "app.handler")
        assert region.client.invoke("nonet", {}).json() == ["lo"]
        nets = [n for n in _find(region.client.status(), "network") if isinstance(n, dict)]
        assert nets and all(n.get("mode") == "none" for n in nets)
        assert leftovers(prefix) == []
    finally:
        stop_region(region)


def test_live_update_keeps_the_network(world: World) -> None:
    """`cellcloud agent restart --live`: the successor adopts the running helper with the
    environments, so a warm environment keeps its interface and its policy."""
    import subprocess
    import sys
    import tempfile

    d = tempfile.mkdtemp(prefix="cellcloud-netlive-")
    region = start_region(d, "--agents-per-cell", "1")
    prefix = _prefixes(d, ["cell-1-agent-0"])[0]
    try:
        region.client.create_function("livenet", make_zip({"app.py": CODE}), "app.handler")
        event = {"stream": True, "url": f"http://{world.addr}:8080/"}
        before = region.client.invoke("livenet", event).json()
        assert before["body"] == world.token
        _wait_pool_settled(region)
        rules = sh("nft", "list", "table", "inet", f"cellcloud_{prefix}").stdout
        res = subprocess.run([sys.executable, "-m", "cellcloud", "agent", "restart",
                              "cell-1-agent-0", "--live", "--state-dir", d],
                             capture_output=True, text=True, timeout=150)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["adopted"] >= 1
        after = region.client.invoke("livenet", event).json()
        assert after == before  # the same (warm) environment, still reaching the world
        # The same helper: its table was never rebuilt (same chain set, same elements).
        _wait_pool_settled(region)
        now = sh("nft", "list", "table", "inet", f"cellcloud_{prefix}").stdout
        assert _shape(now) == _shape(rules)
    finally:
        stop_region(region)
    assert leftovers(prefix) == []


def test_agent_killed_then_restarted_gets_a_network_again(world: World) -> None:
    """SIGKILL of an agent: its helper (PDEATHSIG) removes what it made; the restarted agent's
    helper waits for that (the prefix lock), builds the network again, and `down` leaves
    nothing behind."""
    import os
    import signal
    import tempfile
    import time

    from cellcloud.sdk import CellcloudError

    d = tempfile.mkdtemp(prefix="cellcloud-netkill-")
    region = start_region(d, "--agents-per-cell", "1")
    prefix = _prefixes(d, ["cell-1-agent-0"])[0]
    try:
        region.client.create_function("killnet", make_zip({"app.py": CODE}), "app.handler")
        event = {"stream": True, "url": f"http://{world.addr}:8080/"}
        assert region.client.invoke("killnet", event).json()["body"] == world.token
        old = int(region.region_json()["components"]["cell-1-agent-0"]["pid"])  # type: ignore[index]
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 60
        body = None
        while time.monotonic() < deadline:  # the supervisor restarts it (with backoff)
            comp = region.region_json()["components"]["cell-1-agent-0"]  # type: ignore[index]
            if int(comp["pid"]) != old:
                try:
                    res = region.client.invoke("killnet", event)
                except CellcloudError:  # 429/503 until the cell sees the agent again
                    res = None
                if res is not None and res.function_error is None:
                    body = res.json()["body"]
                    break
            time.sleep(0.2)  # polling the restart, bounded by the deadline
        assert body == world.token
    finally:
        stop_region(region)
    assert leftovers(prefix) == []


def _wait_pool_settled(region: object) -> None:
    """Until the agent's helper has its pool full and nothing left to destroy (bounded)."""
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        nets = [n for n in _find(region.client.status(), "network")  # type: ignore[attr-defined]
                if isinstance(n, dict) and "helper" in n]
        if nets and all(n["helper"].get("ready") == 4 and n["helper"].get("to_destroy") == 0
                        for n in nets):
            return
        time.sleep(0.05)  # polling the helper's state, bounded by the deadline
    raise AssertionError("the network helper's pool did not settle")


def _shape(nft_text: str) -> list[str]:
    """An nft listing without counter values."""
    import re

    return [re.sub(r"packets \d+ bytes \d+", "", line) for line in nft_text.splitlines()]


def _find(doc: object, key: str) -> Iterator[object]:
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == key:
                yield v
            yield from _find(v, key)
    elif isinstance(doc, list):
        for v in doc:
            yield from _find(v, key)
