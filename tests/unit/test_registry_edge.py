"""The router's registry edge with a fake cell: a blob upload crosses in bounded appends and a
blob download in bounded reads, never whole; auth and body caps come before the body."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from typing import Any

from cellcloud.core.cellmap import CellMap
from cellcloud.core.limits import Limits
from cellcloud.registry import core
from cellcloud.registry.edge import RegistryEdge, RegistryKey

ACCOUNT = "123456789012"
LIM = Limits(registry_chunk_bytes_max=1024 * 1024)


class FakeCell:
    def __init__(self, blob: bytes = b"") -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.received = bytearray()
        self.blob = blob

    async def call(self, op: str, body: dict[str, Any], *, timeout_s: float) -> Any:
        self.calls.append((op, body))
        if op == "registry" and body["k"] == "upload_start":
            return {"s": 202, "h": {"docker-upload-uuid": "u-1",
                                    "location": "/v2/team/app/blobs/uploads/u-1"}, "b": b""}
        if op == "registry_append":
            self.received += body["d"]
            return {"s": 202, "h": {}, "b": b"", "offset": len(self.received)}
        if op == "registry_commit":
            ok = body["digest"] == "sha256:" + hashlib.sha256(self.received).hexdigest()
            return {"s": 201 if ok else 400, "h": {}, "b": b""}
        if op == "registry" and body["k"] == "blob":
            return {"s": 200, "h": {"docker-content-digest": body["r"]}, "b": b"",
                    "size": len(self.blob)}
        if op == "registry_read":
            return {"s": 200, "d": self.blob[body["o"]:body["o"] + body["l"]]}
        raise AssertionError(op)


class FakeRouter:
    def __init__(self, cell: FakeCell) -> None:
        self.cell_map = CellMap.from_wire({"version": 1, "cells": {"c1": ["127.0.0.1", 1]},
                                           "assignments": {}, "overrides": {}})
        self.cell = cell

    async def call_cell(self, account: str, op: str, body: Any, timeout_s: float) -> Any:
        assert self.cell_map.cell_for(account).cell_id == "c1"
        return await self.cell.call(op, body, timeout_s=timeout_s)


def edge(tmp_path: Any, cell: FakeCell) -> tuple[RegistryEdge, str]:
    key_file = os.path.join(str(tmp_path), "registry.key")
    with open(key_file, "w") as f:
        f.write("ab" * 32)
    key = RegistryKey(key_file)
    pw, _ = core.make_password(key.key, ACCOUNT, int(time.time()), 3600)
    auth = "Basic " + base64.b64encode(f"AWS:{pw}".encode()).decode()
    return RegistryEdge(FakeRouter(cell), key, LIM), auth


def run(e: RegistryEdge, method: str, path: str, query: str, headers: dict[str, str],
        pieces: list[bytes]) -> tuple[int, dict[str, str], bytes, int]:
    msgs = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1}
            for i, p in enumerate(pieces)] or [{"type": "http.request", "body": b""}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return msgs.pop(0) if msgs else {"type": "http.disconnect"}

    async def send(m: dict[str, Any]) -> None:
        sent.append(m)

    scope = {"type": "http", "method": method, "path": path,
             "query_string": query.encode(),
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(e.serve(scope, receive, send))
    head = sent[0]
    bodies = [m for m in sent[1:]]
    return (head["status"], {k.decode(): v.decode() for k, v in head["headers"]},
            b"".join(m["body"] for m in bodies), len(msgs))


def test_upload_crosses_in_bounded_appends(tmp_path: Any) -> None:
    cell = FakeCell()
    e, auth = edge(tmp_path, cell)
    data = os.urandom(3 * 1024 * 1024 + 12345)
    pieces = [data[i:i + 300_000] for i in range(0, len(data), 300_000)]
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    status, _, _, _ = run(e, "POST", "/v2/team/app/blobs/uploads/", f"digest={d}",
                          {"authorization": auth, "content-length": str(len(data))}, pieces)
    assert status == 201
    appends = [b for op, b in cell.calls if op == "registry_append"]
    assert len(appends) == 4
    assert all(len(a["d"]) <= LIM.registry_chunk_bytes_max for a in appends)
    assert bytes(cell.received) == data
    assert cell.calls[-1][0] == "registry_commit"


def test_download_streams_in_bounded_reads(tmp_path: Any) -> None:
    blob = os.urandom(2 * 1024 * 1024 + 7)
    cell = FakeCell(blob)
    e, auth = edge(tmp_path, cell)
    d = "sha256:" + hashlib.sha256(blob).hexdigest()
    status, headers, body, _ = run(e, "GET", f"/v2/team/app/blobs/{d}", "",
                                   {"authorization": auth}, [])
    assert status == 200 and body == blob and headers["content-length"] == str(len(blob))
    reads = [b for op, b in cell.calls if op == "registry_read"]
    assert len(reads) == 3 and all(r["l"] <= LIM.registry_chunk_bytes_max for r in reads)


def test_no_token_is_a_challenge_before_the_body(tmp_path: Any) -> None:
    cell = FakeCell()
    e, _ = edge(tmp_path, cell)
    status, headers, body, left = run(e, "PUT", "/v2/team/app/manifests/v1", "",
                                      {"content-length": "3"}, [b"abc"])
    assert status == 401 and headers["www-authenticate"].startswith("Basic realm=")
    assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    assert cell.calls == []


def test_huge_manifest_refused_on_declared_length(tmp_path: Any) -> None:
    cell = FakeCell()
    e, auth = edge(tmp_path, cell)
    size = LIM.registry_manifest_bytes_max + 1
    status, headers, body, _ = run(e, "PUT", "/v2/team/app/manifests/v1", "",
                                   {"authorization": auth, "content-length": str(size)},
                                   [b"x"])
    assert status == 413 and json.loads(body)["errors"][0]["code"] == "MANIFEST_INVALID"
    assert cell.calls == []
