"""The warm path under leases (issue #13): router -> agent for a function the router holds a
lease for, the frontend still the authority on concurrency.

Oracles outside the frontend: the router's own count of invokes it forwarded, the frontend
process stopped (SIGSTOP) while a leased invoke still succeeds, the handlers' own clocks for
how many ran at once, and the agent's answer to a router calling it directly.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cellcloud import sdk
from cellcloud.security import pki
from cellcloud.transport import Client, RemoteError
from tests.conftest import make_zip

from .conftest import Region, running_region

pytestmark = pytest.mark.integration

WAIT_S = 60.0


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    with running_region(tmp_path_factory, "leases", "--agents-per-cell", "2") as r:
        yield r


def wait_for(what: str, cond: Callable[[], object]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"not within {WAIT_S}s: {what}"
        time.sleep(0.05)


def router(region: Region) -> dict[str, Any]:
    doc: dict[str, Any] = region.client.status()["router"]
    return doc


def deploy(region: Region, code: str, **kw: Any) -> str:
    name = f"ls-{uuid.uuid4().hex[:10]}"
    region.client.create_function(name, make_zip({"app.py": code}), "app.handler", **kw)
    return name


def leased_warm(region: Region, name: str) -> int:
    """Invoke until the router holds a lease for the function (it asks after a forwarded
    invoke, for a warm environment only); how many invokes that took."""
    made = 0

    def held() -> bool:
        nonlocal made
        region.client.invoke(name, {})
        made += 1
        return bool(router(region)["leases"]["held"])
    wait_for("the router to hold a lease", held)
    return made


def invocations(region: Region, name: str) -> float:
    """The function's invocations as the region's /metrics counts them (operator view)."""
    status, _, body = region.client.request("GET", "/metrics")
    assert status == 200, body
    account = str(region.doc["account_id"])
    return sum(s.value for fam in text_string_to_metric_families(body.decode())
               for s in fam.samples if s.name == "cellcloud_invocations_total"
               and s.labels.get("function") == name and s.labels.get("account") == account)


ECHO = ("def handler(event, context):\n    print('marker', event.get('m'))\n"
        "    return event\n")


def test_warm_invokes_bypass_the_frontend(region: Region) -> None:
    name = deploy(region, ECHO)
    counted_before = invocations(region, name)
    done = 0
    # A router gives back a lease idle for router_lease_idle_ms (5 s); on a loaded machine the
    # status reads around a round can take that long, so a round whose first invoke found the
    # lease given back is tried again (bounded), never judged by timing.
    for _ in range(5):
        done += leased_warm(region, name)
        before = router(region)
        for i in range(10):
            res = region.client.invoke(name, {"i": i, "m": f"m{i}"}, log_tail=True)
            assert res.json() == {"i": i, "m": f"m{i}"}
            assert res.executed_version == "$LATEST" and res.request_id
            assert f"marker m{i}" in res.log_tail
        done += 10
        after = router(region)
        forwarded = (after["counters"]["invokes_forwarded"]
                     - before["counters"]["invokes_forwarded"])
        leased = after["leases"]["leased_invokes"] - before["leases"]["leased_invokes"]
        assert forwarded + leased == 10
        if forwarded == 0:
            break
    # The router's own count: none of the ten crossed the frontend's http op.
    assert forwarded == 0 and leased == 10
    # Their logs reached the function's logs (through the frontend).
    wait_for("the leased invocations' logs", lambda: "marker m9" in "".join(
        e["message"] for e in region.client.logs(name, limit=200)))
    # And the function's metrics count them like any other (the router reports each one).
    wait_for("the metrics to count the leased invocations",
             lambda: invocations(region, name) - counted_before >= done)
    assert invocations(region, name) - counted_before == done

    cold = deploy(region, ECHO)  # never invoked: no environment, no lease
    region.client.invoke(name, {"warm": 1})  # fresh use: the lease is not idle
    pid = int(region.region_json()["components"]["cell-1-frontend"]["pid"])  # type: ignore[index]
    short = sdk.Client(region.endpoint, region.doc["api_key"], timeout_s=5)  # type: ignore[arg-type]
    os.kill(pid, signal.SIGSTOP)
    try:
        # The frontend is stopped: a leased warm invoke still runs ...
        assert short.invoke(name, {"stopped": True}).json() == {"stopped": True}
        # ... and a cold one cannot (it needs the frontend).
        with pytest.raises(Exception):  # noqa: B017 - a timeout or a 5xx, either way refused
            short.invoke(cold, {})
    finally:
        os.kill(pid, signal.SIGCONT)
        short.close()
    assert region.client.invoke(cold, {"x": 1}).json() == {"x": 1}


def test_reserved_concurrency_holds_with_leases(region: Region) -> None:
    # Each invocation reports its own start and end (the host's clock): how many ran at once
    # is judged from those, outside the frontend and the router.
    name = deploy(region, "import time\ndef handler(event, context):\n"
                          "    t0 = time.time()\n    time.sleep(0.2)\n"
                          "    return [t0, time.time()]\n")
    region.client._json("PUT", f"/2017-10-31/functions/{name}/concurrency",
                        {"ReservedConcurrentExecutions": 2})
    leased_warm(region, name)
    before = router(region)["leases"]["leased_invokes"]
    spans: list[tuple[float, float]] = []
    throttled = [0]
    lock = threading.Lock()

    def caller() -> None:
        c = sdk.Client(region.endpoint, region.doc["api_key"], timeout_s=60)  # type: ignore[arg-type]
        try:
            for _ in range(6):
                try:
                    t0, t1 = c.invoke(name, {}).json()
                except sdk.CellcloudError as e:
                    assert e.status == 429, e
                    with lock:
                        throttled[0] += 1
                    continue
                with lock:
                    spans.append((t0, t1))
        finally:
            c.close()

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = sorted([(t0, 1) for t0, _ in spans] + [(t1, -1) for _, t1 in spans],
                    key=lambda e: (e[0], e[1]))
    running = most = 0
    for _, d in events:
        running += d
        most = max(most, running)
    assert spans and most <= 2, f"{most} ran at once with reserved concurrency 2"
    assert len(spans) + throttled[0] == 8 * 6  # every call answered: run or throttled (429)
    assert router(region)["leases"]["leased_invokes"] > before  # and leases were in play


def agent_call(region: Region, agent_id: str, role: str, op: str, body: dict[str, Any]) -> Any:
    """Call an agent directly with a certificate of ``role`` from the region's CA."""
    comps: Any = region.region_json()["components"]
    comp = next(c for k, c in comps.items() if c["kind"] == "agent" and k.endswith(agent_id))
    cfg = pki.tls_config(region.state_dir, str(region.doc["region"]), role, "cell-1",
                         f"test-{role}")

    async def go() -> Any:
        c = Client(str(comp["host"]), int(comp["port"]), ssl_context=cfg.client_context(),
                   peer_check=pki.peer_check(str(region.doc["region"]), {"agent"}))
        try:
            return await c.call(op, body, timeout_s=30)
        finally:
            await c.close()
    return asyncio.run(go())


def test_agent_refuses_invocations_without_a_live_lease(region: Region) -> None:
    name = deploy(region, ECHO)
    region.client.invoke(name, {})
    envs = [(agent_id, e["env_id"]) for c in region.client.status()["cells"].values()
            for agent_id, a in c["agents"].items() for e in a["envs"] if e["function"] == name]
    assert envs
    agent_id, env_id = envs[0]
    body = {"env_id": env_id, "request_id": "r1", "payload": b'{"k": 1}', "timeout_ms": 3000,
            "arn": ""}

    def as_router(lease_id: str | None) -> Any:
        return agent_call(region, agent_id, "router", "leased_invoke",
                          {**body, "lease_id": lease_id})

    def refused(lease_id: str | None) -> str:
        with pytest.raises(RemoteError) as e:
            as_router(lease_id)
        return e.value.type

    # No lease, a made-up one: refused, nothing ran.
    assert refused(None) == "LeaseInvalid"
    assert refused("lease-made-up") == "LeaseInvalid"
    # An expired lease (registered as the frontend does, with no time left): refused.
    agent_call(region, agent_id, "frontend", "lease_grant",
               {"lease_id": "lease-expired", "env_id": env_id, "ttl_ms": 0})
    assert refused("lease-expired") == "LeaseInvalid"
    # A live lease runs the invocation; once the frontend ends it, the next is refused.
    agent_call(region, agent_id, "frontend", "lease_grant",
               {"lease_id": "lease-live", "env_id": env_id, "ttl_ms": 60_000})
    assert as_router("lease-live")["payload"] == b'{"k": 1}'
    assert agent_call(region, agent_id, "frontend", "lease_end", {"lease_id": "lease-live"})[
        "known"] is True
    assert refused("lease-live") == "LeaseInvalid"
    # The router's role may call nothing else on an agent.
    for op, b in (("invoke", body), ("destroy", {"env_id": env_id}),
                  ("lease_grant", {"lease_id": "x", "env_id": env_id, "ttl_ms": 60_000}),
                  ("lease_end", {"lease_id": "x"})):
        with pytest.raises(RemoteError) as e:
            agent_call(region, agent_id, "router", op, b)
        assert e.value.type == "Forbidden"


SLOW = ("import time\ndef handler(event, context):\n    time.sleep(event.get('s', 0))\n"
        "    return {'done': event.get('s')}\n")


def test_a_destroy_never_cuts_a_running_invocation_short(region: Region) -> None:
    """A frontend that just replaced another destroys the environments it does not know — a
    router's lease may be running an invocation there (a rollout under load found it: the
    invocation failed with the agent's InternalError KeyError). The agent ends the lease, lets
    the invocation finish, then destroys."""
    name = deploy(region, SLOW, timeout_s=60)
    region.client.invoke(name, {})
    envs = [(agent_id, e["env_id"]) for c in region.client.status()["cells"].values()
            for agent_id, a in c["agents"].items() for e in a["envs"] if e["function"] == name]
    assert envs
    agent_id, env_id = envs[0]
    lease_id = f"lease-{uuid.uuid4().hex[:8]}"
    agent_call(region, agent_id, "frontend", "lease_grant",
               {"lease_id": lease_id, "env_id": env_id, "ttl_ms": 60_000})
    out: dict[str, Any] = {}

    def leased() -> None:
        try:
            out["reply"] = agent_call(region, agent_id, "router", "leased_invoke", {
                "lease_id": lease_id, "env_id": env_id, "request_id": "r-slow",
                "payload": b'{"s": 3}', "timeout_ms": 60_000, "arn": ""})
        except Exception as e:  # what the router would have turned into a failed request
            out["error"] = e

    t = threading.Thread(target=leased)
    t.start()

    def running() -> bool:
        st = agent_call(region, agent_id, "frontend", "status", {})
        return any(e["env_id"] == env_id and e["busy"] for e in st["envs"])
    wait_for("the leased invocation to be running", running)
    gone = agent_call(region, agent_id, "frontend", "destroy", {"env_id": env_id})
    t.join(timeout=WAIT_S)
    assert "error" not in out, out.get("error")
    assert out["reply"]["payload"] == b'{"done": 3}' and not out["reply"].get("error_type")
    assert gone["destroyed"] is True  # after the invocation, not instead of it
    with pytest.raises(RemoteError) as e:  # the lease ended with the destroy
        agent_call(region, agent_id, "router", "leased_invoke", {
            "lease_id": lease_id, "env_id": env_id, "request_id": "r-2",
            "payload": b"{}", "timeout_ms": 3000, "arn": ""})
    assert e.value.type == "LeaseInvalid"
