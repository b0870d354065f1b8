"""Live update: a new agent process takes over a running agent's environments, in place.

Every agent listens (passively, like everything it does) on a Unix SOCK_SEQPACKET socket
``/run/cellcloud/handover-<hash of its state dir>.sock`` that only root can reach. A replacement agent, started with
``--adopt`` and not yet locked down, connects and asks. The old agent then

1. drains: new ``create_env``/``invoke`` calls are answered ``AgentDraining`` (the frontend
   retries them on its next connection), invocations already running finish and answer;
2. hands over, with SCM_RIGHTS: its listening TCP socket (connections queued meanwhile wait in
   the kernel's backlog) and, per environment, its record and the agent end of its channel;
3. exits without touching its environments: they are not its children (the zygote's), so
   they keep running, and the new agent serves them through the very same channels.

Frames: ``{"t": "adopt"}`` → ``{"t": "listen"}`` + fd, ``{"t": "env", ...}`` + fd per
environment, ``{"t": "task", ...}`` + the task's network namespace and its running containers'
channels per task (agent/tasks.py), ``{"t": "network"}`` + the network helper's channel (when the agent has one: the
helper, told to outlive its first agent, keeps every environment's interface and policy),
``{"t": "done", "n": count}``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

from ..transport.codec import recv_message, send_message, unpack_dict

log = logging.getLogger("cellcloud.agent.handover")

frame_bytes_max = 256 * 1024
fds_per_frame_max = 16  # a task's: its network namespace and its containers' channels
drain_timeout_s = 905.0  # the longest invocation (900 s) and a margin
connection_drain_timeout_s = 10.0  # then the calls still under way on its connections


def socket_path(state_dir: str) -> str:
    """Where an agent's handover socket lives: short (AF_UNIX paths stop at 108 bytes, state
    directories can be longer) and in a root-only directory."""
    import hashlib

    digest = hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:20]
    base = "/run/cellcloud"
    os.makedirs(base, mode=0o700, exist_ok=True)
    return os.path.join(base, f"handover-{digest}.sock")


def listen(path: str) -> socket.socket:
    """The handover socket (created before the lock-down; afterwards only accept() is used)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(path)
    os.chmod(path, 0o600)
    s.listen(1)
    s.setblocking(False)
    return s


def unlink_if_ours(path: str, ino: int) -> None:
    """Remove this agent's handover socket when it stops for good — unless the path is no
    longer ours (a successor bound its own socket there during a live update)."""
    try:
        if os.stat(path).st_ino == ino:
            os.unlink(path)
    except FileNotFoundError:
        pass


def receive(path: str, extras: dict[str, socket.socket] | None = None,
            tasks: list[tuple[dict[str, Any], list[int]]] | None = None,
            ) -> tuple[socket.socket, list[tuple[dict[str, Any], socket.socket]]]:
    """The new agent's side (blocking, before its event loop and its lock-down). ``extras``
    receives the network helper's channel as ``"network"``, if one was handed over;
    ``tasks`` the tasks' records and fds (agent/tasks.py ``hand_over``)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    send_message(s, {"t": "adopt", "pid": os.getpid()})
    listener: socket.socket | None = None
    envs: list[tuple[dict[str, Any], socket.socket]] = []
    try:
        while True:
            doc, fds = recv_message(s, frame_bytes_max, fds_per_frame_max)
            if doc is None:
                raise ConnectionError("the old agent went away during the handover")
            if doc["t"] == "listen":
                listener = socket.socket(fileno=fds[0])
            elif doc["t"] == "env":
                envs.append((doc, socket.socket(fileno=fds[0])))
            elif doc["t"] == "network":
                net = socket.socket(fileno=fds[0])
                if extras is None:
                    net.close()  # nobody to hand it to: the helper tears down on EOF
                else:
                    extras["network"] = net
            elif doc["t"] == "volumes":  # the volume helper's channel (volumes/helper.py)
                vol = socket.socket(fileno=fds[0])
                if extras is None:
                    vol.close()  # nobody to hand it to: the helper detaches on EOF
                else:
                    extras["volumes"] = vol
            elif doc["t"] == "task":
                if tasks is None:
                    for fd in fds:
                        os.close(fd)  # nobody takes it: its containers end on EOF
                else:
                    tasks.append((doc, fds))
            elif doc["t"] == "done":
                assert doc["n"] == len(envs), doc
                break
    finally:
        s.close()
    if listener is None:
        raise ConnectionError("the old agent did not hand over its listening socket")
    listener.setblocking(False)
    return listener, envs


async def serve_handover(agent: Any, hsock: socket.socket, listen_sock: socket.socket,
                         server: Any, done: asyncio.Event) -> None:
    """The old agent's side: wait for a successor, drain, hand everything over, then set
    ``done`` (the caller exits without destroying anything)."""
    loop = asyncio.get_running_loop()
    conn, _ = await loop.sock_accept(hsock)
    conn.setblocking(True)
    hello = unpack_dict(await loop.sock_recv(conn, frame_bytes_max + 1), frame_bytes_max)
    log.warning("handing over to agent process %s", hello.get("pid"))
    agent.draining = True
    deadline = loop.time() + drain_timeout_s
    while any(rec.busy for rec in agent.envs.values()) and loop.time() < deadline:
        await agent.wait_idle()
    for rec in agent.envs.values():  # from here on only the successor reads these channels
        if rec.channel.transport is not None:
            rec.channel.transport.pause_reading()
    tasks = agent.tasks.hand_over()  # the tasks' channels too
    listen_fd = os.dup(listen_sock.fileno())
    # Stop accepting here (the duplicate keeps the socket listening: new connections wait in
    # its backlog for the successor) and let each connection go: its callers are told to go
    # away, the calls under way (status, logs: invocations are over) are answered, and a
    # caller's connection closes once it has its answers — so no caller sees a connection
    # break under a call and takes the agent for lost.
    await server.drain(connection_drain_timeout_s)
    await asyncio.to_thread(_send, conn, agent, listen_fd, tasks)
    done.set()


def _send(conn: socket.socket, agent: Any, listen_fd: int,
          tasks: list[tuple[dict[str, Any], list[int]]] | None = None) -> None:
    try:
        send_message(conn, {"t": "listen"}, [listen_fd])
        n = 0
        for env_id, rec in list(agent.envs.items()):
            sock = rec.channel.transport.get_extra_info("socket") if rec.channel.transport \
                else None
            if sock is None:
                continue  # its channel is gone: the environment is dead anyway
            doc = {"t": "env", "env_id": env_id, "spec": rec.spec.to_wire(),
                   "function_key": rec.function_key, "pid": rec.spawned.pid,
                   "created_ms": rec.created_ms, "slot": rec.slot,
                   "invocations": rec.invocations, "init_ms": rec.init_ms,
                   "init_error": rec.init_error, "last_used_ms": rec.last_used_ms,
                   "max_rss_kb": rec.max_rss_kb, "measurements": rec.measurements,
                   "extensions": rec.extensions, "guest_wire": rec.guest_wire}
            send_message(conn, doc, [sock.fileno()])
            n += 1
        for doc, fds in tasks or []:
            send_message(conn, doc, fds)
        network = getattr(agent, "network", None)
        if network is not None:
            send_message(conn, {"t": "network"}, [network.detach()])
        volumes = getattr(agent, "volumes", None)
        if volumes is not None:
            send_message(conn, {"t": "volumes"}, [volumes.channel_for_handover()])
        send_message(conn, {"t": "done", "n": n})
    finally:
        os.close(listen_fd)
        conn.close()
