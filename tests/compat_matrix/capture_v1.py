"""Captures version 1 of the internal wire shapes as JSON fixtures (fixtures/v1/*.json).

Run from the repository root (``PYTHONPATH=src python -m tests.compat_matrix.capture_v1``).
The fixtures were first written by this script on the code from before protocol versions
(commit b303740), so they are today's exact shapes; a later run must write the same files:
``test_matrix.py`` runs it into a temporary directory and compares.

- ``frontend.http.*``: what the router's ASGI app sends on its transport link to a cell
  frontend for a signed request, recorded raw on a loopback socket by a server that answers
  like a build from before negotiation (``UnknownOperation`` to anything but the calls it
  records), so a newer router shows what it speaks to an old frontend;
- ``frontend.http_reply``: the frontend's answer to a request (its own ``api.handle``);
- ``agent.*``: the agent's messages as the frontend's and the agent's code build them, in
  the version 1 dialect.

bytes are written as ``{"$bytes": "<base64>"}`` (JSON has none).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import sys
import tempfile
from typing import Any

import msgpack

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "v1")
ACCOUNT, KEY, SECRET = "111122223333", "AKIDCAPTUREV1EXAMPLE", "capture-secret"
TRACE = "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=0"


def to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            return base64.b64decode(value["$bytes"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


async def _router_frames() -> list[list[Any]]:
    """The frames a router sends to its cell's frontend for two signed requests."""
    from cellcloud.core.cellmap import CellEndpoint, CellMap
    from cellcloud.router.app import Router, Tenants
    from cellcloud.security import sigv4

    frames: list[list[Any]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await _serve(reader, writer, unpacker)

    async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     unpacker: msgpack.Unpacker) -> None:
        while data := await reader.read(65536):
            unpacker.feed(data)
            for frame in unpacker:
                _, call_id, op, _body = frame
                if op != "http":  # an old frontend: no such op
                    answer = [1, call_id, False, {"type": "UnknownOperation",
                                                  "message": repr(op)}]
                else:
                    frames.append(frame)
                    answer = [1, call_id, True, {"s": 200, "h": {"content-type":
                                                                 "application/json"}, "b": b"{}"}]
                writer.write(msgpack.packb(answer, use_bin_type=True))
        writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "tenants.json")
        with open(path, "w") as f:
            json.dump({"tenants": [{"name": "t", "account_id": ACCOUNT, "access_key_id": KEY,
                                    "secret_access_key": SECRET}]}, f)
        router = Router(CellMap(1, {"cell-1": CellEndpoint("cell-1", "127.0.0.1", port)}),
                        Tenants(path), leases=False)
        router._rng = random.Random(0)  # the trace's span ids: the same on every run
        for method, target, body in (
                ("POST", "/2015-03-31/functions/echo/invocations?Qualifier=live", b'{"k": 1}'),
                ("GET", "/2015-03-31/functions/", b"")):
            url = "http://127.0.0.1:9000" + target
            headers = sigv4.sign(method, url, {"host": "127.0.0.1:9000", "x-amzn-trace-id": TRACE},
                                 body,
                                 access_key_id=KEY, secret_access_key=SECRET,
                                 region=router.region)
            path_, _, query = target.partition("?")
            scope = {"type": "http", "method": method, "path": path_,
                     "raw_path": path_.encode(), "query_string": query.encode(),
                     "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
                     "scheme": "http"}
            sent: list[Any] = []
            chunks = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive(chunks: list[Any] = chunks) -> Any:
                return chunks.pop(0) if chunks else {"type": "http.disconnect"}

            async def send(msg: Any, sent: list[Any] = sent) -> None:
                sent.append(msg)

            await router(scope, receive, send)
            assert sent and sent[0]["status"] == 200, sent
        for c in router._clients.values():
            await c.close()
    srv.close()
    await srv.wait_closed()
    await asyncio.sleep(0)  # the handler sees the end of its stream
    return frames


def _agent_messages() -> dict[str, Any]:
    from cellcloud.core import messages as m

    try:  # after protocol versions: the version 1 dialect, as served to an old peer
        from cellcloud.core.protocols import reply_to_version
    except ImportError:  # the code these fixtures were first captured from
        def reply_to_version(protocol: str, op: str, version: int, doc: Any) -> Any:
            return doc

    spec = m.FunctionSpec(name="echo", arn="arn:aws:lambda:cc-local-1:111122223333:function:echo",
                          handler="app.handler", runtime="python3.12", memory_mb=128,
                          timeout_s=3, environment={"A": "b"})
    reply = m.InvokeReply(payload=b'{"ok": true}', function_error=None, logs=b"line\n",
                          duration_ms=1.5, max_rss_kb=1024)
    failed = m.InvokeReply(payload=b'{"errorType": "E"}', function_error="Unhandled",
                           env_alive=False)
    return {
        "agent.create_env": m.CreateEnvRequest(env_id="e-1", bundle_sha256="ab" * 32,
                                               function=spec, function_key="k").to_wire(),
        "agent.invoke": m.InvokeRequest(env_id="e-1", request_id="r-1", payload=b"{}",
                                        timeout_ms=3000, arn=spec.arn).to_wire(),
        "agent.invoke_reply": reply_to_version("agent", "invoke", 1, reply.to_wire()),
        "agent.invoke_reply_error": reply_to_version("agent", "invoke", 1, failed.to_wire()),
        "agent.destroy": m.DestroyRequest(env_id="e-1").to_wire(),
    }


async def _frontend_reply() -> Any:
    from cellcloud.frontend import api

    # an unknown route is answered before the cell is touched
    return await api.handle(None, {"m": "GET", "p": "/no/such/route", "q": "", "h": {},  # type: ignore[arg-type]
                                   "b": b"", "a": ACCOUNT})


def capture() -> dict[str, Any]:
    frames = asyncio.run(_router_frames())
    out: dict[str, Any] = {"frontend.http.invoke": frames[0][3], "frontend.http.get": frames[1][3],
                           "frontend.http.frame": frames[1][:3] + ["<body>"]}
    out["frontend.http_reply"] = asyncio.run(_frontend_reply())
    out.update(_agent_messages())
    return out


def write(directory: str) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    names = []
    for name, doc in sorted(capture().items()):
        names.append(name + ".json")
        with open(os.path.join(directory, name + ".json"), "w") as f:
            json.dump(to_json(doc), f, indent=1, sort_keys=True)
            f.write("\n")
    return names


if __name__ == "__main__":
    print("\n".join(write(sys.argv[1] if len(sys.argv) > 1 else HERE)))
