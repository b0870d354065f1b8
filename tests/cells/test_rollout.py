"""Deployment in waves: `cellcloud rollout` restarts each cell's processes, cell by cell."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from cellcloud import sdk
from cellcloud.experiment.ledger import World
from tests.conftest import make_zip
from tests.integration.conftest import Region, running_region, start_region, stop_region

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_cells(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    with running_region(tmp_path_factory, "rollout", "--cells", "2",
                     "--agents-per-cell", "2") as r:
        yield r


LEDGER_CODE = """
import json, urllib.request
def handler(event, context):
    if event.get("ledger"):
        urllib.request.urlopen(urllib.request.Request(
            event["ledger"], data=json.dumps({"id": event["id"]}).encode(), method="POST"),
            timeout=30)
    return 7
"""


def test_rollout_restarts_cells_in_order_and_fails_no_request(two_cells: Region) -> None:
    """`cellcloud rollout` under continuous sync and async load: every sync invoke answered
    (counted by the clients: no error of any kind), and every accepted async event ran — as a
    ledger server outside the region saw (experiment/ledger.py, reached over egress)."""
    r = two_cells
    r.client.create_function("wave", make_zip({"app.py": LEDGER_CODE}), "app.handler")
    assert r.client.invoke("wave", {}).json() == 7
    before = {k: v["pid"] for k, v in r.region_json()["components"].items()}  # type: ignore[union-attr]
    world = World()
    world.start()
    stop = threading.Event()
    lock = threading.Lock()
    answered: Counter[str] = Counter()
    failures: list[str] = []
    accepted: list[str] = []

    def sync_load() -> None:
        c = sdk.Client(r.endpoint, r.doc["api_key"], timeout_s=120)  # type: ignore[arg-type]
        while not stop.is_set():
            try:
                out = c.invoke("wave", {})
                ok = out.json() == 7 and not out.function_error
                with lock:
                    answered["sync"] += 1
                    if not ok:
                        failures.append(f"sync answered {out.status} {out.payload[:100]!r}")
            except Exception as e:  # every error the client sees is a failed request
                with lock:
                    failures.append(f"sync: {e!r}")
        c.close()

    def async_load(n: int) -> None:
        c = sdk.Client(r.endpoint, r.doc["api_key"], timeout_s=120)  # type: ignore[arg-type]
        i = 0
        while not stop.is_set():
            eid = f"{n}-{i}"
            i += 1
            body = json.dumps({"ledger": world.url, "id": eid}).encode()
            try:
                status, _, data = c.request(
                    "POST", "/2015-03-31/functions/wave/invocations", body,
                    {"content-type": "application/json", "x-amz-invocation-type": "Event"})
                with lock:
                    answered["async"] += 1
                    if status == 202:
                        accepted.append(eid)
                    else:
                        failures.append(f"async answered {status} {data[:100]!r}")
            except Exception as e:
                with lock:
                    failures.append(f"async: {e!r}")
            stop.wait(0.05)  # paced (~20 events/s): the backlog stays small on a busy host
        c.close()

    threads = [threading.Thread(target=sync_load) for _ in range(2)]
    threads += [threading.Thread(target=async_load, args=(0,))]
    try:
        for t in threads:
            t.start()
        out = subprocess.run([sys.executable, "-m", "cellcloud", "rollout", "--state-dir",
                              r.state_dir, "--timeout-s", "300"], capture_output=True,
                             text=True, timeout=330)
        with lock:
            during = dict(answered)
        stop.set()
        for t in threads:
            t.join(timeout=180)
        assert out.returncode == 0, out.stderr
        assert not failures, failures[:10]
        assert during["sync"] > 0 and during["async"] > 0  # the load ran through the rollout
        # Every accepted event runs: the outside ledger gets each id (bounded wait).
        ran: set[str] = set()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            ran = {str(rec.get("id")) for rec in world.records()}
            if ran >= set(accepted):
                break
            time.sleep(0.5)  # polling a server the functions write to, bounded above
        assert set(accepted) <= ran, sorted(set(accepted) - ran)[:10]
    finally:
        stop.set()
        world.close()
    with open(os.path.join(r.state_dir, "rollout.json")) as f:
        report = json.load(f)
    # The cells wave by wave, then the router and the control plane, a wave each.
    assert report["ok"] and [c["cell"] for c in report["cells"]] == [
        "cell-1", "cell-2", "router", "control"]
    assert all(c["healthy"] for c in report["cells"])
    after = {k: v["pid"] for k, v in r.region_json()["components"].items()}  # type: ignore[union-attr]
    for name in ("cell-1-frontend", "cell-2-frontend", "cell-1-agent-0", "cell-2-agent-1"):
        assert after[name] != before[name], name  # restarted
    assert after["router"] != before["router"] and after["control"] != before["control"]
    assert r.client.invoke("wave", {}).json() == 7  # and the region still serves


def _build(tmp: str, version: str, plant: str | None = None,
           component: str = "frontend") -> str:
    """A copy of this source tree as another build: its own ``__version__`` and, with
    ``plant``, a ``component`` (frontend, router) that exits at start (a build that fails its
    health checks)."""
    import cellcloud

    root = os.path.join(tmp, f"build-{version}")
    shutil.copytree(os.path.dirname(cellcloud.__file__), os.path.join(root, "src", "cellcloud"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = os.path.join(root, "src", "cellcloud", "__init__.py")
    with open(init) as f:
        text = f.read()
    with open(init, "w") as f:
        f.write(text.replace(f'__version__ = "{cellcloud.__version__}"',
                             f'__version__ = "{version}"'))
    if plant is not None:
        server = os.path.join(root, "src", "cellcloud", component, "server.py")
        with open(server) as f:
            text = f.read()
        with open(server, "w") as f:
            f.write(text.replace("async def serve(args: argparse.Namespace) -> None:\n",
                                 "async def serve(args: argparse.Namespace) -> None:\n"
                                 f"    raise SystemExit({plant!r})\n"))
    return root


def _monitor_restarts(r: Region, name: str) -> int:
    """How often the supervisor's monitor restarted ``name`` (its log says so each time)."""
    with open(os.path.join(r.state_dir, "logs", "supervisor.log"), errors="replace") as f:
        return sum(f"{name} exited with" in line for line in f)


def _versions(r: Region) -> dict[str, object]:
    comps: dict[str, dict[str, object]] = r.region_json()["components"]  # type: ignore[assignment]
    return {k: v.get("version") for k, v in comps.items()}


def _rollout(r: Region, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "cellcloud", "rollout", "--state-dir",
                          r.state_dir, "--timeout-s", "600", *args], capture_output=True,
                         text=True, timeout=660)
    with open(os.path.join(r.state_dir, "rollout.json")) as f:
        return out, json.load(f)


def test_rollout_to_a_new_build_under_load_fails_no_request(
        two_cells: Region, tmp_path: Any) -> None:
    """`rollout --to <build>`: each cell's processes run the new build (their version says
    so), wave by wave with a bake, and the clients count no failed request."""
    r = two_cells
    r.client.create_function("wave2", make_zip({"app.py": LEDGER_CODE}), "app.handler")
    build = _build(str(tmp_path), "9.9.9")
    stop = threading.Event()
    failures: list[str] = []
    served = [0]

    def load() -> None:
        c = sdk.Client(r.endpoint, r.doc["api_key"], timeout_s=120)  # type: ignore[arg-type]
        while not stop.is_set():
            try:
                if c.invoke("wave2", {}).json() != 7:
                    failures.append("wrong answer")
                served[0] += 1
            except Exception as e:
                failures.append(repr(e))
        c.close()

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        out, report = _rollout(r, "--to", build, "--bake-s", "2")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert not failures, failures[:10]
    assert report["status"] == "done" and report["version"] == "9.9.9"
    assert [w["cells"] for w in report["waves"]] == [["cell-1"], ["cell-2"], ["router"],
                                                     ["control"]]
    assert all(w["healthy"] and w["step"] == "upgrade" for w in report["waves"])
    assert sum(w["served"] for w in report["waves"]) > 0 and served[0] > 0
    versions = _versions(r)
    for name in ("cell-1-frontend", "cell-1-agent-0", "cell-2-dispatcher", "cell-2-agent-1"):
        assert versions[name] == "9.9.9", (name, versions)
    assert versions["router"] == "9.9.9" and versions["control"] == "9.9.9"
    assert r.client.invoke("wave2", {}).json() == 7

    # A build whose frontend cannot start: the first wave is unhealthy and rolled back; the
    # region keeps serving on the build it had (9.9.9), and the report says so.
    broken = _build(str(tmp_path), "10.0.0", plant="planted: this build cannot start")
    restarts = _monitor_restarts(r, "cell-1-frontend")
    out, report = _rollout(r, "--to", broken)
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert report["status"] == "rolled_back" and "unhealthy" in report["reason"]
    assert [(w["step"], w["cells"]) for w in report["waves"]] == [
        ("upgrade", ["cell-1"]), ("rollback", ["cell-1"])]
    versions = _versions(r)
    assert all(versions[n] == "9.9.9" for n in versions
               if n.startswith("cell-")), versions
    # The rollout alone started the frontend again (rolled back): the supervisor's monitor
    # stood aside instead of restarting it too, on the broken build, beside the rollback.
    assert _monitor_restarts(r, "cell-1-frontend") == restarts
    assert r.client.invoke("wave2", {}).json() == 7


@pytest.mark.slow
def test_a_rollout_cut_by_the_supervisors_crash_is_resumed(
        tmp_path_factory: pytest.TempPathFactory, tmp_path: Any) -> None:
    """The supervisor dies (SIGKILL) after the first wave: its processes die with it. `up`
    again starts each process on the build builds.json recorded (cell-1 on the new build, the
    rest on the old: the region says so in region.json), and `rollout` without --to resumes the
    saved plan to the end; a --to naming another build meanwhile is refused."""
    import signal

    state = str(tmp_path_factory.mktemp("resume"))
    r = start_region(state, "--cells", "2", "--agents-per-cell", "1")
    build = _build(str(tmp_path), "9.9.9")
    try:
        r.client.create_function("wave3", make_zip({"app.py": LEDGER_CODE}), "app.handler")
        sup_pid = int(r.doc["supervisor_pid"])  # type: ignore[call-overload]
        proc = subprocess.Popen([sys.executable, "-m", "cellcloud", "rollout", "--state-dir",
                                 state, "--to", build, "--bake-s", "600"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        builds_path = os.path.join(state, "builds.json")

        def first_wave_upgraded() -> bool:  # its last process, the frontend, runs the build
            try:
                with open(builds_path) as f:
                    return bool(json.load(f).get("cell-1-frontend") == build)
            except (OSError, ValueError):
                return False
        deadline = time.monotonic() + 300
        while not first_wave_upgraded():  # the first wave's restart on the new build
            assert time.monotonic() < deadline, "the first wave never upgraded"
            time.sleep(0.2)  # polling a file the supervisor writes, bounded above
        os.kill(sup_pid, signal.SIGKILL)  # mid-bake: the plan says wave 1 of 2 is under way
        proc.kill()
        proc.wait(timeout=60)
        r.client.close()
        r = start_region(state, "--cells", "2", "--agents-per-cell", "1")
        versions = _versions(r)
        assert versions["cell-1-frontend"] == "9.9.9" and versions["cell-1-agent-0"] == "9.9.9"
        import cellcloud
        assert versions["cell-2-frontend"] == cellcloud.__version__  # not yet upgraded
        assert r.client.invoke("wave3", {}).json() == 7
        other = _build(str(tmp_path), "9.9.10")
        out, report = _rollout(r, "--to", other)
        assert out.returncode == 1 and "under way" in report["error"]
        out, report = _rollout(r)  # resumes the saved plan
        assert out.returncode == 0, (out.stdout, out.stderr)
        assert report["resumed"] and report["status"] == "done"
        assert all(v == "9.9.9" for n, v in _versions(r).items() if n.startswith("cell-"))
        assert r.client.invoke("wave3", {}).json() == 7
    finally:
        stop_region(r)


def test_router_and_control_replaced_under_keepalive_load_fail_no_request(
        two_cells: Region) -> None:
    """`rollout --components router,control` under continuous load from kept-alive clients
    (sdk.Client and boto3): a new router starts on the supervisor's listening socket beside
    the old one, which then drains; the control plane drains and its successor takes over on
    its port. No request fails, counted by the clients. boto3 runs in its standard retry mode
    with its defaults, and every attempt it would retry is recorded (needs-retry): an attempt
    answered 5xx or 429 counts as a failure; only a connection error on a kept-alive
    connection (the request never answered, sent again on a new connection) is allowed."""
    import boto3
    from botocore.config import Config

    r = two_cells
    r.client.create_function("front", make_zip({"app.py": LEDGER_CODE}), "app.handler")
    assert r.client.invoke("front", {}).json() == 7
    before = {k: v["pid"] for k, v in r.region_json()["components"].items()}  # type: ignore[union-attr]
    stop = threading.Event()
    lock = threading.Lock()
    counts: Counter[str] = Counter()
    failures: list[str] = []

    def boto(service: str) -> Any:
        c = boto3.client(service, endpoint_url=r.endpoint, region_name=str(r.doc["region"]),
                         aws_access_key_id=str(r.doc["access_key_id"]),
                         aws_secret_access_key=str(r.doc["secret_access_key"]),
                         config=Config(retries={"mode": "standard"}, read_timeout=120))

        def attempt(response: Any = None, caught_exception: Any = None, **_: Any) -> None:
            with lock:
                if caught_exception is not None:
                    counts[f"{service} connection retried"] += 1
                elif response is not None and response[0].status_code >= 429:
                    failures.append(f"{service} attempt answered {response[0].status_code}: "
                                    f"{response[1].get('Error')}")

        c.meta.events.register("needs-retry", attempt)
        return c

    def sdk_load() -> None:
        c = sdk.Client(r.endpoint, r.doc["api_key"], timeout_s=120)  # type: ignore[arg-type]
        while not stop.is_set():
            try:
                out = c.invoke("front", {})
                with lock:
                    counts["sdk"] += 1
                    if out.json() != 7 or out.function_error:
                        failures.append(f"sdk answered {out.status} {out.payload[:100]!r}")
            except Exception as e:  # every error the client sees is a failed request
                with lock:
                    failures.append(f"sdk: {e!r}")
        c.close()

    def boto_lambda() -> None:
        c = boto("lambda")
        while not stop.is_set():
            try:
                out = c.invoke(FunctionName="front", Payload=b"{}")
                ok = out["Payload"].read() == b"7" and "FunctionError" not in out
                with lock:
                    counts["boto3 lambda"] += 1
                    if not ok:
                        failures.append(f"boto3 lambda answered {out}")
            except Exception as e:
                with lock:
                    failures.append(f"boto3 lambda: {e!r}")

    def boto_ecs() -> None:  # through the router to the control plane (control/ecs.py)
        c = boto("ecs")
        while not stop.is_set():
            try:
                c.list_clusters()
                with lock:
                    counts["boto3 ecs"] += 1
            except Exception as e:
                with lock:
                    failures.append(f"boto3 ecs: {e!r}")

    threads = [threading.Thread(target=sdk_load) for _ in range(2)]
    threads += [threading.Thread(target=boto_lambda), threading.Thread(target=boto_ecs)]
    try:
        for t in threads:
            t.start()
        out, report = _rollout(r, "--components", "router,control")
        with lock:
            during = dict(counts)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert not failures, failures[:10]
    assert during["sdk"] > 0 and during["boto3 lambda"] > 0 and during["boto3 ecs"] > 0, during
    assert [(w["step"], w["cells"]) for w in report["waves"]] == [
        ("upgrade", ["router"]), ("upgrade", ["control"])], report
    assert all(w["healthy"] for w in report["waves"]) and report["status"] == "done"
    assert [c["restarted"] for c in report["cells"]] == [["router"], ["control"]]
    after = {k: v["pid"] for k, v in r.region_json()["components"].items()}  # type: ignore[union-attr]
    assert after["router"] != before["router"] and after["control"] != before["control"]
    assert r.client.invoke("front", {}).json() == 7  # the same endpoint serves on
    assert r.region_json()["endpoint"] == r.endpoint  # type: ignore[index]


def test_router_and_control_stopped_and_restarted_fail_no_request(two_cells: Region) -> None:
    """The router SIGTERMed (the supervisor starts another): connections wait in the backlog
    of the listening socket the supervisor holds, never meet a closed port, and the requests
    under way are answered; then the control plane SIGTERMed: it drains, and ECS calls sent
    meanwhile are sent again to its successor. Counted by the clients (sdk.Client, boto3
    with no retries): no failure. Before, the router's port was closed between the two
    processes (thousands of ConnectionRefusedError) and ECS calls failed with 503."""
    import boto3
    from botocore.config import Config

    r = two_cells
    r.client.create_function("crash", make_zip({"app.py": LEDGER_CODE}), "app.handler")
    assert r.client.invoke("crash", {}).json() == 7
    stop = threading.Event()
    lock = threading.Lock()
    counts: Counter[str] = Counter()
    failures: list[str] = []

    def sdk_load() -> None:
        c = sdk.Client(r.endpoint, r.doc["api_key"], timeout_s=120)  # type: ignore[arg-type]
        while not stop.is_set():
            try:
                ok = c.invoke("crash", {}).json() == 7
                with lock:
                    counts["sdk"] += 1
                    if not ok:
                        failures.append("sdk: wrong answer")
            except Exception as e:  # every error the client sees is a failed request
                with lock:
                    failures.append(f"sdk: {e!r}")
        c.close()

    def ecs_load() -> None:
        c = boto3.client("ecs", endpoint_url=r.endpoint, region_name=str(r.doc["region"]),
                         aws_access_key_id=str(r.doc["access_key_id"]),
                         aws_secret_access_key=str(r.doc["secret_access_key"]),
                         config=Config(retries={"mode": "standard", "total_max_attempts": 1},
                                       read_timeout=120))
        while not stop.is_set():
            try:
                c.list_clusters()
                with lock:
                    counts["ecs"] += 1
            except Exception as e:
                with lock:
                    failures.append(f"boto3 ecs: {e!r}")
            stop.wait(0.01)  # paced: an idle kept-alive connection is part of the test

    def pid(name: str) -> int:
        return int(r.region_json()["components"][name]["pid"])  # type: ignore[index]

    threads = [threading.Thread(target=sdk_load) for _ in range(2)]
    threads.append(threading.Thread(target=ecs_load))
    try:
        for t in threads:
            t.start()
        for name in ("router", "control"):
            old = pid(name)
            with lock:
                seen = counts["sdk"] + counts["ecs"]
            os.kill(old, signal.SIGTERM)
            deadline = time.monotonic() + 120
            while pid(name) == old or counts["sdk"] + counts["ecs"] < seen + 50:
                assert time.monotonic() < deadline, f"{name} not replaced, or no load through it"
                time.sleep(0.1)  # polling the supervisor's region.json, bounded above
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)
    assert not failures, (len(failures), failures[:10])
    assert counts["sdk"] > 0 and counts["ecs"] > 0, counts


def test_a_router_that_cannot_start_is_rolled_back_and_the_old_one_serves_on(
        two_cells: Region, tmp_path: Any) -> None:
    """`rollout --components router --to` a build whose router exits at start: the new
    process never serves, the old one keeps the listening socket and serves throughout, the
    wave is unhealthy and rolled back (the router replaced again, on the build it ran)."""
    r = two_cells
    r.client.create_function("keep", make_zip({"app.py": LEDGER_CODE}), "app.handler")
    old = r.region_json()["components"]["router"]["pid"]  # type: ignore[index]
    broken = _build(str(tmp_path), "11.0.0", plant="planted: no router", component="router")
    out, report = _rollout(r, "--to", broken, "--components", "router")
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert report["status"] == "rolled_back" and "did not become ready" in str(report), report
    assert [(w["step"], w["cells"]) for w in report["waves"]] == [
        ("upgrade", ["router"]), ("rollback", ["router"])]
    comps = r.region_json()["components"]  # type: ignore[index]
    router = comps["router"]  # back on the build the cells run, and replaced again
    assert router["version"] == comps["cell-1-frontend"]["version"] and router["pid"] != old
    assert r.client.invoke("keep", {}).json() == 7
