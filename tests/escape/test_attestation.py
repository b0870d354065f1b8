"""Attestation: measured code, signed documents pushed into environments, tamper detection."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from cellcloud.security import attestation
from cellcloud.transport import OpError

from .conftest import Sandbox

pytestmark = pytest.mark.integration

READ_DOC = "def handler(e, c):\n    return open('/var/runtime/attestation.json').read()\n"


def ca_pem(sb: Sandbox) -> bytes:
    with open(sb.agent.identity.ca_path, "rb") as f:
        return f.read()


def test_document_is_in_the_environment_and_verifies_offline(sandbox: Sandbox) -> None:
    env, res = sandbox.run(READ_DOC)
    doc = json.loads(json.loads(res["payload"]))
    sha, bundle = sandbox.bundle_dir(READ_DOC)
    m = attestation.verify(doc, ca_pem(sandbox),
                           expect={"bundle": attestation.measure_tree(bundle)})
    assert set(m) == {"runtime", "bundle", "layers", "config"} and doc["env_id"] == env
    # Any change to the document breaks the signature.
    forged = dict(doc, measurements=dict(doc["measurements"], bundle="0" * 64))
    with pytest.raises(attestation.AttestationError):
        attestation.verify(forged, ca_pem(sandbox))
    # A fresh document bound to a caller's nonce.
    fresh = sandbox._run(sandbox.agent.attest({"env_id": env, "nonce": "n0nce-1234"}))
    attestation.verify(fresh, ca_pem(sandbox), nonce="n0nce-1234")
    with pytest.raises(attestation.AttestationError):
        attestation.verify(fresh, ca_pem(sandbox), nonce="another-nonce")
    sandbox.destroy(env)


def test_a_tampered_bundle_is_refused_and_a_running_one_is_stopped(sandbox: Sandbox) -> None:
    code = "def handler(e, c):\n    return 'original'\n"
    env = sandbox.create(code)
    _, bundle = sandbox.bundle_dir(code)
    before = sandbox.agent.counters["attestation_failures"]
    with open(os.path.join(bundle, "app.py"), "a") as f:
        f.write("\n# tampered on disk\n")
    try:
        # The periodic re-measurement stops the environment that runs it ...
        sandbox._run(sandbox.agent.remeasure())
        assert env not in sandbox.agent.envs
        # ... and no new environment starts from it.
        with pytest.raises(OpError) as e:
            sandbox.create(code)
        assert e.value.type == "AttestationFailed"
        assert sandbox.agent.counters["attestation_failures"] >= before + 2
    finally:
        with open(os.path.join(bundle, "app.py"), "w") as f:
            f.write(code)


def test_agent_refuses_unknown_operations(sandbox: Sandbox) -> None:
    from cellcloud.transport import Client, RemoteError, Server

    async def main() -> tuple[str, int]:
        srv = Server(sandbox.agent.ops)
        _, port = await srv.listen_tcp("127.0.0.1", 0)
        c = Client("127.0.0.1", port)
        kinds = []
        for op in ("run_command", "shell", "read_file", "exec"):
            try:
                await c.call(op, {"cmd": "id"}, timeout_s=5)
            except RemoteError as e:
                kinds.append(e.type)
        await c.close()
        await srv.close()
        return kinds[0], srv.stats.unknown_ops

    kind, refused = asyncio.run(main())
    assert kind == "UnknownOperation" and refused == 4
    assert sorted(sandbox.agent.ops) == ["attest", "create_env", "destroy", "forget_bundles",
                                         "image_blob", "invoke", "lease_end", "lease_grant",
                                         "leased_invoke", "live_logs", "metrics", "status",
                                         "task_container_start", "task_container_stop",
                                         "task_create", "task_destroy", "task_exec",
                                         "task_poll"]
