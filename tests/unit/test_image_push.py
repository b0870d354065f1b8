"""The frontend's layer stream to an agent (frontend/image_functions.push_layer): bounded
chunks, and creates racing for the same new layer on one agent stream it once."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
from types import SimpleNamespace
from typing import Any

from cellcloud.agent.images import LayerCache
from cellcloud.core.limits import Limits
from cellcloud.frontend import image_functions


def _layer() -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        data = os.urandom(2000)
        info = tarfile.TarInfo("f")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


class FakeAgent:
    """An agent's image_blob op over a real LayerCache; each call yields to the loop first,
    as a real call over the transport does."""

    def __init__(self, cache: LayerCache) -> None:
        self.cache = cache
        self.chunks: list[int] = []

    async def call(self, op: str, body: dict[str, Any], timeout_s: float) -> Any:
        assert op == "image_blob"
        await asyncio.sleep(0)
        self.chunks.append(len(body["data"]))
        return self.cache.put(body["digest"], body["offset"], body["data"], body["last"])


def test_racing_creates_stream_a_layer_once_in_bounded_chunks(tmp_path: Any) -> None:
    limits = Limits(registry_chunk_bytes_max=512)
    blob = _layer()
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()

    async def call_agent(client: FakeAgent, op: str, body: dict[str, Any], t: float) -> Any:
        return await client.call(op, body, t)

    store = SimpleNamespace(
        blob_size=lambda account, repo, d: len(blob),
        blob_read=lambda account, d, off, n: blob[off:off + min(n, 512)])
    cell = SimpleNamespace(catalog=SimpleNamespace(registry=store), limits=limits,
                           invoker=SimpleNamespace(call_agent=call_agent))
    rec = SimpleNamespace(account="1", image={"layers": [digest], "repo": "r", "uri": "u"})
    agent = FakeAgent(LayerCache(str(tmp_path), limits))

    async def main() -> None:
        await asyncio.gather(*(image_functions.push_layer(cell, agent, rec, digest, 5)  # type: ignore[arg-type]
                               for _ in range(3)))

    asyncio.run(main())
    assert agent.cache.have(digest)
    assert max(agent.chunks) <= 512
    full = -(-len(blob) // 512)
    assert len(agent.chunks) <= full + 2  # one stream, plus one "have" probe per waiter
