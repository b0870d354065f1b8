"""Snapshot and restore of microVM guests with QEMU's migration: the shell around
``snapcore.py``.

``Guest`` is one QEMU the host drives: the serial console and a QMP monitor on socketpairs the
host made and handed to QEMU by descriptor (the host speaks first on both; the guest can open
nothing). ``create`` boots the snapshot guest to its ready marker, pauses it (``stop``), saves
it with ``migrate`` to a descriptor of the state file and polls ``query-migrate`` until it
completes; the folder is written beside its final place and renamed in once its manifest is
durable. ``restore`` hashes the snapshot's files, lets ``snapcore.verify`` decide, starts QEMU
with ``-incoming defer``, loads the state with ``migrate-incoming`` from a descriptor of the
state file, and resumes it (``cont``); a refused snapshot or a failed load boots the guest fresh
instead. Either way the first thing the host sends is ``fresh_identity``: a new seed from
``os.urandom`` and the wall clock, which the guest applies before anything else runs.

``spawn`` starts the VMM; the default runs it as a plain child, ``jailer.spawner(spec)`` runs it jailed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.limits import DEFAULT_LIMITS, Limits
from . import boot, core, image, snapcore

# (argv, descriptors QEMU inherits) -> the started process
Spawn = Callable[[list[str], Sequence[int]], Awaitable[asyncio.subprocess.Process]]


class SnapshotError(Exception):
    """A guest did not reach its marker, QMP refused a command, a save failed."""


async def spawn_plain(argv: list[str], fds: Sequence[int]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv, pass_fds=tuple(fds), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, start_new_session=True)


def snapshots_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "microvm", "snapshots")


def snapshot_image(state_dir: str, **kw: Any) -> image.Image:
    """The image of the snapshot guest (its own /init; built on first use)."""
    return image.ensure(state_dir, init=snapcore.snapshot_init_script(), **kw)


def file_digest(path: str, *, bytes_max: int) -> snapcore.FileDigest | None:
    """SHA-256 and size of ``path``; None when it is missing or over ``bytes_max``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return fd_digest(fd, bytes_max=bytes_max)
    finally:
        os.close(fd)


def fd_digest(fd: int, *, bytes_max: int) -> snapcore.FileDigest | None:
    """SHA-256 and size of the open file ``fd`` from its start (left at its end)."""
    try:
        size = os.fstat(fd).st_size
        if size > bytes_max:
            return None
        os.lseek(fd, 0, os.SEEK_SET)
        h = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    except OSError:
        return None
    return snapcore.FileDigest(h.hexdigest(), size)


class Guest:
    """A running QEMU with its console and QMP sockets. Always ``close()`` it."""

    def __init__(self, proc: asyncio.subprocess.Process, qmp: tuple[Any, Any],
                 console: tuple[Any, Any], limits: Limits, qmp_sock: socket.socket) -> None:
        self.proc = proc
        self._qsock = qmp_sock  # the stream's socket, for SCM_RIGHTS (``pass_fd``)
        self._qr, self._qw = qmp
        self._cr, self._cw = console
        self._limits = limits
        self._console_read = 0
        self.console_tail: list[str] = []

    @classmethod
    async def start(cls, img: image.Image, spec: core.VmSpec, *, incoming: bool = False,
                    qemu: str | None = None,
                    spawn: Spawn = spawn_plain, limits: Limits = DEFAULT_LIMITS,
                    ) -> tuple[Guest, list[str]]:
        qemu = qemu or boot.qemu_binary()
        if qemu is None:
            raise FileNotFoundError(boot.QEMU)
        qa, qb = socket.socketpair()
        ca, cb = socket.socketpair()
        try:
            argv = snapcore.guest_argv(qemu, img.kernel, img.initrd, spec,
                                       console_fd=cb.fileno(), qmp_fd=qb.fileno(),
                                       incoming=incoming)
            proc = await spawn(argv, (qb.fileno(), cb.fileno()))
        except BaseException:
            for s in (qa, ca):
                s.close()
            raise
        finally:
            qb.close()
            cb.close()
        qmp = await asyncio.open_connection(sock=qa)
        console = await asyncio.open_connection(sock=ca)
        g = cls(proc, qmp, console, limits, qa)
        try:
            await asyncio.wait_for(g.handshake(), limits.microvm_qmp_timeout_ms / 1000)
        except BaseException as e:
            await g.close()
            if isinstance(e, TimeoutError):
                raise SnapshotError("no QMP greeting within microvm_qmp_timeout_ms") from None
            raise
        return g, argv

    async def handshake(self) -> None:
        try:
            greeting = json.loads(await self._qr.readline() or b"null")
        except (OSError, ValueError) as e:
            raise SnapshotError(f"no QMP greeting: {e} ({await self.stderr_tail()})") from None
        if not isinstance(greeting, dict) or "QMP" not in greeting:
            raise SnapshotError(f"no QMP greeting ({await self.stderr_tail()})")
        await self.qmp("qmp_capabilities")

    async def qmp(self, command: str, **arguments: Any) -> Any:
        """One QMP command's ``return``; events in between are skipped."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            self._qw.write(json.dumps(msg).encode() + b"\n")
            await self._qw.drain()
        except OSError as e:  # QEMU exited: the socket is reset
            raise SnapshotError(f"{command}: QMP {e} ({await self.stderr_tail()})") from None
        return await self.qmp_answer(command)

    async def qmp_answer(self, command: str) -> Any:
        async def answer() -> Any:
            while True:
                raw = await self._qr.readline()
                if not raw:
                    raise SnapshotError(f"QMP closed during {command} "
                                        f"({await self.stderr_tail()})")
                doc = json.loads(raw)
                if "error" in doc:
                    raise SnapshotError(f"{command}: {doc['error'].get('desc', doc['error'])}")
                if "return" in doc:
                    return doc["return"]

        try:
            return await asyncio.wait_for(answer(), self._limits.microvm_qmp_timeout_ms / 1000)
        except TimeoutError:
            raise SnapshotError(f"{command}: no answer within microvm_qmp_timeout_ms") from None
        except OSError as e:  # QEMU exited: the socket is reset
            raise SnapshotError(f"{command}: QMP {e} ({await self.stderr_tail()})") from None
        except ValueError as e:
            raise SnapshotError(f"{command}: QMP sent something that is not JSON: {e}") from None

    async def wait_event(self, name: str, match: Callable[[dict[str, Any]], bool],
                         timeout_ms: int) -> dict[str, Any]:
        """The data of the first QMP event ``name`` whose data ``match`` accepts (call it with
        no command in flight: answers read here are dropped)."""

        async def read() -> dict[str, Any]:
            while True:
                raw = await self._qr.readline()
                if not raw:
                    raise SnapshotError(f"QMP closed before {name} ({await self.stderr_tail()})")
                doc = json.loads(raw)
                if doc.get("event") == name and match(doc.get("data") or {}):
                    return dict(doc.get("data") or {})

        try:
            return await asyncio.wait_for(read(), timeout_ms / 1000)
        except TimeoutError:
            raise SnapshotError(f"no {name} event within {timeout_ms} ms") from None
        except OSError as e:
            raise SnapshotError(f"{name}: QMP {e} ({await self.stderr_tail()})") from None
        except ValueError as e:
            raise SnapshotError(f"{name}: QMP sent something that is not JSON: {e}") from None

    async def pass_fd(self, name: str, fd: int) -> None:
        """Hand QEMU a descriptor (SCM_RIGHTS on the QMP socket) under ``name``, for a
        ``fd:<name>`` migration URI: no file path or shell is needed inside QEMU's jail."""
        msg = json.dumps({"execute": "getfd", "arguments": {"fdname": name}}).encode() + b"\n"
        try:
            await self._qw.drain()  # nothing else in flight: the command goes out whole
            sent = socket.send_fds(self._qsock, [msg], [fd])
        except OSError as e:
            raise SnapshotError(f"getfd: QMP {e} ({await self.stderr_tail()})") from None
        assert sent == len(msg), sent
        await self.qmp_answer("getfd")

    async def wait_console(self, match: Callable[[str], Any], timeout_ms: int) -> Any:
        """The first non-None ``match(line)`` of the console; SnapshotError at the time
        limit, at the console's end or past ``microvm_console_bytes_max``."""

        async def read() -> Any:
            while self._console_read < self._limits.microvm_console_bytes_max:
                raw = await self._cr.readline()
                if not raw:
                    raise SnapshotError("the guest's console closed: "
                                        f"{self.console_tail[-3:]} {await self.stderr_tail()}")
                self._console_read += len(raw)
                line = raw.decode(errors="replace").rstrip("\r\n")
                self.console_tail = [*self.console_tail[-19:], line]
                found = match(line)
                if found is not None and found is not False:
                    return found
            raise SnapshotError("the guest's console passed microvm_console_bytes_max")

        try:
            return await asyncio.wait_for(read(), timeout_ms / 1000)
        except TimeoutError:
            raise SnapshotError(f"no console line matched within {timeout_ms} ms: "
                                f"{self.console_tail[-3:]}") from None

    async def fresh_identity(self, *, timeout_ms: int) -> snapcore.FreshReply:
        """Send the guest a new seed (os.urandom) and the wall clock; its answer."""
        self._cw.write(snapcore.fresh_identity_line(os.urandom(32), int(time.time())))
        await self._cw.drain()
        reply: snapcore.FreshReply = await self.wait_console(snapcore.parse_fresh_reply,
                                                             timeout_ms)
        return reply

    async def stderr_tail(self) -> str:
        """QEMU's (or its jailer's) last stderr, once it exited (waited for a few seconds: a
        closed console or QMP socket means it is exiting)."""
        if self.proc.stderr is None:
            return ""
        if self.proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5)
        if self.proc.returncode is None:
            return ""
        with contextlib.suppress(TimeoutError):
            err = await asyncio.wait_for(self.proc.stderr.read(4096), 2)
            return err.decode(errors="replace").strip()[-300:]
        return ""

    async def close(self) -> int:
        """End QEMU (``quit``, then SIGTERM, then SIGKILL, 10 s apart) and reap it; its exit
        status."""
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                self._qw.write(b'{"execute": "quit"}\n')
                await self._qw.drain()
            # quit, then SIGTERM (a jailer forwards it to QEMU and still removes the VM's
            # cgroup), then SIGKILL.
            for stop in (None, self.proc.terminate, self.proc.kill):
                if stop is not None:
                    with contextlib.suppress(ProcessLookupError):
                        stop()
                try:
                    await asyncio.wait_for(self.proc.wait(), 10)
                    break
                except TimeoutError:
                    continue
        for w in (self._qw, self._cw):
            w.close()
        if self.proc.stderr is not None:
            drain = asyncio.ensure_future(self.proc.stderr.read())
        code = await self.proc.wait()
        if self.proc.stderr is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drain, 5)
        return code


@dataclass(frozen=True)
class Snapshot:
    path: str
    key: snapcore.SnapshotKey
    state_bytes: int
    save_ms: int  # from `stop` to `completed`
    built: bool  # made now (False: found in the cache)

    @property
    def state(self) -> str:
        return os.path.join(self.path, "state.bin")


def qemu_version(qemu: str | None = None) -> str:
    """QEMU's ``--version`` line (part of every snapshot's key); asked once per binary (its
    path, size and mtime), not on every restore."""
    qemu = qemu or boot.qemu_binary()
    if qemu is None:
        raise FileNotFoundError(boot.QEMU)
    st = os.stat(qemu)
    return _qemu_version(qemu, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _qemu_version(qemu: str, _size: int, _mtime_ns: int) -> str:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30,
                         stdin=subprocess.DEVNULL, check=True)
    return out.stdout.splitlines()[0]


def snapshot_key(img: image.Image, spec: core.VmSpec, qemu: str,
                 version: str) -> snapcore.SnapshotKey:
    argv = snapcore.guest_argv(qemu, img.kernel, img.initrd, spec, console_fd=3, qmp_fd=4)
    return snapcore.SnapshotKey.of(image_digest=img.digest, qemu_version=version, spec=spec,
                                   argv=argv, kernel=img.kernel, initrd=img.initrd)


def read_manifest(folder: str) -> Any:
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


async def wait_migration(g: Guest, timeout_ms: int) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_ms / 1000
    delay = 0.01
    while True:
        st = await g.qmp("query-migrate")
        if st.get("status") == "completed":
            return dict(st)
        if st.get("status") in ("failed", "cancelled"):
            raise SnapshotError(f"migration {st.get('status')}: {st.get('error-desc', '')}")
        if time.monotonic() > deadline:
            raise SnapshotError(f"the save did not complete within {timeout_ms} ms")
        await asyncio.sleep(delay)  # polling QEMU's progress, bounded by the deadline above
        delay = min(delay * 2, 0.2)


async def create(state_dir: str, img: image.Image, spec: core.VmSpec, *,
                 limits: Limits = DEFAULT_LIMITS, qemu: str | None = None,
                 spawn: Spawn = spawn_plain, force: bool = False) -> Snapshot:
    """The snapshot of ``img`` booted as ``spec`` to its ready marker: the cached one when its
    manifest is there (``force``: make it again), else made now."""
    qemu = qemu or boot.qemu_binary()
    if qemu is None:
        raise FileNotFoundError(boot.QEMU)
    key = snapshot_key(img, spec, qemu, qemu_version(qemu))
    root = snapshots_dir(state_dir)
    final = os.path.join(root, key.dir_name())
    have = read_manifest(final)
    if have is not None and not force:
        try:
            return Snapshot(final, key, int(have["state"]["size_bytes"]),
                            int(have["save_ms"]), False)
        except (KeyError, TypeError, ValueError):
            pass  # a malformed manifest: made again below
    os.makedirs(root, mode=0o700, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".save-", dir=root)
    try:
        state_path = os.path.join(tmp, "state.bin")
        g, _ = await Guest.start(img, spec, qemu=qemu, spawn=spawn, limits=limits)
        try:
            await g.wait_console(snapcore.is_ready_line, limits.microvm_boot_timeout_ms)
            t0 = time.monotonic()
            await g.qmp("stop")
            fd = os.open(state_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                await g.pass_fd("state", fd)
            finally:
                os.close(fd)  # QEMU holds its own copy
            await g.qmp("migrate", uri="fd:state")
            await wait_migration(g, limits.microvm_snapshot_save_timeout_ms)
            save_ms = int((time.monotonic() - t0) * 1000)
        finally:
            await g.close()
        state = file_digest(state_path, bytes_max=limits.microvm_snapshot_bytes_max)
        if state is None:
            raise SnapshotError("the saved state is over microvm_snapshot_bytes_max")
        with open(state_path, "rb+") as f:
            os.fsync(f.fileno())
        doc = snapcore.manifest(
            key, state=state, kernel=must_digest(img.kernel, limits),
            initrd=must_digest(img.initrd, limits),
            created_at_s=int(time.time()), save_ms=save_ms)
        image.publish(tmp, final, "manifest.json", doc)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Snapshot(final, key, state.size_bytes, save_ms, True)


def must_digest(path: str, limits: Limits) -> snapcore.FileDigest:
    d = file_digest(path, bytes_max=limits.microvm_image_input_bytes_max)
    if d is None:
        raise SnapshotError(f"{path}: unreadable or over microvm_image_input_bytes_max")
    return d


def check(snapshot_path: str, key: snapcore.SnapshotKey, img: image.Image, *,
          limits: Limits = DEFAULT_LIMITS, state_fd: int | None = None) -> snapcore.Verdict:
    """Hash the snapshot's and the image's files and let ``snapcore.verify`` decide.
    ``state_fd``: the state file already open (the descriptor QEMU will load from, so what
    was checked is what is loaded)."""
    kernel = file_digest(img.kernel, bytes_max=limits.microvm_image_input_bytes_max)
    initrd = file_digest(img.initrd, bytes_max=limits.microvm_image_input_bytes_max)
    if kernel is None or initrd is None:
        return snapcore.Verdict(False, "the image's files are missing")
    if state_fd is None:
        state = file_digest(os.path.join(snapshot_path, "state.bin"),
                            bytes_max=limits.microvm_snapshot_bytes_max)
    else:
        state = fd_digest(state_fd, bytes_max=limits.microvm_snapshot_bytes_max)
    return snapcore.verify(read_manifest(snapshot_path), key, state=state, kernel=kernel,
                           initrd=initrd, state_bytes_max=limits.microvm_snapshot_bytes_max)


@dataclass
class Started:
    guest: Guest
    how: str  # "restored" or "booted" (a fresh boot)
    reason: str  # why a snapshot was not used, or "digests match"
    ready_ms: int  # from the call to the guest's answer to its fresh identity
    verify_ms: int  # of which hashing and checking the snapshot
    fresh: snapcore.FreshReply


async def start_guest(snapshot_path: str | None, img: image.Image, spec: core.VmSpec, *,
                      limits: Limits = DEFAULT_LIMITS, qemu: str | None = None,
                      spawn: Spawn = spawn_plain) -> Started:
    """A ready guest with a fresh identity: restored from ``snapshot_path`` when
    ``snapcore.verify`` accepts it, booted fresh otherwise (or when ``snapshot_path`` is None
    or the restore fails before the guest ran). The caller closes ``.guest``."""
    t0 = time.monotonic()
    qemu = qemu or boot.qemu_binary()
    if qemu is None:
        raise FileNotFoundError(boot.QEMU)
    reason = "no snapshot"
    if snapshot_path is not None:
        key = snapshot_key(img, spec, qemu, qemu_version(qemu))
        try:
            state_fd: int | None = os.open(os.path.join(snapshot_path, "state.bin"),
                                           os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            state_fd = None
        try:
            verdict = (check(snapshot_path, key, img, limits=limits, state_fd=state_fd)
                       if state_fd is not None else
                       snapcore.Verdict(False, "the state file is missing"))
            verify_ms = int((time.monotonic() - t0) * 1000)
            reason = verdict.reason
            g: Guest | None = None
            if verdict.ok:
                assert state_fd is not None
                os.lseek(state_fd, 0, os.SEEK_SET)
                try:
                    g = await _restore(state_fd, img, spec, limits=limits, qemu=qemu,
                                       spawn=spawn)
                except SnapshotError as e:
                    reason = f"the restore failed: {e}"
        finally:
            if state_fd is not None:
                os.close(state_fd)
        if g is not None:
            try:
                fresh = await g.fresh_identity(timeout_ms=limits.microvm_restore_timeout_ms)
            except BaseException:
                await g.close()
                raise
            return Started(g, "restored", reason, int((time.monotonic() - t0) * 1000),
                           verify_ms, fresh)
    else:
        verify_ms = 0
    g, _ = await Guest.start(img, spec, qemu=qemu, spawn=spawn, limits=limits)
    try:
        await g.wait_console(snapcore.is_ready_line, limits.microvm_boot_timeout_ms)
        fresh = await g.fresh_identity(timeout_ms=limits.microvm_boot_timeout_ms)
    except BaseException:
        await g.close()
        raise
    return Started(g, "booted", reason, int((time.monotonic() - t0) * 1000), verify_ms, fresh)


async def _restore(state_fd: int, img: image.Image, spec: core.VmSpec, *, limits: Limits,
                   qemu: str, spawn: Spawn) -> Guest:
    g, _ = await Guest.start(img, spec, incoming=True, qemu=qemu, spawn=spawn, limits=limits)
    try:
        await g.pass_fd("state", state_fd)  # the descriptor whose content was just checked
        await g.qmp("migrate-incoming", uri="fd:state")
        await wait_loaded(g, limits)
        await g.qmp("cont")
    except BaseException:
        await g.close()
        raise
    return g


async def wait_loaded(g: Guest, limits: Limits) -> None:
    """Until QEMU's incoming migration has loaded (SnapshotError if it failed or took over
    ``microvm_restore_timeout_ms``)."""
    deadline = time.monotonic() + limits.microvm_restore_timeout_ms / 1000
    delay = 0.005
    while (await g.qmp("query-status")).get("status") == "inmigrate":
        if time.monotonic() > deadline:
            raise SnapshotError("the state did not load within microvm_restore_timeout_ms")
        await asyncio.sleep(delay)  # polling QEMU's load, bounded by the deadline above
        delay = min(delay * 2, 0.1)
    st = await g.qmp("query-migrate")
    if st.get("status") not in ("completed", None):
        raise SnapshotError(f"the load ended {st.get('status')}")
