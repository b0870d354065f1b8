"""A storage server under mutual TLS (``--pki-dir``): a volume client is answered, an agent's
certificate is refused (passive communication: agents call nobody), and a plain connection
gets nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from cellcloud.security import pki
from cellcloud.store.colony import wait_ready
from cellcloud.transport import Client, TransportError
from cellcloud.volumes.core import VolumeConfig

pytestmark = pytest.mark.integration

REGION = "cc-local-1"


def test_storage_server_speaks_mtls_and_accepts_only_volume_clients(tmp_path) -> None:
    pki_dir = str(tmp_path / "pki-root")
    volume = pki.tls_config(pki_dir, REGION, "volume", "host", "h1")  # creates the CA first
    agent = pki.tls_config(pki_dir, REGION, "agent", "cell-1", "a1")
    p = subprocess.Popen(
        [sys.executable, "-m", "cellcloud.volumes", "serve", "--id", "s0", "--state-dir",
         str(tmp_path / "s0"), "--pki-dir", pki_dir, "--region", REGION],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, host, port = wait_ready(p).split()
        cfg = VolumeConfig("v", 1 << 30, 1, ("s0", "s1", "s2"), "s0")
        req = {"op": "fence", "volume": "v", "epoch": 1, "config": cfg.to_dict()}

        async def main() -> None:
            ok = Client(host, int(port), ssl_context=volume.client_context(),
                        peer_check=pki.peer_check(REGION, {"storage"}))
            assert (await ok.call("volume", req, timeout_s=30))["status"] == "ok"
            await ok.close()
            bad = Client(host, int(port), ssl_context=agent.client_context())
            with pytest.raises(TransportError):
                await bad.call("volume", req, timeout_s=30)
            await bad.close()
            plain = Client(host, int(port))
            with pytest.raises(TransportError):
                await plain.call("volume", req, timeout_s=3)
            await plain.close()

        asyncio.run(main())
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
