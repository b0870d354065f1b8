"""The snapshot decisions of microvm/snapcore.py: the snapshot's key and argv shape, the
manifest, and ``verify`` refusing every mismatch (a flipped byte in the state, another image,
another QEMU, another memory size) so that the caller boots fresh; the fresh-identity line and
the guest's answer."""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import tempfile

import pytest

from cellcloud.microvm import core, snapcore

IMG = "sha256:" + "1" * 64
SPEC = core.VmSpec(accel="tcg")


def _key(spec: core.VmSpec = SPEC, image: str = IMG, version: str = "QEMU 7.2.22",
         kernel: str = "/s/img/vmlinuz", fds: tuple[int, int] = (5, 6)) -> snapcore.SnapshotKey:
    argv = snapcore.guest_argv("/usr/bin/qemu", kernel, kernel + ".cpio", spec,
                               console_fd=fds[0], qmp_fd=fds[1])
    return snapcore.SnapshotKey.of(image_digest=image, qemu_version=version, spec=spec,
                                   argv=argv, kernel=kernel, initrd=kernel + ".cpio")


STATE = snapcore.FileDigest("a" * 64, 1000)
KERNEL = snapcore.FileDigest("b" * 64, 10)
INITRD = snapcore.FileDigest("c" * 64, 20)


def _manifest(key: snapcore.SnapshotKey) -> dict[str, object]:
    return snapcore.manifest(key, state=STATE, kernel=KERNEL, initrd=INITRD, created_at_s=1,
                             save_ms=2)


def _verify(doc: object, key: snapcore.SnapshotKey, **kw: object) -> snapcore.Verdict:
    args: dict[str, object] = {"state": STATE, "kernel": KERNEL, "initrd": INITRD,
                               "state_bytes_max": 10_000, **kw}
    return snapcore.verify(doc, key, **args)  # type: ignore[arg-type]


def test_key_ignores_descriptors_paths_and_incoming_but_not_the_guest() -> None:
    k = _key()
    # Another start's descriptors, the image's folder elsewhere, -incoming: the same snapshot.
    assert _key(fds=(9, 11), kernel="/other/vmlinuz").digest() == k.digest()
    argv = snapcore.guest_argv("/q", "/k", "/i", SPEC, console_fd=3, qmp_fd=4, incoming=True)
    assert argv[-2:] == ["-incoming", "defer"]
    assert "-incoming" not in snapcore.argv_shape(argv, kernel="/k", initrd="/i")
    assert "stdio" not in argv and "chardev:con" in argv
    assert argv[argv.index("-append") + 1].endswith(" init_on_free=1")  # a sparse state
    # What the state depends on changes the key.
    for other in (_key(spec=dataclasses.replace(SPEC, memory_mib=256)),
                  _key(spec=dataclasses.replace(SPEC, machine="pc")),
                  _key(image="sha256:" + "2" * 64), _key(version="QEMU 8.0.0")):
        assert other.digest() != k.digest()
    assert len(k.dir_name()) == 64


def test_verify_accepts_the_matching_snapshot() -> None:
    k = _key()
    v = _verify(_manifest(k), k)
    assert v.ok, v.reason


def test_a_flipped_byte_in_the_state_is_refused() -> None:
    k = _key()
    v = _verify(_manifest(k), k, state=snapcore.FileDigest("a" * 63 + "0", 1000))
    assert not v.ok and "state" in v.reason and "SHA-256" in v.reason


def test_mismatched_guests_and_files_are_refused() -> None:
    k = _key()
    doc = _manifest(k)
    other = _key(spec=dataclasses.replace(SPEC, memory_mib=256))
    v = _verify(doc, other)
    assert not v.ok and "memory_mib" in v.reason
    assert not _verify(doc, _key(version="QEMU 8.0.0")).ok
    assert not _verify(doc, k, kernel=snapcore.FileDigest("d" * 64, 10)).ok  # a replaced kernel
    assert not _verify(doc, k, state=snapcore.FileDigest("a" * 64, 999)).ok  # truncated
    assert not _verify(doc, k, state=None).ok  # missing
    assert not _verify(None, k).ok  # no manifest
    assert not _verify({**doc, "state": {"sha256": "x"}}, k).ok  # malformed
    assert not _verify({**doc, "digest": "sha256:" + "0" * 64}, k).ok
    # Over the state limit: refused before anything is read.
    v = _verify(doc, k, state_bytes_max=999)
    assert not v.ok and "microvm_snapshot_bytes_max" in v.reason


def test_fresh_identity_line_and_reply() -> None:
    line = snapcore.fresh_identity_line(bytes(range(32)), 1_700_000_000)
    assert line == f"SEED {bytes(range(32)).hex()} TIME 1700000000\n".encode()
    r = snapcore.parse_fresh_reply(f"{snapcore.FRESH_MARKER} {'ab' * 16} 1700000001 0\r")
    assert r == snapcore.FreshReply("ab" * 16, 1_700_000_001, 0)
    assert snapcore.parse_fresh_reply(f"{snapcore.FRESH_MARKER} bad") is None
    assert snapcore.parse_fresh_reply("SEED 00 TIME 1") is None
    init = snapcore.snapshot_init_script().decode()
    # The seed and the clock are applied before the guest reads its random bytes.
    assert init.index("| /bin/reseed") < init.index('date -s') < init.index("head -c 16")
    assert "stty -echo" in init


def test_reseed_helper_is_a_static_elf_the_init_writes_out() -> None:
    elf = snapcore.reseed_helper()
    assert core.is_static_elf(elf) and len(elf) < 300
    entry = int.from_bytes(elf[24:32], "little")
    assert 0x400000 + 120 == entry  # code right after the headers, in the one segment
    # Both ioctls, by number: RNDADDENTROPY (credit) then RNDRESEEDCRNG (rekey the CRNG now).
    add, reseed = (snapcore.RNDADDENTROPY.to_bytes(4, "little"),
                   snapcore.RNDRESEEDCRNG.to_bytes(4, "little"))
    assert 0 < elf.index(add) < elf.index(reseed)
    assert b"/dev/urandom\0" in elf
    init = snapcore.snapshot_init_script().decode()
    line = next(x for x in init.splitlines() if "> /bin/reseed" in x)
    octal = line.split("'")[1]
    assert bytes(int(o, 8) for o in octal.split("\\")[1:]) == elf  # every byte escaped


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the helper as an unprivileged uid")
def test_reseed_helper_runs_and_needs_cap_sys_admin() -> None:
    """The hand-written ELF loads and runs on this kernel: as nobody it reads its input, opens
    /dev/urandom and is refused RNDADDENTROPY (status 3); with no input it stops at once (1).
    (As root it would reseed the host's CRNG: the guest test runs that path.)"""
    with tempfile.TemporaryDirectory(dir="/tmp") as d:  # pytest's own is root-only
        os.chmod(d, 0o755)
        path = os.path.join(d, "reseed")
        with open(path, "wb") as f:
            f.write(snapcore.reseed_helper())
        os.chmod(path, 0o755)
        run = functools.partial(subprocess.run, [path], user=65534, group=65534,
                                extra_groups=[], timeout=30)
        assert run(input=b"ab" * 32 + b"\n").returncode == 3
        assert run(input=b"").returncode == 1
