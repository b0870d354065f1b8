"""Metrics labels stay bounded; the router's gathering filters by account (issue #16)."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cellcloud import transport
from cellcloud.frontend.metrics import OTHER, FrontendMetrics
from cellcloud.metrics import Pushed, process_registry
from cellcloud.router.metrics import gather
from cellcloud.security import pki


def _invocations(text: bytes) -> dict[tuple[str, str], float]:
    return {(s.labels["account"], s.labels["function"]): s.value
            for fam in text_string_to_metric_families(text.decode())
            for s in fam.samples if s.name == "cellcloud_invocations_total"}


def test_function_label_folds_beyond_the_cap() -> None:
    cap = 10
    m = FrontendMetrics("c1", cap)
    for i in range(500):
        acct = "111" if i % 2 else "222"
        m.invocations.labels(*m.labels(acct, f"f{i}")).inc()
    seen = _invocations(m.exposition())
    named = [k for k in seen if k[1] != OTHER]
    assert len(named) == cap
    assert seen[("111", OTHER)] + seen[("222", OTHER)] == 500 - cap
    assert sum(seen.values()) == 500
    # A function counted before the cap was reached keeps its own series.
    m.invocations.labels(*m.labels("222", "f0")).inc()
    assert _invocations(m.exposition())[("222", "f0")] == 2


def test_gather_filters_by_account_and_labels_cells() -> None:
    c1, c2 = FrontendMetrics("c1", 100), FrontendMetrics("c2", 100)
    c1.invocations.labels(*c1.labels("111", "a")).inc(3)
    c2.invocations.labels(*c2.labels("222", "b")).inc(4)
    sources = [({"cell": "c1", "component": "c1-frontend"}, c1.exposition()),
               ({"cell": "c2", "component": "c2-frontend"}, c2.exposition())]
    tenant = gather(sources, "222")
    assert _invocations(tenant) == {("222", "b"): 4}
    assert b"process_" not in tenant, "process metrics are the operator's"
    assert 'cell="c2"' in tenant.decode()
    whole = gather(sources, None)
    assert _invocations(whole) == {("111", "a"): 3, ("222", "b"): 4}
    assert b"process_" in whole

    # Samples of two processes stay apart by their component label (no duplicate series).
    assert len({(s.labels["cell"], s.labels["component"])
                for fam in text_string_to_metric_families(whole.decode())
                for s in fam.samples if s.name == "process_open_fds"}) == 2


def test_one_account_cannot_crowd_out_another() -> None:
    m = FrontendMetrics("c1", 100, functions_per_account_max=5)
    for i in range(50):
        m.invocations.labels(*m.labels("111", f"noisy{i}")).inc()
    m.invocations.labels(*m.labels("222", "quiet")).inc()
    seen = _invocations(m.exposition())
    assert len([k for k in seen if k[0] == "111" and k[1] != OTHER]) == 5
    assert seen[("111", OTHER)] == 45
    assert seen[("222", "quiet")] == 1, "another account still gets its own series"


def test_pushed_expositions_are_bounded_and_expire() -> None:
    from cellcloud.core.limits import DEFAULT_LIMITS
    p = Pushed(DEFAULT_LIMITS)
    p.put("control", b"a 1\n", now_ms=1_000)
    assert p.fresh(1_000 + DEFAULT_LIMITS.metrics_pushed_stale_ms) == {"control": b"a 1\n"}
    assert p.fresh(1_001 + DEFAULT_LIMITS.metrics_pushed_stale_ms) == {}
    with pytest.raises(ValueError):
        p.put("control", b"x" * (DEFAULT_LIMITS.metrics_pushed_bytes_max + 1), now_ms=0)
    with pytest.raises(ValueError):
        p.put(None, b"", now_ms=0)
    with pytest.raises(ValueError):  # a name its gatherer does not take
        Pushed(DEFAULT_LIMITS, names="control").put("router", b"", now_ms=0)
    for i in range(DEFAULT_LIMITS.metrics_pushers_max):
        p.put(f"d{i}", b"", now_ms=5)
    with pytest.raises(ValueError):
        p.put("one-more", b"", now_ms=5)
    p.put("one-more", b"", now_ms=10_000_000)  # the others went stale: room again


def _counts(registry: Any) -> dict[tuple[str, str], float]:
    from prometheus_client import generate_latest
    return {(s.name, s.labels["side"]): s.value
            for fam in text_string_to_metric_families(generate_latest(registry).decode())
            for s in fam.samples if s.name.startswith("cellcloud_tls_handshake")}


def test_tls_handshakes_counted_and_a_certless_client_refused(tmp_path: Any) -> None:
    """An mTLS server counts its handshakes; a client without a certificate is refused in the
    handshake, and that counts as a failure."""
    ca = pki.CertificateAuthority.ensure(str(tmp_path), "cc-test-1")
    assert ca is not None
    cfg = pki.tls_config(str(tmp_path), "cc-test-1", "agent", "cell-1", "a0")
    registry = process_registry()

    async def main() -> tuple[bool, str]:
        transport.enable_mtls(cfg, "agent")
        try:
            async def status(_: Any) -> dict[str, Any]:
                return {"ok": True}

            srv = transport.Server({"status": status})
            host, port = await srv.listen_tcp("127.0.0.1", 0)
            before = _counts(registry)
            # A frontend-role peer: handshake and call go through.
            fe = pki.tls_config(str(tmp_path), "cc-test-1", "frontend", "cell-1", "fe")
            client = transport.Client(host, port, ssl_context=fe.client_context(),
                                      server_hostname="localhost")
            ok = (await client.call("status", None, timeout_s=10))["ok"]
            await client.close()
            # No client certificate at all: the server's handshake fails.
            bare = ssl.create_default_context(cafile=cfg.ca_path)
            bare.check_hostname = False
            refused = ""
            try:
                reader, writer = await asyncio.open_connection(host, port, ssl=bare)
                writer.write(b"x")  # TLS 1.3: the server's verdict on us comes after ours
                got = await asyncio.wait_for(reader.read(1), 10)
                refused = "eof" if got == b"" else "answered"
                writer.close()
            except (ssl.SSLError, ConnectionError) as e:
                refused = type(e).__name__
            failures = ("cellcloud_tls_handshake_failures_total", "server")
            for _ in range(1000):  # the server finishes its half on its own turn: <= 10 s
                if _counts(registry)[failures] > before[failures]:
                    break
                await asyncio.sleep(0.01)
            await srv.close()
            after = _counts(registry)
            assert after[("cellcloud_tls_handshakes_total", "server")] == \
                before[("cellcloud_tls_handshakes_total", "server")] + 1
            assert after[("cellcloud_tls_handshake_failures_total", "server")] == \
                before[("cellcloud_tls_handshake_failures_total", "server")] + 1
            return ok, refused
        finally:
            transport.disable_mtls()

    ok, refused = asyncio.run(main())
    assert ok
    assert refused != "answered", refused


def test_config_store_requests_are_timed_by_op_and_outcome(tmp_path: Any) -> None:
    from prometheus_client import generate_latest

    from cellcloud.control.configstore import (
        ConfigStoreError,
        SqliteConfigStore,
        TimedConfigStore,
        config_key_bytes_max,
    )

    registry = process_registry()
    store = TimedConfigStore(SqliteConfigStore(str(tmp_path / "c.db")), "sqlite", registry)

    async def main() -> None:
        await store.put("k", b"v")
        assert (await store.get("k")) is not None
        with pytest.raises(ConfigStoreError):
            await store.put("x" * (config_key_bytes_max + 1), b"v")
        await store.close()

    asyncio.run(main())
    counts = {(s.labels["op"], s.labels["outcome"]): s.value
              for fam in text_string_to_metric_families(generate_latest(registry).decode())
              for s in fam.samples if s.name == "cellcloud_store_request_duration_seconds_count"}
    assert counts == {("put", "ok"): 1, ("get", "ok"): 1, ("put", "refused"): 1}
