"""The supervisor holds the router's public listening socket (issue #21): a busy port fails
`cellcloud up` before any process starts, with the reason."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import pytest

from cellcloud.region.supervisor import Supervisor


def test_a_busy_public_port_fails_the_start_before_anything_runs(tmp_path: Any) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    sup = Supervisor(str(tmp_path / "region"), cells=1, agents_per_cell=1, port=port,
                     insecure=True)
    try:
        with pytest.raises(RuntimeError, match=f"cannot listen on 127.0.0.1:{port}"):
            asyncio.run(sup.start())
        assert sup.components == []  # nothing was started
    finally:
        asyncio.run(sup.stop())
        busy.close()
    assert not os.path.exists(tmp_path / "region" / "region.json")
