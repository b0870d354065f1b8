"""A task's network (agent/tasks.py with a real network helper): its containers share one
interface; its private address answers from the host on its mapped ports and on no other."""

from __future__ import annotations

import socket
import sys
import time
import urllib.request
import uuid

import pytest

from cellcloud.core import messages as m
from tests.escape.test_image_env import push_layers
from tests.escape.test_tasks import task_image

from .conftest import NetSandbox, World, policy_lifted, sh, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
PY = sys.executable


def _get(url: str, timeout_s: float = 60.0) -> bytes:
    """The body, once the server answers (a bound while it starts, not a deadline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return bytes(urllib.request.urlopen(url, timeout=5).read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _connects(addr: str, port: int) -> str:
    try:
        socket.create_connection((addr, port), timeout=5).close()
        return "ok"
    except OSError as e:
        return type(e).__name__


def test_the_private_address_answers_the_host_on_mapped_ports_only(
        net: NetSandbox, tmp_path: object) -> None:
    layout = f"{tmp_path}/img"
    layers = task_image(layout)
    push_layers(net, layout, layers)  # type: ignore[arg-type]
    task_id = f"t-{uuid.uuid4().hex[:8]}"
    serve = [PY, "-m", "http.server", "--directory", "/srv"]
    req = m.TaskCreateRequest(task_id, "111122223333", 256, 512, (
        m.TaskContainer("web", tuple(layers), (*serve, "8080"),
                        port_mappings=(m.TaskPortMapping(8080),)),
        m.TaskContainer("side", tuple(layers), (*serve, "9090"))))
    tasks = net.agent.tasks
    reply = m.TaskCreateReply.from_wire(net._run(tasks.task_create(req.to_wire())))
    addr = reply.private_ipv4
    assert addr.startswith("100.64.")
    try:
        for name in ("web", "side"):
            net._run(tasks.container_start({"task_id": task_id, "container": name}))
        assert _get(f"http://{addr}:8080/hello.txt") == b"hello from the web container\n"
        # The sidecar's listener is up (its own container reaches it over the task's
        # interface) ...
        probe = [PY, "-c", f"import urllib.request; print(urllib.request.urlopen("
                 f"'http://{addr}:9090/hello.txt', timeout=10).read().decode())"]
        out = m.TaskExecReply.from_wire(net._run(tasks.task_exec(
            {"task_id": task_id, "container": "web", "command": probe, "timeout_s": 60})))
        assert out.exit_code == 0, out
        assert out.output == b"hello from the web container\n\n"
        # ... but the host may not open it: 9090 is not a mapped port.
        assert _connects(addr, 9090) != "ok"
        with policy_lifted(net):  # the negative control: without the rule it answers
            assert _connects(addr, 9090) == "ok"
        assert _connects(addr, 8080) == "ok"
    finally:
        assert net._run(tasks.task_destroy({"task_id": task_id})) == {"destroyed": True}
    # released with the task's slot (the helper's janitor refreshes it off the acquire path)
    assert wait_until(lambda: addr not in sh("nft", "list", "set", "inet", net.table,
                                             "ingress_limited").stdout)


def test_assign_public_ip_disabled_has_no_egress_but_keeps_its_address(
        net: NetSandbox, world: World, tmp_path: object) -> None:
    """ECS's ``assignPublicIp``: ENABLED (network "egress") reaches the outside world;
    DISABLED ("private") does not, while the host still reaches its mapped port."""
    layout = f"{tmp_path}/img"
    layers = task_image(layout)
    push_layers(net, layout, layers)  # type: ignore[arg-type]
    tasks = net.agent.tasks
    probe = [PY, "-c", f"import urllib.request; print(urllib.request.urlopen("
             f"'http://{world.addr}:8080/', timeout=5).read().decode())"]
    seen = {}
    for network in ("egress", "private"):
        task_id = f"t-{uuid.uuid4().hex[:8]}"
        req = m.TaskCreateRequest(task_id, "111122223333", 256, 512, (
            m.TaskContainer("web", tuple(layers), (PY, "-m", "http.server", "--directory",
                                                   "/srv", "8080"),
                            port_mappings=(m.TaskPortMapping(8080),)),), network=network)
        addr = m.TaskCreateReply.from_wire(
            net._run(tasks.task_create(req.to_wire()))).private_ipv4
        assert addr.startswith("100.64.")
        try:
            net._run(tasks.container_start({"task_id": task_id, "container": "web"}))
            assert _get(f"http://{addr}:8080/hello.txt") == b"hello from the web container\n"
            out = m.TaskExecReply.from_wire(net._run(tasks.task_exec(
                {"task_id": task_id, "container": "web", "command": probe,
                 "timeout_s": 60})))
            seen[network] = (out.exit_code, out.output)
        finally:
            assert net._run(tasks.task_destroy({"task_id": task_id})) == {"destroyed": True}
    assert seen["egress"] == (0, world.token.encode() + b"\n")
    code, output = seen["private"]
    assert code != 0 and world.token.encode() not in output, seen
