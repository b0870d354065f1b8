"""Booting a guest image with QEMU and the acceleration probe: the shell around ``core.py``.

``boot`` starts QEMU with the serial console on a pipe, reads it line by line (at most
``microvm_console_bytes_max``) until /init's marker or the time limit, and always ends QEMU
(SIGKILL, then waits for it). ``probe`` boots the image once under KVM when ``/dev/kvm`` can be
opened, lets ``core.decide_accel`` choose, and caches the decision per host in
``<state>/microvm/probe.json`` (keyed by ``core.host_key``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass

from ..core.limits import DEFAULT_LIMITS, Limits
from . import core
from .image import Image

QEMU = "qemu-system-x86_64"
KVM_DEVICE = "/dev/kvm"


@dataclass(frozen=True)
class BootResult:
    guest_release: str | None  # None: no marker (timeout, exit, console cap)
    elapsed_ms: int  # from QEMU's start to the marker (or to giving up)
    timed_out: bool
    exit_code: int | None  # QEMU's, when it exited before the marker
    console_tail: str  # the console's last lines, for errors
    stderr_tail: str


async def _read_capped(stream: asyncio.StreamReader, cap: int) -> bytes:
    """All of ``stream`` up to EOF, keeping only its last ``cap`` bytes."""
    out = b""
    while chunk := await stream.read(65536):
        out = (out + chunk)[-cap:]
    return out


def qemu_binary() -> str | None:
    return shutil.which(QEMU)


async def boot(image: Image, spec: core.VmSpec, *, timeout_ms: int,
               limits: Limits = DEFAULT_LIMITS, qemu: str | None = None) -> BootResult:
    """Boot ``image`` and wait for its marker; QEMU is gone when this returns."""
    qemu = qemu or qemu_binary()
    if qemu is None:
        raise FileNotFoundError(QEMU)
    argv = core.qemu_argv(qemu, image.kernel, image.initrd, spec)
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True)
    assert proc.stdout is not None and proc.stderr is not None
    stderr_task = asyncio.ensure_future(_read_capped(proc.stderr, 64 * 1024))
    lines: list[str] = []
    read = 0
    release: str | None = None
    timed_out = False

    async def read_console() -> str | None:
        nonlocal read
        assert proc.stdout is not None
        while read < limits.microvm_console_bytes_max:
            raw = await proc.stdout.readline()
            if not raw:
                return None  # QEMU closed the console: it exited
            read += len(raw)
            line = raw.decode(errors="replace").rstrip("\r\n")
            lines.append(line)
            del lines[:-20]
            found = core.guest_release_from_console(line)
            if found is not None:
                return found
        return None

    try:
        release = await asyncio.wait_for(read_console(), timeout_ms / 1000)
    except TimeoutError:
        timed_out = True
    elapsed_ms = int((time.monotonic() - started) * 1000)
    if release is None and not timed_out and proc.stdout.at_eof():
        # QEMU closed the console: it is exiting; take its own status rather than racing it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 10)
    exit_code = proc.returncode
    if exit_code is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
    # Read the console to its end: a paused pipe (a console left unread past the cap) would keep
    # asyncio from seeing the exit. QEMU is dead, so what is left is bounded by the pipe.
    drain = asyncio.ensure_future(_read_capped(proc.stdout, 1))
    code = await proc.wait()
    await drain
    if release is None and not timed_out:
        exit_code = code
    try:
        err_bytes = await asyncio.wait_for(stderr_task, 5)
    except TimeoutError:
        err_bytes = b""
    return BootResult(release, elapsed_ms, timed_out, exit_code, "\n".join(lines[-5:]),
                      err_bytes.decode(errors="replace").strip()[-500:])


def _kvm_usable() -> bool:
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


async def run_probe(image: Image, *, limits: Limits = DEFAULT_LIMITS,
                    qemu: str | None = None) -> core.ProbeOutcome:
    """Try one KVM boot of ``image``; what happened, for ``core.decide_accel``."""
    qemu = qemu or qemu_binary()
    if qemu is None:
        return core.ProbeOutcome("no_vmm")
    if not _kvm_usable():
        return core.ProbeOutcome("no_device", detail=f"{KVM_DEVICE} cannot be opened")
    try:
        r = await boot(image, core.VmSpec(accel="kvm"), timeout_ms=limits.microvm_probe_timeout_ms,
                       limits=limits, qemu=qemu)
    except OSError as e:
        return core.ProbeOutcome("error", detail=str(e))
    if r.guest_release is not None:
        return core.ProbeOutcome("booted", r.elapsed_ms)
    last = (r.stderr_tail.splitlines() or [""])[-1][:200]
    if r.timed_out:
        return core.ProbeOutcome("timeout", r.elapsed_ms, last)
    return core.ProbeOutcome("exited", r.elapsed_ms, f"exit {r.exit_code}: {last}".rstrip(": "))


def probe_path(state_dir: str) -> str:
    return os.path.join(state_dir, "microvm", "probe.json")


def _qemu_version(qemu: str | None) -> str:
    if qemu is None:
        return ""
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (out.stdout.splitlines() or [""])[0]


def current_host_key(image: Image, qemu: str | None = None) -> str:
    qemu = qemu or qemu_binary()
    u = os.uname()
    return core.host_key(nodename=u.nodename, host_release=u.release,
                         qemu_version=_qemu_version(qemu), kvm_device=_kvm_usable(),
                         image_digest=image.digest)


def cached_probe(state_dir: str) -> dict[str, object] | None:
    """The last probe's record as stored (no check that it still holds: for ``status``)."""
    try:
        with open(probe_path(state_dir)) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def probe(state_dir: str, image: Image, *, force: bool = False,
          limits: Limits = DEFAULT_LIMITS) -> tuple[dict[str, object], bool]:
    """The host's acceleration: the cached record when it was made for this host (and image),
    else a new probe, stored. Returns the record and whether it came from the cache."""
    qemu = qemu_binary()
    key = current_host_key(image, qemu)
    have = cached_probe(state_dir)
    if not force and have is not None and have.get("host_key") == key:
        return have, True
    outcome = asyncio.run(run_probe(image, limits=limits, qemu=qemu))
    decision = core.decide_accel(outcome, timeout_ms=limits.microvm_probe_timeout_ms)
    record: dict[str, object] = {
        **decision.to_json(), "host_key": key, "image": image.digest,
        "host_release": os.uname().release, "probed_at": int(time.time())}
    path = probe_path(state_dir)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return record, False
