"""Attestation through the API and the CLI: get a nonce-bound document, verify it offline."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from tests.conftest import make_zip

from .conftest import Region

pytestmark = pytest.mark.integration

CODE = "def handler(e, c):\n    return open('/var/runtime/attestation.json').read()\n"


def test_attestation_round_trip(region: Region, tmp_path: object) -> None:
    import pathlib

    name = f"att-{uuid.uuid4().hex[:8]}"
    z = make_zip({"app.py": CODE})
    region.client.create_function(name, z, "app.handler")
    pushed = json.loads(region.client.invoke(name, {}).json())  # the one pushed at start
    assert pushed["nonce"] is None and pushed["function_arn"].endswith(name)
    d = pathlib.Path(str(tmp_path))
    (d / "code.zip").write_bytes(z)
    out = region.cli("attest", "get", name, "--nonce", "nonce-0123456789")
    (d / "doc.json").write_text(out.stdout)
    ok = region.cli("attest", "verify", str(d / "doc.json"), "--nonce", "nonce-0123456789",
                    "--bundle", str(d / "code.zip"))
    assert "valid" in ok.stdout and "bundle matches" in ok.stdout
    assert os.path.exists(os.path.join(region.state_dir, "pki", "ca.pem"))  # the region's CA
    # Someone else's code, or a replayed nonce, does not verify.
    (d / "other.zip").write_bytes(make_zip({"app.py": "def handler(e, c):\n    return 2\n"}))
    bad = region.cli("attest", "verify", str(d / "doc.json"), "--bundle", str(d / "other.zip"),
                     check=False)
    assert bad.returncode == 1 and "INVALID" in bad.stderr
    bad = region.cli("attest", "verify", str(d / "doc.json"), "--nonce", "another-nonce-000",
                     check=False)
    assert bad.returncode == 1
