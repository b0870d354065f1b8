"""A region across hosts: each agent in a network namespace of its own with its own address
(veth pairs on a bridge the test makes), the frontend reaching them over that network."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator

import pytest

from cellcloud import sdk
from cellcloud.region.supervisor import Supervisor
from tests.conftest import make_zip

pytestmark = pytest.mark.integration

# Addresses of the test's own hosts, inside namespaces it creates and deletes itself.
SUBNET = "10.251.77"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def hosts() -> Iterator[dict[str, tuple[str, str]]]:
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed")
    tag = uuid.uuid4().hex[:4]
    bridge = f"ccbr{tag}"
    made: list[str] = []
    try:
        ip("link", "add", bridge, "type", "bridge")
        ip("addr", "add", f"{SUBNET}.1/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        out = {}
        for i in range(2):
            ns, host_end, ns_end = f"cc{tag}a{i}", f"cc{tag}h{i}", f"cc{tag}n{i}"
            ip("netns", "add", ns)
            made.append(ns)
            ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            ip("link", "set", host_end, "master", bridge)
            ip("link", "set", host_end, "up")
            ip("link", "set", ns_end, "netns", ns)
            ip("-n", ns, "addr", "add", f"{SUBNET}.{10 + i}/24", "dev", ns_end)
            ip("-n", ns, "link", "set", ns_end, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            out[f"cell-1-agent-{i}"] = (ns, f"{SUBNET}.{10 + i}")
        yield out
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)


def test_agents_on_their_own_hosts(hosts: dict[str, tuple[str, str]]) -> None:
    state = tempfile.mkdtemp(prefix="cc-netns-")

    async def main() -> None:
        sup = Supervisor(state, cells=1, agents_per_cell=2, port=0, agent_hosts=hosts)
        try:
            doc = await sup.start()
            client = sdk.Client(doc["endpoint"], doc["api_key"], timeout_s=60)
            client.create_function("across", make_zip({"app.py": (
                "import time\ndef handler(e, c):\n"
                "    time.sleep(max(0, e['until'] - time.time()))\n"
                "    return c.log_stream_name\n")}), "app.handler", timeout_s=30)
            # An agent's host is region-internal: no function's allow-list may name it
            # (the supervisor tells the frontend, which is on another host).
            entry = f"allow:{hosts['cell-1-agent-1'][1]}/32:80"
            try:
                client.create_function("reach-agent", make_zip({"app.py": ""}), "app.h",
                                       vpc_config={"SubnetIds": ["cellcloud-egress"],
                                                   "SecurityGroupIds": [entry]})
                raise AssertionError("an allow entry naming an agent's host was accepted")
            except sdk.CellcloudError as e:
                assert entry in e.message and "region-internal" in e.message, e
            import time as _t

            def agents_with_envs() -> set[str]:
                st = client.status()
                return {aid for c in st["cells"].values() for aid, a in c["agents"].items()
                        if a.get("envs")}

            # Two invokes at once, each holding its environment for a while: two environments,
            # one on each agent (a shard of k=2). On a busy machine one invoke may finish
            # before the other is placed (then both share one warm environment), so repeat —
            # holding longer each round — until both agents have run one (a condition with a
            # generous bound, not a guess at how long a cold start takes).
            deadline = _t.monotonic() + 180
            hold_s = 4.0
            while True:
                until = _t.time() + hold_s
                results = await asyncio.gather(*(asyncio.to_thread(
                    sdk.Client(doc["endpoint"], doc["api_key"], timeout_s=120).invoke, "across",
                    {"until": until}) for _ in range(2)))
                assert all(r.function_error is None for r in results)
                used = await asyncio.to_thread(agents_with_envs)
                if used == set(hosts) or _t.monotonic() > deadline:
                    break
                hold_s = min(hold_s * 2, 16.0)  # under the function's 30 s timeout
            agents = {c.name: c.info for c in sup.components if c.kind == "agent"}
            assert {a["host"] for a in agents.values()} == {h[1] for h in hosts.values()}
            assert used == set(hosts)  # both namespaced agents ran environments
            # An agent really lives in its namespace: it sees only its own address.
            pid = agents["cell-1-agent-0"]["pid"]
            addrs = (await asyncio.to_thread(
                subprocess.run, ["nsenter", "-t", str(pid), "-n", "ip", "-o", "addr"],
                capture_output=True, text=True, timeout=30)).stdout
            assert hosts["cell-1-agent-0"][1] in addrs and hosts["cell-1-agent-1"][1] not in addrs
        finally:
            await sup.stop()

    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(state, ignore_errors=True)
