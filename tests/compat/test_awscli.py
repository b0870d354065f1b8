"""The AWS CLI (awscli from PyPI), pointed at the region by `eval "$(cellcloud env)"`."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import make_zip
from tests.integration.conftest import Region

from .conftest import ROLE, SUM, new_name

pytestmark = pytest.mark.integration


def test_aws_cli_create_invoke_list_delete(region: Region, tmp_path: pathlib.Path) -> None:
    exports = subprocess.run([sys.executable, "-m", "cellcloud", "env", "--state-dir",
                              region.state_dir], capture_output=True, text=True, check=True,
                             timeout=60).stdout
    zip_path = tmp_path / "fn.zip"
    zip_path.write_bytes(make_zip({"app.py": SUM}))
    name = new_name("cli")
    aws = os.path.join(os.path.dirname(sys.executable), "aws")
    script = f"""
set -e
eval "$1"
{aws} lambda create-function --function-name {name} --runtime python3.11 --role {ROLE} \
    --handler app.handler --zip-file fileb://{zip_path} > {tmp_path}/create.json
{aws} lambda invoke --function-name {name} --payload '{{"a": 20, "b": 22}}' \
    {tmp_path}/out.json > {tmp_path}/invoke.json
{aws} lambda list-functions > {tmp_path}/list.json
{aws} lambda delete-function --function-name {name}
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["HOME"] = str(tmp_path)  # no ~/.aws of the machine's user
    subprocess.run(["bash", "-c", script, "bash", exports], check=True, timeout=120, env=env)
    assert json.loads((tmp_path / "create.json").read_text())["FunctionName"] == name
    assert json.loads((tmp_path / "invoke.json").read_text())["ExecutedVersion"] == "$LATEST"
    assert json.loads((tmp_path / "out.json").read_text()) == {"sum": 42}
    listed = json.loads((tmp_path / "list.json").read_text())["Functions"]
    assert name in [f["FunctionName"] for f in listed]
    assert region.cli("ls").stdout.count(name) == 0
