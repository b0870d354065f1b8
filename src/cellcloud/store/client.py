"""The async client the rest of cellcloud uses to talk to the store.

    client = StoreClient(Colony.load("colony.json"))
    await client.create_cell("fn:acct-1", near_zone="z0")
    await client.put("fn:acct-1", "handler", b"app.handler")
    ok = await client.cas("fn:acct-1", "version", 3, 4)
    await client.close()

Every command is strictly serializable within its cell. Commands carry a session
``(client_id, seq)`` that the cell opened for this lane (one ``session`` command on a lane's
first use of a cell): a retry, to the same node or another, is applied at most once. If the
cell evicted the session, the command is not applied (``session_expired``): the client opens a
new session and resends it, or raises ``StoreSessionExpired`` (a ``StoreUnavailable``: outcome
unknown) if an earlier attempt went unanswered. Retries
happen here and only here: redirects follow the leader hint, "busy" backs off with full jitter,
and a token-bucket retry budget stops retry storms. ``StoreUnavailable`` means the outcome is
unknown (the command may or may not have been applied); ``StoreBusy`` that the budget ran out.

Discovery: the cell -> members map is a cache filled from any node's eventually consistent
directory; a stale entry costs a retry ("not here" answers carry fresher members), never
correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import time
from typing import Any

from cellcloud.core.limits import DEFAULT_LIMITS
from cellcloud.core.paxos import BUSY, EXPIRED, NOT_HERE, NOT_LEADER, OK, REJECTED, Request
from cellcloud.core.store_model import CommandRejected, Value, validate_command
from cellcloud.store.backoff import RetryBudget, full_jitter_ms
from cellcloud.store.colony import Colony
from cellcloud.store.placement import Candidate, place_cell
from cellcloud.store.wire import FrameRejected, encode, read_frame, seal, unseal


class StoreError(Exception):
    pass


class StoreRejected(StoreError):
    """The store does not accept this command (malformed, over a limit)."""


class StoreUnavailable(StoreError):
    """No answer in time: the outcome of a write is unknown."""


class StoreBusy(StoreError):
    """The cell shed load and the retry budget is spent."""


class StoreSessionExpired(StoreUnavailable):
    """The cell had evicted this client's session, and an earlier attempt of the command had
    been sent: it may have been applied once; it was not applied again (outcome unknown)."""


class _SessionRefused(Exception):
    def __init__(self, maybe_sent_before: bool) -> None:
        self.maybe_sent_before = maybe_sent_before


class _Conn:
    def __init__(self, client: StoreClient, node: str) -> None:
        self.client = client
        self.node = node
        self.writer: asyncio.StreamWriter | None = None
        self.reader_task: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()

    async def send(self, body: dict[str, Any]) -> None:
        async with self.lock:
            if self.writer is None or self.writer.is_closing():
                host, port = self.client.colony.address(self.node)
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), timeout=self.client.connect_timeout_s
                )
                self.writer = writer
                self.reader_task = asyncio.create_task(self._read(reader))
        assert self.writer is not None
        self.writer.write(seal(self.client.colony.key, body))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                frame = await read_frame(reader)
                try:
                    body = unseal(self.client.colony.key, frame)
                except FrameRejected:
                    self.client.counters["frames_unauthenticated"] += 1
                    continue
                fut = self.client.pending.pop(body.get("request_id", -1), None)
                if fut is not None and not fut.done():
                    fut.set_result(body)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, FrameRejected):
            pass
        finally:
            if self.writer is not None:
                self.writer.close()
            self.writer = None

    async def close(self) -> None:
        if self.reader_task is not None:
            self.reader_task.cancel()
            with contextlib.suppress(BaseException):
                await self.reader_task
        if self.writer is not None:
            self.writer.close()


class StoreClient:
    def __init__(
        self,
        colony: Colony,
        *,
        lanes_max: int = 64,
        attempt_timeout_ms: int = 500,
        op_timeout_ms: int = 5_000,
        connect_timeout_ms: int = 1_000,
        retry_budget: RetryBudget | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.colony = colony
        self.rng = rng or random.Random(int.from_bytes(os.urandom(8), "big"))
        self.attempt_timeout_s = attempt_timeout_ms / 1000
        self.op_timeout_s = op_timeout_ms / 1000
        self.connect_timeout_s = connect_timeout_ms / 1000
        self.budget = retry_budget or RetryBudget()
        self.conns: dict[str, _Conn] = {}
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.request_ids = itertools.count(1)
        self.members_cache: dict[str, list[str]] = {}
        self.leader_cache: dict[str, str] = {}
        # A lane runs one command at a time; per cell it holds a session [client_id, seq].
        # Session ids come from the cell (a ``session`` command), so they are unique there.
        self.lanes: asyncio.Queue[dict[str, list[int]]] = asyncio.Queue()
        for _ in range(lanes_max):
            self.lanes.put_nowait({})
        self.counters: dict[str, int] = {
            "attempts": 0,
            "retries": 0,
            "busy": 0,
            "redirects": 0,
            "timeouts": 0,
            "not_here": 0,
            "frames_unauthenticated": 0,
            "sessions_opened": 0,
            "sessions_expired": 0,
        }

    @classmethod
    def from_file(cls, path: str, **kwargs: Any) -> StoreClient:
        return cls(Colony.load(path), **kwargs)

    async def __aenter__(self) -> StoreClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for c in self.conns.values():
            await c.close()
        self.conns = {}

    # ---- data commands --------------------------------------------------------------------

    async def get(self, cell: str, key: str) -> Value | None:
        result: Value | None = await self.execute(cell, {"op": "get", "key": key})
        return result

    async def put(self, cell: str, key: str, value: Value) -> None:
        await self.execute(cell, {"op": "put", "key": key, "value": value})

    async def delete(self, cell: str, key: str) -> bool:
        return bool(await self.execute(cell, {"op": "delete", "key": key}))

    async def cas(self, cell: str, key: str, expected: Value | None, value: Value | None) -> bool:
        """Set ``key`` to ``value`` (None deletes) if it holds ``expected`` (None: absent)."""
        cmd = {"op": "cas", "key": key, "expected": expected, "value": value}
        return bool(await self.execute(cell, cmd))

    async def txn(
        self,
        cell: str,
        reads: list[str],
        checks: list[tuple[str, str, Value | None]] | None = None,
        writes: list[tuple[str, Value | None]] | None = None,
    ) -> tuple[bool, list[Value | None]]:
        """Read ``reads``; if every check holds (``eq``/``ne``/``absent``/``present``), write
        ``writes`` (None deletes). Returns (checks held, values read before the writes)."""
        cmd = {
            "op": "txn",
            "reads": list(reads),
            "checks": [list(c) for c in checks or []],
            "writes": [list(w) for w in writes or []],
        }
        ok, values = await self.execute(cell, cmd)
        return bool(ok), list(values)

    async def execute(self, cell: str, command: dict[str, Any]) -> Any:
        try:
            validate_command(command)
        except CommandRejected as exc:
            raise StoreRejected(str(exc)) from exc
        lane = await self.lanes.get()
        try:
            session = lane.get(cell)
            if session is None:
                session = lane[cell] = await self._open_session(cell, lane)
            session[1] += 1
            try:
                return await self._execute(cell, command, session[0], session[1])
            except _SessionRefused as exc:
                # The cell evicted our session: nothing was applied now. A new session; the
                # command goes again only if no earlier attempt of it can have reached a node.
                lane.pop(cell, None)
                self.counters["sessions_expired"] += 1
                if exc.maybe_sent_before:
                    raise StoreSessionExpired(
                        f"{cell}: session expired; an earlier attempt may have been applied"
                    ) from None
                session = lane[cell] = await self._open_session(cell, lane)
                session[1] += 1
                return await self._execute(cell, command, session[0], session[1])
        finally:
            self.lanes.put_nowait(lane)

    async def _open_session(self, cell: str, lane: dict[str, list[int]]) -> list[int]:
        while len(lane) >= DEFAULT_LIMITS.store_lane_sessions_max:
            del lane[next(iter(lane))]  # forget the oldest cell's session; a new one opens
        client_id = int(await self._execute(cell, {"op": "session"}, 0, 0))
        self.counters["sessions_opened"] += 1
        return [client_id, 0]

    async def _execute(self, cell: str, command: dict[str, Any], client_id: int, seq: int) -> Any:
        deadline = time.monotonic() + self.op_timeout_s
        members = await self.members(cell)
        target = self.leader_cache.get(cell) or self.rng.choice(members)
        attempt = 0
        maybe_sent = False  # an attempt went unanswered: it may have reached a leader
        self.budget.on_attempt()
        while True:
            if time.monotonic() >= deadline:
                raise StoreUnavailable(f"{cell}: no answer within {self.op_timeout_s}s")
            attempt += 1
            self.counters["attempts"] += 1
            rid = next(self.request_ids)
            req = Request(cell, "", rid, client_id, seq, command)
            body = await self._call(target, encode(req), rid)
            status = body.get("status") if body else None
            maybe_sent = maybe_sent or body is None
            if status == OK:
                self.leader_cache[cell] = target
                return body["result"]  # type: ignore[index]
            if status == REJECTED:
                raise StoreRejected(str(body["result"]))  # type: ignore[index]
            if status == EXPIRED:
                raise _SessionRefused(maybe_sent_before=maybe_sent)
            if status == NOT_LEADER:
                # Redirects do not spend the retry budget: following a hint, or waiting (with
                # jitter) for an election the node just started, is bounded by the deadline.
                self.counters["redirects"] += 1
                hint = body.get("leader_hint")  # type: ignore[union-attr]
                self.leader_cache.pop(cell, None)
                if hint in members and hint != target:
                    target = hint
                    continue
                await asyncio.sleep(full_jitter_ms(self.rng, min(attempt, 5)) / 1000)
                continue
            elif status == NOT_HERE:
                self.counters["not_here"] += 1
                fresh = body.get("result")  # type: ignore[union-attr]
                self.members_cache.pop(cell, None)
                members = list(fresh) if fresh else await self.members(cell, refresh=True)
                self.members_cache[cell] = members
                target = self.rng.choice(members)
            elif status == BUSY:
                self.counters["busy"] += 1
            else:
                self.counters["timeouts"] += 1
                self.leader_cache.pop(cell, None)
                target = self.rng.choice([m for m in members if m != target] or members)
            if not self.budget.try_spend():
                if status == BUSY:
                    raise StoreBusy(f"{cell}: busy and the retry budget is spent")
                raise StoreUnavailable(f"{cell}: retry budget spent (outcome unknown)")
            self.counters["retries"] += 1
            await asyncio.sleep(full_jitter_ms(self.rng, attempt) / 1000)

    async def _call(self, node: str, body: dict[str, Any], rid: int) -> dict[str, Any] | None:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        body = dict(body, request_id=rid) if body.get("t") != "request" else body
        try:
            conn = self.conns.get(node)
            if conn is None:
                conn = self.conns[node] = _Conn(self, node)
            await conn.send(body)
            return await asyncio.wait_for(fut, timeout=self.attempt_timeout_s)
        except (OSError, TimeoutError, ConnectionError):
            return None
        finally:
            self.pending.pop(rid, None)

    # ---- discovery and admin ----------------------------------------------------------------

    async def _admin(self, node: str, body: dict[str, Any]) -> dict[str, Any] | None:
        rid = next(self.request_ids)
        return await self._call(node, dict(body, request_id=rid), rid)

    async def members(self, cell: str, refresh: bool = False) -> list[str]:
        if not refresh and cell in self.members_cache:
            return self.members_cache[cell]
        nodes = self.colony.node_ids()
        self.rng.shuffle(nodes)
        for node in nodes:
            reply = await self._admin(node, {"t": "locate", "cell": cell})
            if reply and reply.get("ok"):
                self.members_cache[cell] = list(reply["members"])
                return self.members_cache[cell]
        raise StoreUnavailable(f"no node knows cell {cell!r}")

    async def create_cell(
        self,
        cell: str,
        members: list[str] | None = None,
        *,
        near_zone: str | None = None,
        replicas: int = 7,
    ) -> list[str]:
        """Create a cell (placing it near ``near_zone`` unless ``members`` is given)."""
        if members is None:
            cands = [Candidate(n, s.labels) for n, s in self.colony.nodes.items()]
            members = place_cell(cands, near_zone, replicas)
        body = {"t": "create_cell", "cell": cell, "members": list(members)}
        for node in members:
            reply = await self._admin(node, body)
            if not reply or not reply.get("ok"):
                raise StoreUnavailable(f"create_cell on {node} failed: {reply}")
        self.members_cache[cell] = sorted(members)
        return sorted(members)

    async def add_replica(self, cell: str, remove: str, add: str) -> bool:
        """Replace one replica: start an empty one on ``add``, then commit the change; it
        takes effect alpha slots later, and the cell stays available throughout."""
        members = await self.members(cell, refresh=True)
        reply = await self._admin(add, {"t": "create_cell", "cell": cell, "members": None})
        if not reply or not reply.get("ok"):
            raise StoreUnavailable(f"could not start a replica on {add}: {reply}")
        cmd = {"op": "reconfig", "expect": sorted(members), "remove": remove, "add": add}
        ok = bool(await self.execute(cell, cmd))
        if ok:
            self.members_cache[cell] = sorted([m for m in members if m != remove] + [add])
        return ok

    async def cell_status(self, cell: str) -> dict[str, Any]:
        members = await self.members(cell)
        out: dict[str, Any] = {}
        for node in members:
            reply = await self._admin(node, {"t": "cell_status", "cell": cell})
            out[node] = reply.get("status") if reply and reply.get("ok") else None
        return out

    async def node_stats(self, node: str) -> dict[str, Any] | None:
        return await self._admin(node, {"t": "stats"})
