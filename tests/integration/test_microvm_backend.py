"""The microvm backend end to end (issue #18): `cellcloud up --backend microvm`, a python3.11 zip
function created and invoked through boto3, its handler running inside a QEMU guest (TCG
here) with the guest's own Debian cloud kernel; the same function, unchanged, on the jail
backend sees the host's kernel. Bad input (slow): a guest that never answers is killed at the
invoke's timeout, and a QEMU killed mid-invoke gives a Lambda-shaped error and a fresh
environment. Also slow: a nodejs22.x function (its node from a tree disk), two layers at /opt
and a provided.al2023 shell bootstrap, each answering from inside the guest."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from cellcloud.microvm import boot, core
from cellcloud.sandbox.spec import ISOLATION_VARIABLE
from tests.compat.conftest import ROLE, lambda_client, new_name
from tests.conftest import make_zip
from tests.integration.conftest import Region, running_region

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(boot.qemu_binary() is None, reason="no QEMU (scripts/setup.sh)"),
    pytest.mark.skipif(core.pick_kernel(os.listdir("/boot") if os.path.isdir("/boot") else [])
                       is None, reason="no Debian cloud kernel (scripts/setup.sh)"),
]

UNAME = ('import os, resource\n'
         'def handler(event, context):\n'
         '    open("/tmp/x", "w").write("tmp is writable")\n'
         '    return {"release": os.uname().release, "sum": sum(range(event["n"])),\n'
         '            "remaining_ms": context.get_remaining_time_in_millis() > 0,\n'
         '            "root": os.getuid() == 0, "task": os.getcwd(),\n'
         '            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}\n')
SAME = {"remaining_ms": True, "root": False, "task": "/var/task", "nofile": 1024}
SLEEPER = ('import time\n'
           'def handler(event, context):\n'
           '    if event.get("sleep"):\n'
           '        time.sleep(event["sleep"])\n'
           '    return "awake"\n')


@pytest.fixture(scope="module")
def vm_region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    with running_region(tmp_path_factory, "microvm-region", "--backend", "microvm",
                        "--cells", "1", "--agents-per-cell", "1") as r:
        yield r


def _create(lam: Any, code: str, **kw: Any) -> str:
    name = new_name("vm")
    lam.create_function(FunctionName=name, Runtime="python3.11", Role=ROLE,
                        Handler="app.handler", Code={"ZipFile": make_zip({"app.py": code})},
                        **kw)
    return name


def _invoke(lam: Any, name: str, event: dict[str, Any]) -> tuple[str | None, Any]:
    r = lam.invoke(FunctionName=name, Payload=json.dumps(event).encode())
    return r.get("FunctionError"), json.loads(r["Payload"].read())


def _agents(region: Region) -> list[dict[str, Any]]:
    st = region.client.status()
    return [a for c in st["cells"].values() for a in c["agents"].values()]


def _guest_release() -> str:
    name = core.pick_kernel(os.listdir("/boot"))
    assert name is not None
    return core.kernel_release(name)


def test_a_zip_function_runs_inside_the_vm_with_the_guests_kernel(vm_region: Region) -> None:
    lam = lambda_client(vm_region)
    agents = _agents(vm_region)
    assert [a["backend"] for a in agents] == ["microvm"]
    assert agents[0]["accel"] in ("kvm", "tcg")
    # Asking for VM isolation (the region's documented variable) is honoured on a VM agent.
    name = _create(lam, UNAME, MemorySize=512,
                   Environment={"Variables": {ISOLATION_VARIABLE: "microvm"}})
    err, out = _invoke(lam, name, {"n": 1000})
    assert err is None, out
    assert out == {"release": _guest_release(), "sum": 499500, **SAME}
    assert out["release"] != os.uname().release  # the guest's kernel, not the host's
    # Warm: the same VM answers again; its pid is QEMU's.
    assert _invoke(lam, name, {"n": 10}) == (None, {"release": _guest_release(), "sum": 45,
                                                   **SAME})
    envs = [e for a in _agents(vm_region) for e in a["envs"] if e["function"] == name]
    assert len(envs) == 1
    with open(f"/proc/{envs[0]['pid']}/cmdline", "rb") as f:
        assert os.path.basename(f.read().split(b"\0")[0]) == b"qemu-system-x86_64"
    # ... run through the VMM jailer: unprivileged, under seccomp, rooted in the jail.
    with open(f"/proc/{envs[0]['pid']}/status") as f:
        st = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    assert st["Uid"].split()[0] != "0" and int(st["CapEff"], 16) == 0 and st["Seccomp"] == "2"
    assert sorted(os.listdir(f"/proc/{envs[0]['pid']}/root")) == [
        "bin", "dev", "lib", "lib64", "sbin", "usr", "vm"]


def test_the_same_function_runs_unchanged_on_the_jail(region: Region) -> None:
    lam = lambda_client(region)
    name = _create(lam, UNAME, MemorySize=512)
    assert _invoke(lam, name, {"n": 1000}) == (None, {"release": os.uname().release,
                                                     "sum": 499500, **SAME})
    # The same function asking for VM isolation is refused by agents that cannot run VMs,
    # with the reason, not run in a jail.
    vm_only = _create(lam, UNAME, Environment={"Variables": {ISOLATION_VARIABLE: "microvm"}})
    with pytest.raises(ClientError) as e:
        _invoke(lam, vm_only, {"n": 1})
    assert e.value.response["Error"]["Code"] == "ServiceException"
    assert "asks for microvm isolation" in str(e.value) and "jail backend" in str(e.value)


def test_an_unknown_isolation_is_refused(vm_region: Region) -> None:
    lam = lambda_client(vm_region)
    name = _create(lam, UNAME, Environment={"Variables": {ISOLATION_VARIABLE: "firecracker"}})
    with pytest.raises(ClientError, match="one of microvm"):
        _invoke(lam, name, {"n": 1})


def _vm_env_pid(region: Region, name: str, timeout_s: float = 120) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        envs = [e for a in _agents(region) for e in a["envs"] if e["function"] == name]
        if envs and envs[0]["busy"]:
            return int(envs[0]["pid"])
        time.sleep(0.2)  # polling the region's status for a condition, bounded
    raise AssertionError(f"no busy environment of {name} within {timeout_s} s")


@pytest.mark.slow
def test_a_guest_that_never_answers_is_killed_at_the_timeout(vm_region: Region) -> None:
    lam = lambda_client(vm_region)
    name = _create(lam, SLEEPER, Timeout=3, MemorySize=256)
    assert _invoke(lam, name, {}) == (None, "awake")  # booted
    started = time.monotonic()
    err, out = _invoke(lam, name, {"sleep": 600})
    assert err == "Unhandled" and out["errorType"] == "Sandbox.Timedout", out
    assert time.monotonic() - started < 60
    assert _invoke(lam, name, {}) == (None, "awake")  # a fresh VM


@pytest.mark.slow
def test_qemu_killed_mid_invoke_is_a_lambda_error_and_a_fresh_vm(vm_region: Region) -> None:
    lam = lambda_client(vm_region)
    # A timeout the router's warm-path lease can hold (invoke_lease_ms), so the sleeping
    # invocation goes to the booted VM.
    name = _create(lam, SLEEPER, Timeout=40, MemorySize=256)
    assert _invoke(lam, name, {}) == (None, "awake")
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(r=_invoke(lam, name, {"sleep": 35})))
    t.start()
    pid = _vm_env_pid(vm_region, name)
    os.kill(pid, 9)
    t.join(120)
    assert not t.is_alive()
    err, out = result["r"]
    assert err == "Unhandled" and out["errorType"].startswith("Runtime."), out
    assert _invoke(lam, name, {}) == (None, "awake")
    pids = [e["pid"] for a in _agents(vm_region) for e in a["envs"] if e["function"] == name]
    assert pids and pid not in pids


NET_PROBE = ('import socket, urllib.request\n'
             'def probe(host, port):\n'
             '    try:\n'
             '        with socket.create_connection((host, port), timeout=10):\n'
             '            return "ok"\n'
             '    except OSError as e:\n'
             '        return f"{type(e).__name__}: {e}"\n'
             'def handler(event, context):\n'
             '    return {"http": urllib.request.urlopen(event["url"], timeout=20).read().decode(),\n'
             '            "denied": {t: probe(t, 8080) for t in event["denied"]}}\n')


@pytest.mark.slow  # a region of its own on the microvm backend (~60 s under TCG)
def test_up_backend_microvm_with_egress_gives_guests_the_regions_network(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """`cellcloud up --backend microvm --network egress` (refused before the guest had a network
    device): a function reaches a server outside the region through its guest's NIC, and the
    region's policy refuses the host itself and the metadata address."""
    from tests.network.conftest import World

    world = World()
    world.start()
    try:
        with running_region(tmp_path_factory, "microvm-egress", "--backend", "microvm",
                            "--network", "egress", "--cells", "1",
                            "--agents-per-cell", "1") as r:
            lam = lambda_client(r)
            name = _create(lam, NET_PROBE)
            err, out = _invoke(lam, name, {"url": f"http://{world.addr}:8080/",
                                           "denied": [world.host_addr, world.metadata_addr]})
            assert err is None, out
            assert out["http"] == world.token
            assert all("[Errno 113]" in v for v in out["denied"].values()), out
            assert [a["backend"] for a in _agents(r)] == ["microvm"]
    finally:
        world.close()


NODE_UNAME = ('const os = require("node:os");\n'
              'const fs = require("node:fs");\n'
              'exports.handler = async (event, context) => ({\n'
              '  release: os.release(), sum: event.n * 2, node: process.versions.node,\n'
              '  root: process.getuid() === 0, task: process.cwd(),\n'
              '  remaining: context.getRemainingTimeInMillis() > 0,\n'
              '  layer: fs.existsSync("/opt/data.txt") ? fs.readFileSync("/opt/data.txt", "utf8")\n'
              '    : null});\n')


@pytest.mark.slow  # a Node start under TCG: tens of seconds on a loaded machine
def test_a_node_function_runs_inside_the_vm_with_its_runtime_process(
        vm_region: Region) -> None:
    from cellcloud.sandbox import runtimes

    if 22 not in runtimes.find_node():
        pytest.skip("no Node 22 (scripts/setup.sh)")
    lam = lambda_client(vm_region)
    name = new_name("vmnode")
    lam.create_function(FunctionName=name, Runtime="nodejs22.x", Role=ROLE,
                        Handler="index.handler", MemorySize=512,
                        Code={"ZipFile": make_zip({"index.js": NODE_UNAME})})
    r = lam.invoke(FunctionName=name, Payload=b'{"n": 21}', LogType="Tail")
    err, out = r.get("FunctionError"), json.loads(r["Payload"].read())
    assert err is None, (out, base64.b64decode(r.get("LogResult", "")).decode())
    assert out == {"release": _guest_release(), "sum": 42, "node": out["node"], "root": False,
                   "task": "/var/task", "remaining": True, "layer": None}
    assert out["node"].startswith("22.")
    envs = [e for a in _agents(vm_region) for e in a["envs"] if e["function"] == name]
    assert len(envs) == 1
    with open(f"/proc/{envs[0]['pid']}/cmdline", "rb") as f:
        assert os.path.basename(f.read().split(b"\0")[0]) == b"qemu-system-x86_64"


@pytest.mark.slow  # one more TCG boot
def test_layers_are_mounted_at_opt_inside_the_vm_the_later_one_on_top(
        vm_region: Region) -> None:
    lam = lambda_client(vm_region)
    arns = []
    for word in ("first", "second"):
        zipped = make_zip({"python/greeting.py": f"WORD = {word!r}\n",
                           f"{word}.txt": word})
        arns.append(lam.publish_layer_version(LayerName=new_name("vmlayer"),
                                              Content={"ZipFile": zipped})["LayerVersionArn"])
    name = _create(lam, "import os, sys\n"
                        "def handler(event, context):\n"
                        "    sys.path.append('/opt/python')\n"
                        "    import greeting\n"
                        "    return {'word': greeting.WORD, 'opt': sorted(os.listdir('/opt')),\n"
                        "            'release': os.uname().release}\n",
                   MemorySize=512, Layers=arns)
    err, out = _invoke(lam, name, {})
    assert err is None, out
    assert out == {"word": "second", "opt": ["first.txt", "python", "second.txt"],
                   "release": _guest_release()}


RT_LOOP = r'''import json, os, urllib.request
api = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2018-06-01/runtime"
while True:
    with urllib.request.urlopen(api + "/invocation/next") as r:
        rid = r.headers["Lambda-Runtime-Aws-Request-Id"]
        event = json.loads(r.read())
    body = json.dumps({"echo": event, "handler": os.environ["_HANDLER"],
                       "release": os.uname().release, "shell": os.environ["VIA"]}).encode()
    urllib.request.urlopen(urllib.request.Request(
        api + "/invocation/" + rid + "/response", data=body, method="POST")).read()
'''
BOOTSTRAP = '#!/bin/sh\nVIA="$0" exec /usr/bin/env python3 "$LAMBDA_TASK_ROOT/rt.py"\n'


@pytest.mark.slow  # one more TCG boot
def test_a_custom_runtimes_bootstrap_runs_inside_the_vm(vm_region: Region) -> None:
    from tests.compat.test_runtimes import zip_with_modes

    lam = lambda_client(vm_region)
    name = new_name("vmprov")
    lam.create_function(FunctionName=name, Runtime="provided.al2023", Role=ROLE,
                        Handler="function.handler", MemorySize=512,
                        Code={"ZipFile": zip_with_modes({"bootstrap": (BOOTSTRAP, 0o755),
                                                         "rt.py": (RT_LOOP, 0o644)})})
    err, out = _invoke(lam, name, {"x": 1})
    assert err is None, out
    assert out == {"echo": {"x": 1}, "handler": "function.handler",
                   "release": _guest_release(), "shell": "/var/task/bootstrap"}
