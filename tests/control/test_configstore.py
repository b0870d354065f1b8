"""One contract, every configuration store: SQLite in a temp dir, and etcd — a real
``etcd`` process (Debian's ``etcd-server``) on loopback, started and stopped by a fixture."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cellcloud.control.configstore import (
    ConfigStore,
    ConfigStoreError,
    ConfigStoreUnavailable,
    EtcdConfigStore,
    SqliteConfigStore,
    config_key_bytes_max,
    config_value_bytes_max,
    open_config_store,
    prefix_end,
)
from cellcloud.control.state import RegionState

ETCD = shutil.which("etcd")
etcd_ready_deadline_s = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if ETCD is None:
        pytest.skip("etcd is not installed (apt-get install -y etcd-server)")
    data = tmp_path_factory.mktemp("etcd")
    client, peer = _free_port(), _free_port()
    curl, purl = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    log = open(data / "etcd.log", "wb")
    proc = subprocess.Popen(
        [ETCD, "--name", "test", "--data-dir", str(data / "data"),
         "--listen-client-urls", curl, "--advertise-client-urls", curl,
         "--listen-peer-urls", purl, "--initial-advertise-peer-urls", purl,
         "--initial-cluster", f"test={purl}", "--initial-cluster-state", "new"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + etcd_ready_deadline_s
        while True:  # poll the health endpoint until it says so, within a bounded deadline
            if proc.poll() is not None:
                pytest.fail(f"etcd exited {proc.returncode}: "
                            f"{(data / 'etcd.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(curl + "/health", timeout=1) as r:
                    if b'"health":"true"' in r.read():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"etcd not healthy in {etcd_ready_deadline_s}s")
            time.sleep(0.05)
        yield curl
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


_etcd_prefix_counter = iter(range(1_000_000))


@pytest.fixture(scope="module")
def colony_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real 3-node Physalia colony on loopback (store node processes)."""
    from cellcloud.store.colony import Colony, spawn_node, wait_ready

    d = tmp_path_factory.mktemp("colony")
    colony = Colony.local(3, 0)
    for spec in colony.nodes.values():
        spec.port = _free_port()
    path = str(d / "colony.json")
    colony.save(path)
    procs = []
    try:
        for n in colony.node_ids():
            p = spawn_node(path, n, str(d / n))
            procs.append(p)
            wait_ready(p)
        yield path
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.fixture(params=["sqlite", "etcd", "physalia"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[ConfigStore, str]]:
    """The store and a key prefix private to this test (etcd and the colony are shared)."""
    if request.param == "sqlite":
        s: ConfigStore = SqliteConfigStore(str(tmp_path / "config.db"))
        yield s, "t/"
        asyncio.run(s.close())
    elif request.param == "physalia":
        colony = request.getfixturevalue("colony_file")
        yield open_config_store({"kind": "physalia", "colony": colony}), \
            f"test{next(_etcd_prefix_counter)}/"
    else:
        url = request.getfixturevalue("etcd_url")
        yield EtcdConfigStore(url), f"test{next(_etcd_prefix_counter)}/"


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_put_get_revisions(store: tuple[ConfigStore, str]) -> None:
    s, p = store
    assert run(s.get(p + "a")) is None
    r1 = run(s.put(p + "a", b"one"))
    e = run(s.get(p + "a"))
    assert e is not None and e.value == b"one" and e.revision == r1 and e.key == p + "a"
    r2 = run(s.put(p + "a", b"two"))
    assert r2 > r1
    r3 = run(s.put(p + "b", b""))
    assert r3 > r2
    e = run(s.get(p + "b"))
    assert e is not None and e.value == b"" and e.revision == r3


def test_cas(store: tuple[ConfigStore, str]) -> None:
    s, p = store
    k = p + "state"
    r1 = run(s.cas(k, 0, b"v1"))  # 0: create only if absent
    assert r1 is not None
    assert run(s.cas(k, 0, b"again")) is None
    assert run(s.cas(k, r1 + 100, b"wrong")) is None
    r2 = run(s.cas(k, r1, b"v2"))
    assert r2 is not None and r2 > r1
    assert run(s.cas(k, r1, b"stale")) is None
    e = run(s.get(k))
    assert e is not None and (e.value, e.revision) == (b"v2", r2)


def test_concurrent_cas_only_one_wins(store: tuple[ConfigStore, str]) -> None:
    s, p = store
    k = p + "race"
    r = run(s.put(k, b"0"))

    async def race() -> list[int | None]:
        return list(await asyncio.gather(*(s.cas(k, r, str(i).encode()) for i in range(8))))

    results = run(race())
    assert sum(x is not None for x in results) == 1


def test_list_and_delete(store: tuple[ConfigStore, str]) -> None:
    s, p = store
    for k in ["b", "a", "a/x", "c\xff", "ab"]:
        run(s.put(p + k, k.encode()))
    run(s.put(p[:-1] + "0", b"outside"))  # shares the prefix without its slash
    got = run(s.list(p + "a"))
    assert [e.key for e in got] == [p + "a", p + "a/x", p + "ab"]
    assert [e.key for e in run(s.list(p))] == [p + k for k in ["a", "a/x", "ab", "b", "c\xff"]]
    assert run(s.delete(p + "a")) is True
    assert run(s.delete(p + "a")) is False
    assert run(s.get(p + "a")) is None
    r = run(s.cas(p + "a", 0, b"back"))  # re-created: a fresh, higher revision
    assert r is not None and r > max(e.revision for e in got)


def test_limits(store: tuple[ConfigStore, str]) -> None:
    s, p = store
    with pytest.raises(ConfigStoreError, match="config_key_bytes_max"):
        run(s.put(p + "k" * config_key_bytes_max, b""))
    with pytest.raises(ConfigStoreError, match="config_value_bytes_max"):
        run(s.put(p + "big", b"x" * (config_value_bytes_max + 1)))
    with pytest.raises(ConfigStoreError):
        run(s.put("", b""))
    assert run(s.get(p + "big")) is None


def test_region_state_saved_with_cas(store: tuple[ConfigStore, str]) -> None:
    s, p = store
    key = p + "region/state"
    state = RegionState()
    state.add_cell("cell-0", "127.0.0.1", 9000)
    state.assign_tenant("acct")
    rev = run(s.cas(key, 0, state.to_json()))
    assert rev is not None
    e = run(s.get(key))
    assert e is not None
    loaded = RegionState.from_json(e.value)
    assert loaded.cell_map().to_wire() == state.cell_map().to_wire()


def test_sqlite_is_durable_across_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "c.db")
    s = SqliteConfigStore(path)
    r = run(s.put("k", b"v"))
    run(s.close())
    s2 = open_config_store({"kind": "sqlite", "path": path})
    e = run(s2.get("k"))
    assert e is not None and e.revision == r
    assert run(s2.put("k2", b"")) > r  # the revision counter survives too
    assert s2._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # type: ignore[attr-defined]
    run(s2.close())


def test_etcd_unreachable_is_reported() -> None:
    s = EtcdConfigStore(f"http://127.0.0.1:{_free_port()}", timeout_ms=500)
    with pytest.raises(ConfigStoreUnavailable):
        run(s.get("k"))


def test_open_config_store_kinds() -> None:
    assert isinstance(open_config_store({"kind": "etcd", "url": "http://x"}), EtcdConfigStore)
    with pytest.raises(ConfigStoreError, match="unknown"):
        open_config_store({"kind": "zookeeper"})


def test_prefix_end() -> None:
    assert prefix_end(b"ab") == b"ac"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") is None
    assert prefix_end(b"") is None
