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


class EvictingAgent(FakeAgent):
    """``create_env`` as the agent answers it (the image's layers held, or LayerMissing); the
    cache forgets ``evict`` right after its stream ends — the bounded cache making room for
    another image's layer in between — at most ``times`` times."""

    def __init__(self, cache: LayerCache, evict: str, times: int) -> None:
        super().__init__(cache)
        self.evict, self.times = evict, times
        self.streams: dict[str, int] = {}
        self.created: list[list[str]] = []

    async def call(self, op: str, body: dict[str, Any], timeout_s: float) -> Any:
        await asyncio.sleep(0)
        if op == "create_env":
            dirs = self.cache.acquire(body["env_id"], body["image"]["layers"])
            self.created.append(dirs)
            return {"pid": 1}
        reply = await super().call(op, body, timeout_s)
        if body["last"]:
            self.streams[body["digest"]] = self.streams.get(body["digest"], 0) + 1
            if body["digest"] == self.evict and self.times:
                self.times -= 1
                self.cache.drop(body["digest"])
        return reply


def _create(tmp_path: Any, times: int) -> tuple[Any, EvictingAgent, list[str]]:
    from cellcloud.core.invoke import CreateEnv
    from cellcloud.frontend.invoker import Invoker
    from cellcloud.frontend.store import FunctionRecord
    from cellcloud.transport import OpError, RemoteError

    limits = Limits(registry_chunk_bytes_max=4096)
    blobs = {}
    for _ in range(2):
        blob = _layer()
        blobs["sha256:" + hashlib.sha256(blob).hexdigest()] = blob
    digests = list(blobs)
    agent = EvictingAgent(LayerCache(str(tmp_path), limits), evict=digests[0], times=times)

    async def call_agent(client: EvictingAgent, op: str, body: dict[str, Any], t: float) -> Any:
        try:
            return await client.call(op, body, t)
        except OpError as e:  # as the transport delivers an agent's error
            raise RemoteError(e.type, e.message, e.data) from None

    store = SimpleNamespace(
        blob_size=lambda account, repo, d: len(blobs[d]),
        blob_read=lambda account, d, off, n: blobs[d][off:off + n])
    cell = SimpleNamespace(catalog=SimpleNamespace(registry=store), limits=limits,
                           region="cc-local-1", agents={"agent-1": agent},
                           stream_for=lambda env_id, version: f"2026/01/01/[{version}]{env_id}")
    invoker = SimpleNamespace(cell=cell, call_agent=call_agent)
    cell.invoker = invoker
    rec = FunctionRecord(
        account="123456789012", name="app", runtime="", handler="", code_sha256="0" * 64,
        code_size=1, package_type="Image",
        image={"uri": "u", "repo": "team/app", "digest": "sha256:" + "1" * 64,
               "layers": digests, "entrypoint": ["/bin/app"], "cmd": [], "workdir": "",
               "env": {}})
    ins = CreateEnv("env-1", "agent-1", rec.key, None)
    result = asyncio.run(Invoker._create_call(invoker, rec, ins))  # type: ignore[arg-type]
    return result, agent, digests


def test_a_layer_evicted_between_its_stream_and_the_create_is_streamed_again(
        tmp_path: Any) -> None:
    (failure, detail), agent, digests = _create(tmp_path, times=1)
    assert failure is None, detail
    assert agent.streams == {digests[0]: 2, digests[1]: 1}
    assert len(agent.created) == 1 and all(os.path.isdir(d) for d in agent.created[0])


def test_a_layer_that_keeps_being_evicted_fails_the_create_after_the_limit(
        tmp_path: Any) -> None:
    (failure, detail), agent, digests = _create(tmp_path, times=10)
    assert failure == "error" and digests[0] in detail, detail
    assert agent.streams[digests[0]] == Limits().image_layer_pushes_per_create_max
    assert agent.created == []
