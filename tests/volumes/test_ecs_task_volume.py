"""Issue #19's Done-when, through the APIs a user knows: a task writes to its managed volume, a
storage server is killed, the task keeps writing after a pause, and nothing acknowledged is
lost (docs/fargate.md#volumes).

A region with 3 storage servers (``cellcloud up --storage-servers 3 --store-colony ...``);
RunTask of a container whose task definition declares a volume configured at launch, mounted
at ``/data``, given by ``volumeConfigurations`` (``managedEBSVolume``, 1 GiB, ext4,
``deleteOnTermination: false``). The container prints its ``/data`` line of
``/proc/self/mountinfo`` (ext4 on a loop device) and the filesystem's size, then appends
numbered, checksummed records to ``/data/records``, fsyncs each and prints ``ack N T`` once
fsync returned: its log (awslogs, read through the Logs API) is the oracle outside the
volume. The volume's primary storage server is killed with SIGKILL; the test waits for more
acknowledgements after it (the supervisor restarts the server; with 3 servers the writes wait
for it: nowhere else to rebuild the replica) and reports the longest gap between two. StopTask;
the control plane's sweep detaches the volume (``available``; kept); ``cellcloud volume
attach`` mounts it on the host and every acknowledged record is read back intact."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import boto_client, running_region
from tests.oci_images import host_python_layers, image_layout, layer_tar

from .harness import Stack
from .test_region_volumes import _attach, _config

pytestmark = pytest.mark.integration

WRITER = r"""
import os, struct, sys, time, zlib
for line in open("/proc/self/mountinfo"):
    f = line.split()
    if f[4] == "/data":
        rest = f[f.index("-") + 1:]
        print("mount", rest[0], rest[1], "ro" if "ro" in f[5].split(",") else "rw", flush=True)
st = os.statvfs("/data")
print("size", st.f_blocks * st.f_frsize, flush=True)
fd = os.open("/data/records", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
i = 0
while True:
    payload = (b"%08d" % i) * 64
    body = struct.pack("<QI", i, len(payload)) + payload
    os.write(fd, body + struct.pack("<I", zlib.crc32(body)))
    os.fsync(fd)
    print("ack", i, "%.3f" % time.time(), flush=True)
    i += 1
    time.sleep(0.01)
"""


READER = r"""
import errno, os
for line in open("/proc/self/mountinfo"):
    f = line.split()
    if f[4] == "/mnt/ro":
        print("mount", f[f.index("-") + 1], "ro" if "ro" in f[5].split(",") else "rw", flush=True)
try:
    open("/mnt/ro/nope", "w")
    print("wrote", flush=True)
except OSError as e:
    print("refused", errno.errorcode[e.errno], flush=True)
"""


def _records(data: bytes) -> dict[int, bool]:
    """Record number -> intact (checksum and payload), for every whole record in ``data``."""
    out: dict[int, bool] = {}
    pos = 0
    while pos + 12 <= len(data):
        i, n = struct.unpack_from("<QI", data, pos)
        end = pos + 12 + n + 4
        if n > 1 << 20 or end > len(data):
            break  # a torn tail (never acknowledged)
        body = data[pos:end - 4]
        (crc,) = struct.unpack_from("<I", data, end - 4)
        out[i] = crc == zlib.crc32(body) and body[12:] == (b"%08d" % i) * 64
        pos = end
    return out


@pytest.mark.parametrize("servers", [
    3,  # the issue's: the writes wait for the killed server's restart
    # a spare: the volume is rewired onto it while the killed server is down
    pytest.param(4, marks=pytest.mark.slow)])
def test_a_task_keeps_writing_through_a_storage_server_kill(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, servers: int) -> None:
    colony = Stack(str(tmp_path), store_nodes=3, servers=0)
    try:
        with running_region(tmp_path_factory, "ecs-volume-region", "--agents-per-cell", "1",
                            "--storage-servers", str(servers), "--store-colony",
                            colony.colony_path) as region:
            _run(region, colony, tmp_path, servers)
    finally:
        colony.stop_all()


def _run(region: Any, colony: Stack, tmp_path: Path, servers: int) -> None:
    layout = str(tmp_path / "img")
    image_layout(layout, [], tag="v1", config_doc={"Cmd": ["/bin/true"]},
                 blobs=[host_python_layers()[0], layer_tar({"app/writer.py":
                                                            WRITER.encode(),
                                                            "app/reader.py":
                                                            READER.encode()})])
    archive = str(tmp_path / "img.tar")
    subprocess.run(["tar", "-cf", archive, "-C", layout, "."], check=True)
    region.cli("image", "push", archive, "ecs/writer:v1")
    image = f"{region.endpoint.split('//', 1)[1]}/ecs/writer:v1"
    name, account = str(region.doc["region"]), str(region.doc["account_id"])
    ecs, ec2, logs = (boto_client(region, s) for s in ("ecs", "ec2", "logs"))
    ecs.create_cluster(clusterName="vols")
    ecs.register_task_definition(
        family="writer", networkMode="awsvpc", requiresCompatibilities=["FARGATE"],
        cpu="256", memory="512",
        volumes=[{"name": "data", "configuredAtLaunch": True}],
        containerDefinitions=[{
            "name": "writer", "image": image, "command": [sys.executable, "-u",
                                                          "/app/writer.py"],
            "mountPoints": [{"sourceVolume": "data", "containerPath": "/data"}],
            "logConfiguration": {"logDriver": "awslogs", "options": {
                "awslogs-group": "/ecs/writer", "awslogs-region": name,
                "awslogs-stream-prefix": "w"}}}, {
            # the same volume, read-only, in a second container of the task
            "name": "reader", "image": image, "essential": False,
            "command": [sys.executable, "-u", "/app/reader.py"],
            "dependsOn": [{"containerName": "writer", "condition": "START"}],
            "mountPoints": [{"sourceVolume": "data", "containerPath": "/mnt/ro",
                             "readOnly": True}],
            "logConfiguration": {"logDriver": "awslogs", "options": {
                "awslogs-group": "/ecs/writer", "awslogs-region": name,
                "awslogs-stream-prefix": "w"}}}])
    out = ecs.run_task(cluster="vols", taskDefinition="writer", volumeConfigurations=[{
        "name": "data", "managedEBSVolume": {
            "sizeInGiB": 1, "volumeType": "gp3", "filesystemType": "ext4",
            "roleArn": f"arn:aws:iam::{account}:role/ecsInfrastructureRole",
            "terminationPolicy": {"deleteOnTermination": False}}}])
    assert out["failures"] == []
    arn = out["tasks"][0]["taskArn"]
    task_id = arn.rsplit("/", 1)[1]
    (att,) = [a for a in out["tasks"][0]["attachments"]
              if a["type"] == "AmazonElasticBlockStorage"]
    vid = {d["name"]: d["value"] for d in att["details"]}["volumeId"]
    v = ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]
    assert v["State"] == "in-use" and v["Attachments"][0]["InstanceId"] == arn
    cfg = _config(colony, vid)
    assert cfg is not None and len(cfg.replicas) == 3

    lines: list[str] = []
    token: list[str] = []

    def read_log() -> list[str]:
        while True:
            kw: dict[str, Any] = {"logGroupName": "/ecs/writer",
                                  "logStreamName": f"w/writer/{task_id}",
                                  "startFromHead": True}
            if token:
                kw["nextToken"] = token[0]
            try:
                page = logs.get_log_events(**kw)
            except logs.exceptions.ResourceNotFoundException:
                return lines
            lines.extend(e["message"] for e in page["events"])
            if token and page["nextForwardToken"] == token[0]:
                return lines
            token[:] = [page["nextForwardToken"]]
            if not page["events"]:
                return lines

    def acks() -> list[tuple[int, float]]:
        return [(int(p[1]), float(p[2])) for p in (ln.split() for ln in read_log())
                if p and p[0] == "ack"]

    def wait_acks(n: int, what: str) -> list[tuple[int, float]]:
        deadline = time.monotonic() + 180
        while True:
            got = acks()
            if len(got) >= n:
                return got
            t = ecs.describe_tasks(cluster="vols", tasks=[arn])["tasks"][0]
            assert t["lastStatus"] != "STOPPED", (what, t.get("stoppedReason"), lines[-5:])
            assert time.monotonic() < deadline, (what, t["lastStatus"], lines[-5:])
            time.sleep(0.2)

    before = wait_acks(40, "the first records")
    mount = next(ln.split() for ln in lines if ln.startswith("mount "))
    assert mount[1] == "ext4" and mount[2].startswith("/dev/loop") and mount[3] == "rw"
    size = int(next(ln.split()[1] for ln in lines if ln.startswith("size ")))
    assert 0.9 * 1024**3 < size <= 1024**3  # ext4 of the 1 GiB volume (less its metadata)
    deadline = time.monotonic() + 120
    while True:  # the read-only container's two lines (filed at its next poll)
        try:
            said = [e["message"] for e in logs.get_log_events(
                logGroupName="/ecs/writer", logStreamName=f"w/reader/{task_id}",
                startFromHead=True)["events"]]
        except logs.exceptions.ResourceNotFoundException:
            said = []
        if len(said) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert said == ["mount ext4 ro", "refused EROFS"], said
    comps: Any = region.region_json()["components"]
    killed_at = time.time()
    os.kill(int(comps[cfg.primary]["pid"]), signal.SIGKILL)
    after = wait_acks(len(before) + 40, "records after the kill")
    times = [t for _, t in after]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b >= killed_at - 1]
    pause_s = max(gaps)
    print(f"\n{servers} storage servers: longest gap between acknowledged writes around "
          f"the kill: {pause_s:.3f} s ({len(after)} acknowledged)", file=sys.stderr)
    ecs.stop_task(cluster="vols", task=arn, reason="done")
    deadline = time.monotonic() + 180
    while ec2.describe_volumes(VolumeIds=[vid])["Volumes"][0]["State"] != "available":
        assert time.monotonic() < deadline, "the volume was not detached after its task"
        time.sleep(0.2)
    acked = acks()  # the last lines too (filed before the task's environment went)
    assert [i for i, _ in acked] == list(range(len(acked)))
    mnt = str(tmp_path / "mnt")
    proc, line = _attach(region.state_dir, vid, mnt)
    try:
        assert line["attach_epoch"] == 2
        found = _records(Path(mnt, "records").read_bytes())
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    lost = [i for i, _ in acked if not found.get(i)]
    assert not lost, f"{len(lost)} acknowledged records lost or damaged: {lost[:10]}"
    after_cfg = _config(colony, vid)
    assert after_cfg is not None and after_cfg.attached_client == ""
    if servers > 3:  # rewired away from the killed server onto the spare
        assert cfg.primary not in after_cfg.replicas
    ec2.delete_volume(VolumeId=vid)
