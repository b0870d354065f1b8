"""Encrypted by default: every internal link of a region is mutual TLS with role checks."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cellcloud import transport
from cellcloud.security import pki
from cellcloud.transport import Client, RemoteError, TransportError

from .conftest import Region

pytestmark = pytest.mark.integration


def _call(host: str, port: int, op: str, **client_kw: Any) -> Any:
    async def main() -> Any:
        c = Client(host, port, **client_kw)
        try:
            return await c.call(op, None, timeout_s=5)
        finally:
            await c.close()

    return asyncio.run(main())


def test_region_links_are_mtls_with_role_checks(region: Region) -> None:
    doc = region.region_json()
    assert doc["insecure"] is False
    comps: Any = doc["components"]
    fe, agent = comps["cell-1-frontend"], comps["cell-1-agent-0"]
    # Plain text reaches nothing.
    for c in (fe, agent):
        with pytest.raises(TransportError):
            _call(c["host"], c["port"], "status")
    # A certificate from the region CA, but with a role these servers do not accept.
    cfg = pki.tls_config(region.state_dir, "cc-local-1", "router", "region", "test-router")
    ctx = cfg.client_context()
    cfg_agent = pki.tls_config(region.state_dir, "cc-local-1", "agent", "cell-1", "test-agent")
    with pytest.raises(TransportError):
        _call(fe["host"], fe["port"], "status", ssl_context=cfg_agent.client_context())
    # A router reaches an agent for leased invocations only (issue #13): nothing else.
    with pytest.raises(RemoteError) as e:
        _call(agent["host"], agent["port"], "status", ssl_context=ctx,
              peer_check=pki.peer_check("cc-local-1", {"agent"}))
    assert e.value.type == "Forbidden"
    # The right role gets in: a router may call a frontend.
    st = _call(fe["host"], fe["port"], "status", ssl_context=ctx,
               peer_check=pki.peer_check("cc-local-1", {"frontend"}))
    assert st["cell_id"] == "cell-1"
    # A certificate from another CA is refused at the handshake.
    other = pki.tls_config(region.state_dir + "-elsewhere", "cc-local-1", "frontend", "cell-1",
                           "intruder")
    with pytest.raises(TransportError):
        _call(agent["host"], agent["port"], "status", ssl_context=other.client_context())
    assert transport.mtls_role() is None  # this test process never switched itself over
