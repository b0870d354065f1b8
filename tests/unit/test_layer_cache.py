"""The agent's bounded layer cache (agent/images.py LayerCache): layers held by environments
stay, the least recently used others go once the cache is over its limit, eviction and puts
running in threads never leave a held layer missing, and a restarted agent knows its layers."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
import time
from typing import Any

import pytest

from cellcloud.agent.images import LayerCache
from cellcloud.core.limits import Limits
from cellcloud.transport import OpError


def _layer(size: int, seed: int) -> tuple[str, bytes]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        data = hashlib.sha256(str(seed).encode()).digest() * (size // 32)
        info = tarfile.TarInfo(f"f{seed}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    blob = raw.getvalue()
    return "sha256:" + hashlib.sha256(blob).hexdigest(), blob


def _put(cache: LayerCache, digest: str, blob: bytes) -> None:
    assert cache.put(digest, 0, blob, True)["have"]


def _cache(tmp: Any, budget: int) -> LayerCache:
    return LayerCache(str(tmp), Limits(agent_layer_cache_bytes_max=budget))


def test_unused_layers_go_least_recently_used_first(tmp_path: Any) -> None:
    cache = _cache(tmp_path, 25_000)  # room for two 10 kB layers
    a, b, c = (_layer(10_000, i) for i in range(3))
    _put(cache, *a)
    _put(cache, *b)
    cache.acquire("env-1", [a[0]])  # a used more recently than b
    cache.release("env-1")
    _put(cache, *c)
    assert cache.have(a[0]) and cache.have(c[0]) and not cache.have(b[0])
    assert not os.path.exists(cache.layer_dir(b[0]))
    assert not os.path.exists(cache.layer_dir(b[0]) + ".size")
    s = cache.statistics()
    assert s["cached"] == 2 and s["layers_evicted"] == 1 and s["bytes"] <= 25_000


def test_a_held_layer_is_never_evicted_and_goes_once_released(tmp_path: Any) -> None:
    cache = _cache(tmp_path, 15_000)  # room for one
    a, b = _layer(10_000, 1), _layer(10_000, 2)
    _put(cache, *a)
    dirs = cache.acquire("env-1", [a[0]])
    _put(cache, *b)  # the new one is protected, a is held: both stay, over the limit
    assert cache.have(a[0]) and cache.have(b[0]) and os.path.isdir(dirs[0])
    assert cache.statistics()["over_bytes"] > 0
    cache.release("env-1")  # now a may go (b was used more recently)
    assert not cache.have(a[0]) and cache.have(b[0])
    assert cache.statistics()["over_bytes"] == 0
    cache.release("env-1")  # a second release of the same environment does nothing


def test_acquire_holds_all_layers_or_none(tmp_path: Any) -> None:
    cache = _cache(tmp_path, 15_000)
    a, b = _layer(10_000, 1), _layer(10_000, 2)
    _put(cache, *a)
    with pytest.raises(OpError) as e:
        cache.acquire("env-1", [a[0], b[0]])
    assert e.value.type == "LayerMissing" and e.value.data["digest"] == b[0]
    _put(cache, *b)  # a was not held by the failed acquire: it may go
    assert not cache.have(a[0])


def test_a_restarted_agent_knows_its_layers_sizes_and_limit(tmp_path: Any) -> None:
    cache = _cache(tmp_path, 100_000)
    layers = [_layer(10_000, i) for i in range(3)]
    for layer in layers:
        _put(cache, *layer)
    os.unlink(cache.layer_dir(layers[0][0]) + ".size")  # a layer from before sizes
    again = _cache(tmp_path, 25_000)  # restarted with a smaller limit: trimmed at start
    s = again.statistics()
    assert s["cached"] == 2 and s["bytes"] <= 25_000
    assert sum(again.have(d) for d, _ in layers) == 2


def test_eviction_in_threads_never_takes_a_held_layer(tmp_path: Any) -> None:
    """Puts (each unpacking and evicting in its own thread, as the agent runs them) race with
    creates acquiring and releasing layers: a held layer's directory is always there."""
    cache = _cache(tmp_path, 30_000)  # three of the 12 layers fit
    layers = [_layer(10_000, i) for i in range(12)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def pusher(mine: list[tuple[str, bytes]]) -> None:
        try:
            for _ in range(5):
                for digest, blob in mine:
                    cache.put(digest, 0, blob, True)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def creator(n: int) -> None:
        env = 0
        try:
            while not stop.is_set():
                env += 1
                i = (env * 7 + n) % len(layers)
                digest = layers[i][0]
                try:
                    dirs = cache.acquire(f"env-{n}-{env}", [digest])
                except OpError as e:
                    assert e.type == "LayerMissing"
                    continue
                assert os.path.isdir(dirs[0]), "a held layer was evicted"
                assert os.path.exists(os.path.join(dirs[0], f"f{i}"))
                cache.release(f"env-{n}-{env}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    pushers = [threading.Thread(target=pusher, args=(layers[i::3],)) for i in range(3)]
    creators = [threading.Thread(target=creator, args=(n,)) for n in range(2)]
    for t in pushers + creators:
        t.start()
    for t in pushers:
        t.join(120)
    stop.set()
    for t in creators:
        t.join(120)
    assert not errors, errors
    s = cache.statistics()
    assert s["in_use"] == 0 and s["bytes"] <= 30_000 and s["layers_evicted"] > 0
    # Trees evicted on a release are removed by a thread of their own: wait for them.
    deadline = time.monotonic() + 60
    while [e for e in os.listdir(cache.layers) if ".tmp-" in e] and time.monotonic() < deadline:
        time.sleep(0.05)  # polling a condition, bounded
    assert [e for e in os.listdir(cache.layers) if ".tmp-" in e] == []


def test_an_image_create_that_fails_holds_nothing(tmp_path: Any) -> None:
    """The agent's create_env holds the image's layers while it creates the environment; a
    create refused after the hold (here: the image unpacks over Lambda's 10 GB, scaled down)
    gives them back, so the cache may evict them later."""
    import asyncio

    from tests.unit.test_agent_bundles import new_agent

    agent = new_agent(str(tmp_path))
    agent.images = LayerCache(str(tmp_path), Limits(registry_image_bytes_max=15_000))
    a, b = _layer(10_000, 1), _layer(10_000, 2)
    for layer in (a, b):
        _put(agent.images, *layer)
    body = {"env_id": "env-1", "function_key": "k", "bundle_sha256": "",
            "function": {"name": "f", "arn": "arn:aws:lambda:cc-local-1:1:function:f",
                         "handler": "", "runtime": "", "memory_mb": 128, "timeout_s": 3},
            "image": {"digest": "sha256:" + "1" * 64, "layers": [a[0], b[0]],
                      "entrypoint": ["/bin/app"], "cmd": [], "workdir": "", "env": {}}}
    with pytest.raises(OpError) as e:
        asyncio.run(agent.create_env(body))
    assert e.value.type == "ImageTooLarge"
    assert agent.images.statistics()["in_use"] == 0
    body["image"]["layers"] = [a[0], "sha256:" + "2" * 64]
    with pytest.raises(OpError) as e:
        asyncio.run(agent.create_env(body))
    assert e.value.type == "LayerMissing" and agent.images.statistics()["in_use"] == 0
