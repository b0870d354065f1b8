import asyncio
import datetime
import os
from typing import Any

import pytest

from cellcloud.security import pki
from cellcloud.transport import Client, RemoteError, Server, TransportError


def _configs(tmp: str) -> dict[str, pki.TlsConfig]:
    return {role: pki.tls_config(tmp, "cc-local-1", role, "cell-1", f"{role}-x")
            for role in ("agent", "frontend", "router", "dispatcher")}


def test_certificates_name_role_cell_and_region(tmp_path: Any) -> None:
    cfg = _configs(str(tmp_path))["agent"]
    from cryptography import x509

    with open(cfg.cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    uris = cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == ["urn:cellcloud:cc-local-1:agent:cell-1"]
    assert oct(os.stat(cfg.key_path).st_mode & 0o777) == "0o600"
    assert not pki.needs_rotation(cfg.cert_path)
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=29)
    assert pki.needs_rotation(cfg.cert_path, now=soon)


def test_mtls_role_checks_on_both_ends(tmp_path: Any) -> None:
    cfgs = _configs(str(tmp_path))

    async def echo(body: Any) -> Any:
        return body

    async def main() -> None:
        agent_srv = Server({"echo": echo},
                           peer_check=pki.peer_check("cc-local-1", pki.ACCEPTS["agent"]))
        agent_srv.ops_for_role = {client: ops for (server, client), ops
                                  in pki.OPS_ALLOWED.items() if server == "agent"}
        _, port = await agent_srv.listen_tcp("127.0.0.1", 0,
                                             ssl_context=cfgs["agent"].server_context())
        # A frontend may call an agent, and checks it is talking to an agent.
        fe = Client("127.0.0.1", port, ssl_context=cfgs["frontend"].client_context(),
                    peer_check=pki.peer_check("cc-local-1", {"agent"}))
        assert await fe.call("echo", "hi", timeout_s=5) == "hi"
        # A router reaches an agent for leased_invoke only (pki.OPS_ALLOWED): "echo" is
        # answered Forbidden, and the handler never ran.
        rt = Client("127.0.0.1", port, ssl_context=cfgs["router"].client_context())
        with pytest.raises(RemoteError) as e:
            await rt.call("echo", "hi", timeout_s=5)
        assert e.value.type == "Forbidden" and agent_srv.stats.forbidden_ops == 1
        # A dispatcher may not: the agent drops the connection.
        dp = Client("127.0.0.1", port, ssl_context=cfgs["dispatcher"].client_context())
        with pytest.raises(TransportError):
            await dp.call("echo", "hi", timeout_s=5)
        assert agent_srv.stats.rejected_peers == 1
        # A client expecting a frontend refuses to talk to this agent.
        wrong = Client("127.0.0.1", port, ssl_context=cfgs["frontend"].client_context(),
                       peer_check=pki.peer_check("cc-local-1", {"frontend"}))
        with pytest.raises(TransportError):
            await wrong.call("echo", "hi", timeout_s=5)
        # Plain text gets nowhere.
        plain = Client("127.0.0.1", port)
        with pytest.raises(TransportError):
            await plain.call("echo", "hi", timeout_s=2)
        for c in (fe, rt, dp, wrong, plain):
            await c.close()
        await agent_srv.close()

    asyncio.run(main())


def test_rotation_keeps_open_connections_and_new_ones_get_the_new_cert(tmp_path: Any) -> None:
    cfgs = _configs(str(tmp_path))

    async def echo(body: Any) -> Any:
        return body

    async def main() -> None:
        ctx = cfgs["agent"].server_context()
        srv = Server({"echo": echo}, peer_check=pki.peer_check("cc-local-1", {"frontend"}))
        _, port = await srv.listen_tcp("127.0.0.1", 0, ssl_context=ctx)
        fe = Client("127.0.0.1", port, ssl_context=cfgs["frontend"].client_context())
        assert await fe.call("echo", 1, timeout_s=5) == 1
        ca = pki.CertificateAuthority.ensure(os.path.join(str(tmp_path), "pki"), "cc-local-1")
        ca.issue(pki.Identity("cc-local-1", "agent", "cell-1"),
                 os.path.dirname(cfgs["agent"].cert_path))
        cfgs["agent"].reload(ctx)
        assert await fe.call("echo", 2, timeout_s=5) == 2  # the open connection is untouched
        fe2 = Client("127.0.0.1", port, ssl_context=cfgs["frontend"].client_context())
        assert await fe2.call("echo", 3, timeout_s=5) == 3
        await fe.close()
        await fe2.close()
        await srv.close()

    asyncio.run(main())
