"""`cellcloud up --backend microvm --microvm-snapshots` (issue #18): the region's agents
snapshot their guest at start and start environments of the snapshotted memory size from it
(each with its own seed: different random bytes), environments of other sizes boot cold, and
the agents' status says which sizes restore and how environments started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from cellcloud.core.limits import DEFAULT_LIMITS
from cellcloud.microvm import boot, core
from tests.compat.conftest import ROLE, lambda_client, new_name
from tests.conftest import make_zip
from tests.integration.conftest import Region, running_region

RANDOM = ("import os, time\n"
          "def handler(event, context):\n"
          "    return {'random': os.urandom(16).hex(), 'now': time.time(),\n"
          "            'release': os.uname().release}\n")


def _agents(region: Region) -> list[dict[str, Any]]:
    st = region.client.status()
    return [a for c in st["cells"].values() for a in c["agents"].values()]


def _run(lam: Any, memory_mb: int) -> dict[str, Any]:
    name = new_name("snap")
    lam.create_function(FunctionName=name, Runtime="python3.11", Role=ROLE,
                        Handler="app.handler", Code={"ZipFile": make_zip({"app.py": RANDOM})},
                        MemorySize=memory_mb)
    r = lam.invoke(FunctionName=name, Payload=b"{}")
    out = json.loads(r["Payload"].read())
    assert r.get("FunctionError") is None, out
    return dict(out)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.skipif(boot.qemu_binary() is None, reason="no QEMU (scripts/setup.sh)")
@pytest.mark.skipif(core.pick_kernel(os.listdir("/boot") if os.path.isdir("/boot") else [])
                    is None, reason="no Debian cloud kernel (scripts/setup.sh)")
def test_up_microvm_snapshots_restores_environments_of_the_snapshotted_size(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    smallest = DEFAULT_LIMITS.microvm_guest_memory_mib_min
    with running_region(tmp_path_factory, "microvm-snap-region", "--backend", "microvm",
                        "--microvm-snapshots", "--cells", "1", "--agents-per-cell", "1") as r:
        [agent] = _agents(r)
        assert agent["backend"] == "microvm"
        info = agent["microvm_snapshots"]
        assert (info["memory_mib"], info["failed_memory_mib"], info["error"]) == (
            [smallest], [], ""), info
        lam = lambda_client(r)
        before = time.time()
        a, b = _run(lam, smallest), _run(lam, smallest)  # two functions: two environments
        assert a["random"] != b["random"]
        assert before - 1 <= a["now"] <= time.time() + 1  # the host's clock, not the snapshot's
        info = _agents(r)[0]["microvm_snapshots"]
        assert (info["restored"], info["booted"], info["last_start"]) == (2, 0, "restored"), info
        c = _run(lam, smallest * 2)  # no snapshot of this size: a cold boot
        assert c["release"] == a["release"] != os.uname().release
        info = _agents(r)[0]["microvm_snapshots"]
        assert (info["restored"], info["booted"], info["restore_failed"]) == (2, 1, 0), info
        assert info["last_start"] == "booted: no snapshot"
        # The human status says it too (a wide terminal: rich wraps table cells otherwise).
        out = subprocess.run([sys.executable, "-m", "cellcloud", "status", "--state-dir",
                              r.state_dir], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "COLUMNS": "400"}, check=True).stdout
        assert f"restores {smallest} MiB guests" in out, out


@pytest.mark.parametrize("args, why", [
    (["--microvm-snapshots"], "only with --backend microvm"),
    (["--backend", "microvm", "--microvm-snapshot-memory-mib", "256"],
     "only with --microvm-snapshots"),
    (["--backend", "microvm", "--microvm-snapshots",
      *[a for m in range(DEFAULT_LIMITS.microvm_snapshot_sizes_max + 1)
        for a in ("--microvm-snapshot-memory-mib", str(128 + m))]], "at most"),
])
def test_up_refuses_snapshot_flags_it_cannot_honour(tmp_path: Any, args: list[str],
                                                     why: str) -> None:
    r = subprocess.run([sys.executable, "-m", "cellcloud", "up", *args,
                        "--state-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert why in r.stderr + r.stdout
    assert not os.path.exists(tmp_path / "region.json")


INIT_ONCE = ("import os, random, time\n"
             "INIT = os.urandom(8).hex()\n"
             "def handler(event, context):\n"
             "    if event.get('sleep'):\n"
             "        time.sleep(event['sleep'])\n"
             "    return {'init': INIT, 'random': os.urandom(16).hex(),\n"
             "            'py_random': random.random(), 'now': time.time()}\n")


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.skipif(boot.qemu_binary() is None, reason="no QEMU (scripts/setup.sh)")
@pytest.mark.skipif(core.pick_kernel(os.listdir("/boot") if os.path.isdir("/boot") else [])
                    is None, reason="no Debian cloud kernel (scripts/setup.sh)")
def test_snapstart_versions_restore_from_their_snapshot_after_init(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """SnapStart through `up --backend microvm` and boto3: ApplyOn PublishedVersions is
    refused without microVM isolation, accepted with it and echoed (On on the published
    version, Off on $LATEST); two concurrent invocations of the version run in two environments
    restored from the version's snapshot: the same init, different random bytes."""
    import threading

    from botocore.exceptions import ClientError

    with running_region(tmp_path_factory, "microvm-snapstart-region", "--backend", "microvm",
                        "--cells", "1", "--agents-per-cell", "1") as r:
        lam = lambda_client(r)
        code = {"ZipFile": make_zip({"app.py": INIT_ONCE})}
        with pytest.raises(ClientError, match="microVM isolation"):
            lam.create_function(FunctionName=new_name("ss"), Runtime="python3.11", Role=ROLE,
                                Handler="app.handler", Code=code,
                                SnapStart={"ApplyOn": "PublishedVersions"})
        name = new_name("ss")
        cfg = lam.create_function(
            FunctionName=name, Runtime="python3.11", Role=ROLE, Handler="app.handler",
            Code=code, Timeout=60, SnapStart={"ApplyOn": "PublishedVersions"},
            Environment={"Variables": {"CELLCLOUD_ISOLATION": "microvm"}})
        assert cfg["SnapStart"] == {"ApplyOn": "PublishedVersions", "OptimizationStatus": "Off"}
        v = lam.publish_version(FunctionName=name)
        assert v["SnapStart"] == {"ApplyOn": "PublishedVersions", "OptimizationStatus": "On"}
        got = lam.get_function_configuration(FunctionName=name, Qualifier=v["Version"])
        assert got["SnapStart"]["OptimizationStatus"] == "On"
        outs: list[dict[str, Any]] = []

        def call() -> None:
            resp = lam.invoke(FunctionName=name, Qualifier=v["Version"],
                              Payload=json.dumps({"sleep": 5}).encode())
            outs.append(json.loads(resp["Payload"].read()))

        first = threading.Thread(target=call)
        first.start()
        first.join(300)  # the version's snapshot is made on its first environment
        threads = [threading.Thread(target=call) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert len(outs) == 3 and all("init" in o for o in outs), outs
        assert len({o["init"] for o in outs}) == 1  # one init, before the snapshot
        assert len({o["random"] for o in outs}) == 3
        info = _agents(r)[0]["microvm_snapshots"]
        assert info["version_snapshots"] == 1 and info["version_restored"] >= 2, info
        assert info["version_errors"] == {}
