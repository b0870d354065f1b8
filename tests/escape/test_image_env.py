"""Image-rooted environments on a real agent with the jail backend: layers streamed in
bounded chunks (``image_blob``), unpacked once, shared read-only; the environment's root is an
overlay of them with a private upper; the image's ENTRYPOINT/CMD/WORKDIR/ENV are honoured and
its USER is mapped onto the environment's own uid; AWS's runtime interface client (awslambdaric)
talks to AWS_LAMBDA_RUNTIME_API."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import pytest

from cellcloud.transport import OpError
from tests.escape.conftest import Sandbox
from tests.oci_images import host_python_layers, lambda_image

HANDLER = '''
import json, os
def handler(event, context):
    out = {"uid": os.getuid(), "gid": os.getgid(), "cwd": os.getcwd(),
           "greeting": os.environ.get("GREETING"), "fn_var": os.environ.get("FN_VAR"),
           "task_root": os.environ.get("LAMBDA_TASK_ROOT"),
           "api": os.environ.get("AWS_LAMBDA_RUNTIME_API"),
           "release": open("/etc/image-release").read(),
           "doomed": os.path.exists("/etc/doomed"),
           "fn": context.function_name, "event": event}
    for path in ("/planted", "/var/task/planted"):
        try:
            open(path, "w").write("x")
            out[path] = "written"
        except OSError as e:
            out[path] = e.errno
    open("/tmp/scratch", "w").write("ok")
    return out
'''

chunk_bytes = 1024 * 1024


def push_layers(sb: Sandbox, layout: str, layers: list[str]) -> int:
    """Stream each layer the agent lacks in 1 MiB image_blob calls; returns the calls made."""
    calls = 0
    for digest in layers:
        path = os.path.join(layout, "blobs", "sha256", digest.split(":")[1])
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            offset = 0
            while True:
                data = f.read(chunk_bytes)
                last = offset + len(data) >= size
                sb._run(sb.agent.image_blob({"digest": digest, "offset": offset,
                                             "data": data, "last": last}))
                calls += 1
                offset += len(data)
                if last:
                    break
    return calls


def create_image_env(sb: Sandbox, img: dict[str, Any], config: dict[str, Any],
                     environment: dict[str, str] | None = None) -> str:
    env_id = f"i-{uuid.uuid4().hex[:8]}"
    sb._run(sb.agent.create_env({
        "env_id": env_id, "bundle_sha256": "",
        "function": {"name": "imgfn", "arn": "arn:aws:lambda:cc-local-1:1:function:imgfn",
                     "handler": "", "runtime": "", "memory_mb": 256, "timeout_s": 10,
                     "ephemeral_mb": 16, "environment": environment or {}},
        "image": {"digest": img["manifest"], "layers": img["layers"],
                  "entrypoint": config["Entrypoint"], "cmd": config["Cmd"],
                  "workdir": config["WorkingDir"],
                  "env": dict(e.split("=", 1) for e in config["Env"])},
        "create_timeout_ms": 60_000}))
    return env_id


def _config(layout: str, img: dict[str, Any]) -> dict[str, Any]:
    with open(os.path.join(layout, "blobs", "sha256", img["config"].split(":")[1])) as f:
        doc: dict[str, Any] = json.load(f)["config"]
    return doc


@pytest.fixture(scope="module")
def base() -> list[bytes]:
    return host_python_layers()


def test_image_env_runs_awslambdaric_with_the_image_config(
        sandbox: Sandbox, base: list[bytes], tmp_path: os.PathLike[str]) -> None:
    layout = os.path.join(tmp_path, "img")
    img = lambda_image(layout, HANDLER, env={"GREETING": "from-image", "FN_VAR": "image"},
                       base=base)
    config = _config(layout, img)
    with pytest.raises(OpError) as missing:
        create_image_env(sandbox, img, config)
    assert missing.value.type == "LayerMissing"
    assert missing.value.data["digest"] == img["layers"][0]
    assert push_layers(sandbox, layout, img["layers"]) > len(img["layers"])  # chunked
    env_id = create_image_env(sandbox, img, config, environment={"FN_VAR": "function"})
    res = sandbox.invoke(env_id, b'{"k": 1}', timeout_s=10)
    assert "error" not in res, res
    out = json.loads(res["payload"])
    assert "uid" in out, (out, res.get("logs"))
    uid = sandbox.uid_of(env_id)
    assert (out["uid"], out["gid"]) == (uid, uid)  # USER 1000 mapped onto the env's own uid
    assert out["cwd"] == "/var/task" and out["task_root"] == "/var/task"
    assert out["greeting"] == "from-image" and out["fn_var"] == "function"
    assert out["api"] and out["fn"] == "imgfn" and out["event"] == {"k": 1}
    assert out["release"] == "cellcloud test base\n"
    assert out["doomed"] is False  # the second layer's whiteout hides the first layer's file
    assert out["/planted"] == 30 and out["/var/task/planted"] == 30  # EROFS: read-only root
    # The shared lower layers are untouched on the host.
    for digest in img["layers"]:
        layer = sandbox.agent.images.layer_dir(digest)
        assert not os.path.exists(os.path.join(layer, "planted"))
        assert not os.path.exists(os.path.join(layer, "tmp", "scratch"))
    # A second environment of the same image unpacks nothing again.
    unpacked = sandbox.agent.images.counters["layers_unpacked"]
    env2 = create_image_env(sandbox, img, config)
    assert "error" not in sandbox.invoke(env2, b"{}", timeout_s=10)
    assert sandbox.agent.images.counters["layers_unpacked"] == unpacked
    stats = sandbox._run(sandbox.agent.status())["image_layers"]
    assert stats["cached"] >= len(img["layers"]) and stats["blob_bytes_in"] > 0
    sandbox.destroy(env_id)
    sandbox.destroy(env2)


def test_image_symlinked_mount_points_do_not_reach_the_host(
        sandbox: Sandbox, base: list[bytes], tmp_path: os.PathLike[str]) -> None:
    """An image whose /etc, /tmp and /var/runtime are symlinks to host paths: the agent's
    writes (passwd, hosts, the attestation) and mounts land in the environment's own upper
    layer, never on the host."""
    import io
    import tarfile

    from tests.oci_images import digest as digest_of
    from tests.oci_images import image_layout

    victims = {name: os.path.join(tmp_path, "victim-" + name.replace("/", "-"))
               for name in ("etc", "tmp", "proc", "dev")}
    victim_file = os.path.join(tmp_path, "victim-file")
    with open(victim_file, "w") as f:
        f.write("host data\n")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, victim in victims.items():
            os.mkdir(victim)
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, victim
            tar.addfile(info)
        # The file the agent writes the attestation document to, as a link to a host file.
        info = tarfile.TarInfo("var/runtime/attestation.json")
        info.type, info.linkname = tarfile.SYMTYPE, victim_file
        tar.addfile(info)
    import gzip

    evil = gzip.compress(raw.getvalue())
    layout = os.path.join(tmp_path, "img")
    good = lambda_image(os.path.join(tmp_path, "good"), HANDLER, base=base)
    config = _config(os.path.join(tmp_path, "good"), good)
    good_blobs = []
    for d in good["layers"]:
        with open(os.path.join(tmp_path, "good", "blobs", "sha256", d.split(":")[1]), "rb") as f:
            good_blobs.append(f.read())
    img = image_layout(layout, [], blobs=[*good_blobs[:-1], evil, good_blobs[-1]])
    assert img["layers"][-2] == digest_of(evil)
    push_layers(sandbox, layout, img["layers"])
    env_id = create_image_env(sandbox, img, config)
    res = sandbox.invoke(env_id, b"{}", timeout_s=10)
    assert "error" not in res, res
    for victim in victims.values():
        assert os.listdir(victim) == [], victim
    with open(victim_file) as f:
        assert f.read() == "host data\n"
    sandbox.destroy(env_id)


def test_a_cached_layer_changed_on_the_host_stops_its_environments(
        sandbox: Sandbox, base: list[bytes], tmp_path: os.PathLike[str]) -> None:
    """Image layers are measured at unpack (not re-hashed per create: images are large);
    the periodic re-measure hashes them and stops every environment on a changed one."""
    layout = os.path.join(tmp_path, "img")
    img = lambda_image(layout, HANDLER, base=base)
    push_layers(sandbox, layout, img["layers"])
    env_id = create_image_env(sandbox, img, _config(layout, img))
    planted = os.path.join(sandbox.agent.images.layer_dir(img["layers"][-1]), "planted.py")
    before = sandbox.agent.counters["attestation_failures"]
    with open(planted, "w") as f:
        f.write("x = 1\n")
    try:
        sandbox._run(sandbox.agent.remeasure())
        assert env_id not in sandbox.agent.envs
        assert sandbox.agent.counters["attestation_failures"] > before
    finally:
        os.unlink(planted)


@pytest.mark.slow
def test_a_self_contained_python_image_runs_its_own_interpreter(
        sandbox: Sandbox, tmp_path: os.PathLike[str]) -> None:
    """Debian's python3.11 and its standard library inside the image (not the guest agent's
    interpreter): ENTRYPOINT /usr/bin/python3.11 -m awslambdaric."""
    import shutil

    from tests.oci_images import debian_python_layers, image_layout, layer_tar

    if not os.path.exists("/usr/bin/python3.11") or shutil.which("ldd") is None:
        pytest.skip("Debian's python3.11 is not installed")
    layout = os.path.join(tmp_path, "img")
    handler = ("import sys\n"
               "def handler(event, context):\n"
               "    return {'exe': sys.executable, 'prefix': sys.prefix,\n"
               "            'stdlib': __import__('json').__file__}\n")
    config = {"Entrypoint": ["/usr/bin/python3.11", "-m", "awslambdaric"],
              "Cmd": ["app.handler"], "WorkingDir": "/var/task",
              "Env": ["PATH=/usr/bin:/bin", "PYTHONPATH=/opt/ric:/var/task"]}
    img = image_layout(layout, [], config_doc=config,
                       blobs=[*debian_python_layers(),
                              layer_tar({"var/task/app.py": handler.encode()})])
    push_layers(sandbox, layout, img["layers"])
    env_id = create_image_env(sandbox, img, config)
    res = sandbox.invoke(env_id, b"{}", timeout_s=20)
    out = json.loads(res["payload"])
    assert out == {"exe": "/usr/bin/python3.11", "prefix": "/usr",
                   "stdlib": "/usr/lib/python3.11/json/__init__.py"}, res.get("logs", b"")[-3000:].decode(errors="replace")
    sandbox.destroy(env_id)
