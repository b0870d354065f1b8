"""Guest images: Debian's cloud kernel (``linux-image-cloud-amd64``) and an initramfs (cpio
newc, written with libarchive) holding ``busybox-static`` and the /init of ``core.py``.

An image lives in ``<state>/microvm/images/<hex digest>/`` (``vmlinuz``, ``initramfs.cpio``,
``image.json``); the digest is that of its inputs (``core.ImageInputs``), so the same kernel,
busybox and /init give the same image and are built once. A folder is complete once its
``image.json`` exists: it is built in a temporary folder beside it and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from ..core.limits import DEFAULT_LIMITS, Limits
from . import core

BOOT_DIR = "/boot"
BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")


class ImageError(Exception):
    """An image cannot be built: a package is missing, an input is too big, the cache is bad."""


@dataclass(frozen=True)
class Image:
    digest: str
    path: str  # the image's folder
    kernel_release: str
    size_bytes: int

    @property
    def kernel(self) -> str:
        return os.path.join(self.path, "vmlinuz")

    @property
    def initrd(self) -> str:
        return os.path.join(self.path, "initramfs.cpio")


def publish(tmp: str, final: str, name: str, doc: dict[str, Any]) -> None:
    """A folder built in ``tmp`` made ``final``: its record ``name`` (``doc`` as JSON, synced:
    the folder counts only once it exists) written last, an incomplete ``final`` (a crash's, a
    snapshot refused or forced again) removed, and ``tmp`` renamed into place."""
    with open(os.path.join(tmp, name), "w") as f:
        json.dump(doc, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.rename(tmp, final)


def images_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "microvm", "images")


def _read_input(path: str, limits: Limits) -> bytes:
    size = os.stat(path).st_size
    if size > limits.microvm_image_input_bytes_max:
        raise ImageError(f"{path}: {size} bytes, over microvm_image_input_bytes_max")
    with open(path, "rb") as f:
        return f.read(limits.microvm_image_input_bytes_max + 1)


def find_inputs(boot_dir: str = BOOT_DIR) -> tuple[str, str]:
    """The host's cloud kernel and static busybox (scripts/setup.sh installs the packages)."""
    try:
        names = os.listdir(boot_dir)
    except OSError:
        names = []
    kernel = core.pick_kernel(names)
    if kernel is None:
        raise ImageError(f"no Debian cloud kernel in {boot_dir} "
                         "(apt-get install linux-image-cloud-amd64)")
    for bb in BUSYBOX_PATHS:
        if os.path.exists(bb):
            return os.path.join(boot_dir, kernel), bb
    raise ImageError("no busybox (apt-get install busybox-static)")


def _write_initramfs(path: str, files: dict[str, bytes]) -> None:
    _write_cpio(path, core.initramfs_layout(), files)


def _load(folder: str) -> Image | None:
    try:
        with open(os.path.join(folder, "image.json")) as f:
            meta: dict[str, Any] = json.load(f)
        size = sum(os.stat(os.path.join(folder, n)).st_size
                   for n in ("vmlinuz", "initramfs.cpio"))
        if core.image_dir_name(str(meta.get("digest", ""))) != os.path.basename(folder):
            return None
    except (OSError, ValueError):
        return None
    return Image(meta["digest"], folder, str(meta["kernel_release"]), size)


def build(state_dir: str, *, boot_dir: str = BOOT_DIR,
          limits: Limits = DEFAULT_LIMITS, init: bytes | None = None) -> tuple[Image, bool]:
    """The image of this host's current inputs, built unless it already is; returns it and
    whether it was built now. ``init``: another /init than ``core.init_script()`` (the snapshot
    guest's); it is part of the image's digest, so each /init has its own image."""
    kernel_path, busybox_path = find_inputs(boot_dir)
    kernel = _read_input(kernel_path, limits)
    busybox = _read_input(busybox_path, limits)
    if not core.is_static_elf(busybox):
        raise ImageError(f"{busybox_path} is not a static busybox (apt-get install "
                         "busybox-static)")
    if init is None:
        init = core.init_script()
    inputs = core.ImageInputs(
        kernel_release=core.kernel_release(os.path.basename(kernel_path)),
        kernel_sha256=hashlib.sha256(kernel).hexdigest(),
        busybox_sha256=hashlib.sha256(busybox).hexdigest(),
        init_sha256=hashlib.sha256(init).hexdigest(),
    )
    digest = inputs.digest()
    root = images_dir(state_dir)
    final = os.path.join(root, core.image_dir_name(digest))
    have = _load(final)
    if have is not None:
        return have, False
    os.makedirs(root, mode=0o700, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".build-", dir=root)
    try:
        with open(os.path.join(tmp, "vmlinuz"), "wb") as f:
            f.write(kernel)
        _write_initramfs(os.path.join(tmp, "initramfs.cpio"), {"busybox": busybox, "init": init})
        meta = {"digest": digest, "kernel_release": inputs.kernel_release,
                "inputs": {"kernel": kernel_path, "kernel_sha256": inputs.kernel_sha256,
                           "busybox": busybox_path, "busybox_sha256": inputs.busybox_sha256,
                           "init_sha256": inputs.init_sha256, "format": inputs.format}}
        publish(tmp, final, "image.json", meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    img = _load(final)
    if img is None:
        raise ImageError(f"{final}: built but unreadable")
    return img, True


def ensure(state_dir: str, **kw: Any) -> Image:
    """The image to boot: built on first use."""
    return build(state_dir, **kw)[0]


def list_images(state_dir: str) -> list[Image]:
    root = images_dir(state_dir)
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if name.startswith("."):
            continue
        img = _load(os.path.join(root, name))
        if img is not None:
            out.append(img)
    return out


# -- the agent image: initramfs with modules + the runtime disk (docs/microvm.md) ----------

MODULES_DIR = "/lib/modules"
GUEST_BUSYBOX = "/bin/busybox"  # on the runtime disk: /bin/sh and /usr/bin/env link to it
MKFS = "mkfs.ext4"
# Parts of the standard library no guest agent or handler of this slice needs.
_STDLIB_SKIP = frozenset({"test", "idlelib", "tkinter", "turtledemo", "ensurepip",
                          "site-packages", "lib2to3", "pydoc_data", "config-3.11-x86_64-linux-gnu"})


@dataclass(frozen=True)
class AgentImage:
    """What an environment's VM boots: the base image's kernel, the agent initramfs and the
    runtime disk (an ext4 image attached read-only)."""

    digest: str
    path: str
    kernel: str
    initrd: str
    runtime_disk: str
    kernel_release: str


def agent_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "microvm", "agent")


def _ldd(paths: list[str]) -> set[str]:
    """The shared libraries (their paths as the loader finds them) of these ELF files."""
    import subprocess

    out: set[str] = set()
    for i in range(0, len(paths), 64):
        r = subprocess.run(["ldd", *paths[i:i + 64]], capture_output=True, text=True,
                           timeout=60, stdin=subprocess.DEVNULL)
        for line in r.stdout.splitlines():
            parts = line.split()
            if "=>" in parts:
                j = parts.index("=>")
                if j + 1 < len(parts) and parts[j + 1].startswith("/"):
                    out.add(parts[j + 1])
            elif parts and parts[0].startswith("/") and "(0x" in line:
                out.add(parts[0])  # the loader itself
    return out


def runtime_files() -> dict[str, str]:
    """The runtime disk's files: guest path -> host path. The host's Python (its prefix at the
    same path: its RUNPATH names it), the libraries it and its extension modules load, and
    cellcloud's package plus msgpack under ``core.GUEST_PYLIB``."""
    import sys

    import msgpack

    import cellcloud

    files: dict[str, str] = {}
    prefix = os.path.realpath(sys.base_prefix)
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    exe = os.path.join(prefix, "bin", version)
    files[exe] = exe
    libdir = os.path.join(prefix, "lib")
    for name in os.listdir(libdir):
        if name.startswith("libpython"):
            files[os.path.join(libdir, name)] = os.path.realpath(os.path.join(libdir, name))
    std = os.path.join(libdir, version)
    elves = [exe]
    for dirpath, dirnames, filenames in os.walk(std):
        rel = os.path.relpath(dirpath, std)
        if rel == ".":
            dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP]
        dirnames[:] = [d for d in dirnames if d not in ("tests", "test")]
        for f in filenames:
            p = os.path.join(dirpath, f)
            if os.path.isfile(p):
                files[p] = p
                if f.endswith(".so"):
                    elves.append(p)

    def add_package(pkg_dir: str) -> None:
        top = os.path.dirname(pkg_dir)
        for dirpath, dirnames, filenames in os.walk(pkg_dir):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for f in filenames:
                if f.endswith((".py", ".so", ".js", ".cjs", ".json", ".typed")):
                    p = os.path.join(dirpath, f)
                    files[os.path.join(core.GUEST_PYLIB, os.path.relpath(p, top))] = p
                    if f.endswith(".so"):
                        elves.append(p)

    add_package(os.path.dirname(os.path.realpath(cellcloud.__file__)))
    add_package(os.path.dirname(os.path.realpath(msgpack.__file__)))
    # The libraries of the host's Node binaries (libstdc++, libgcc_s): each binary itself is
    # on a tree disk of its own (``ensure_tree_disk``), loaded by this root's loader.
    from ..sandbox import runtimes

    elves += sorted(runtimes.find_node().values())
    # A shell for custom runtimes (a ``bootstrap`` script's ``#!/bin/sh``, ``/usr/bin/env``):
    # the base image's static busybox; ``_stage_runtime`` links sh and env to it.
    files[GUEST_BUSYBOX] = find_inputs()[1]
    for lib in _ldd(elves):
        files[lib] = os.path.realpath(lib)
    return files


def _runtime_manifest(files: dict[str, str], limits: Limits) -> tuple[str, int]:
    h = hashlib.sha256()
    total = 0
    for guest in sorted(files):
        st = os.stat(files[guest])
        total += st.st_size
        if total > limits.microvm_runtime_disk_bytes_max:
            raise ImageError(f"the runtime disk's files pass microvm_runtime_disk_bytes_max "
                             f"({limits.microvm_runtime_disk_bytes_max} bytes)")
        with open(files[guest], "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        h.update(f"{guest}\0{st.st_mode & 0o777:o}\0{digest}\n".encode())
    return h.hexdigest(), total


_GUEST_ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/usr/sbin/nologin\n"
                  "sbx_user:x:993:990:sandbox:/tmp:/usr/sbin/nologin\n",
    "etc/group": "root:x:0:\nsbx_user:x:990:\n",
    "etc/hosts": "127.0.0.1 localhost sandbox.localdomain\n::1 localhost\n",
    # Empty: a guest with egress binds its resolver's file over it (guest_vm.configure_network).
    "etc/resolv.conf": "",
}


def _stage_runtime(files: dict[str, str], stage: str) -> None:
    import compileall
    import sys

    for d in ("dev", "proc", "sys", "tmp", "var/task", "var/runtime", "opt", "etc",
              "usr/local/bin", core.RUNTIME_TREE_MOUNT.lstrip("/")):
        os.makedirs(os.path.join(stage, d), exist_ok=True)
    for guest, host in files.items():
        dst = os.path.join(stage, guest.lstrip("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(host, dst)
    for rel, text in _GUEST_ETC.items():
        with open(os.path.join(stage, rel), "w") as f:
            f.write(text)
    for link in ("bin/sh", "usr/bin/env"):
        os.makedirs(os.path.dirname(os.path.join(stage, link)), exist_ok=True)
        os.symlink(GUEST_BUSYBOX, os.path.join(stage, link))
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    os.symlink(os.path.join(os.path.realpath(sys.base_prefix), "bin", version),
               os.path.join(stage, "usr/local/bin/python3"))
    # Byte code compiled now: the guest's disk is read-only and its CPU may be emulated.
    import py_compile

    for root in (os.path.join(stage, os.path.realpath(sys.base_prefix).lstrip("/"), "lib",
                              version), os.path.join(stage, core.GUEST_PYLIB.lstrip("/"))):
        compileall.compile_dir(root, quiet=2, workers=1,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)


def build_agent(state_dir: str, *, limits: Limits = DEFAULT_LIMITS) -> tuple[AgentImage, bool]:
    """The agent image for this host's base image, modules, Python and cellcloud code, built
    unless it already is; returns it and whether it was built now."""
    import subprocess

    base = ensure(state_dir, limits=limits)
    mod_root = os.path.join(MODULES_DIR, base.kernel_release)
    try:
        with open(os.path.join(mod_root, "modules.dep")) as f:
            order = core.module_load_order(f.read())
    except (OSError, KeyError) as e:
        raise ImageError(f"the guest kernel's modules are missing ({e}); apt-get install "
                         f"linux-image-cloud-amd64") from e
    modules = {p: _read_input(os.path.join(mod_root, p), limits) for p in order}
    mh = hashlib.sha256()
    for p in order:
        mh.update(p.encode() + b"\0" + hashlib.sha256(modules[p]).digest())
    init = core.agent_init_script(order)
    files = runtime_files()
    runtime_sha, runtime_bytes = _runtime_manifest(files, limits)
    inputs = core.AgentInputs(base.digest, mh.hexdigest(), hashlib.sha256(init).hexdigest(),
                              runtime_sha)
    digest = inputs.digest()
    root = agent_dir(state_dir)
    final = os.path.join(root, core.image_dir_name(digest))
    have = _load_agent(final, base)
    if have is not None:
        return have, False
    if shutil.which(MKFS) is None:
        raise ImageError(f"no {MKFS} (apt-get install e2fsprogs)")
    os.makedirs(root, mode=0o700, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".build-", dir=root)
    try:
        blobs: dict[str, bytes] = {"init": init, "busybox": _read_input(
            find_inputs()[1], limits)}
        blobs.update({"module:" + p: data for p, data in modules.items()})
        _write_cpio(os.path.join(tmp, "initramfs.cpio"), core.agent_initramfs_layout(order),
                    blobs)
        stage = os.path.join(tmp, "stage")
        _stage_runtime(files, stage)
        size_kib = (runtime_bytes * 2) // 1024 + 64 * 1024
        disk = os.path.join(tmp, "runtime.ext4")
        r = subprocess.run([MKFS, "-q", "-F", "-O", "^has_journal", "-L", "cc-runtime",
                            "-E", "root_owner=0:0", "-d", stage, disk, f"{size_kib}k"],
                           capture_output=True, text=True, timeout=300,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise ImageError(f"{MKFS} failed: {r.stderr.strip()[-300:]}")
        shutil.rmtree(stage)
        meta = {"digest": digest, "base": base.digest, "modules": order,
                "runtime_files": len(files), "runtime_bytes": runtime_bytes}
        publish(tmp, final, "agent.json", meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    img = _load_agent(final, base)
    if img is None:
        raise ImageError(f"{final}: built but unreadable")
    return img, True


def _load_agent(folder: str, base: Image) -> AgentImage | None:
    try:
        with open(os.path.join(folder, "agent.json")) as f:
            meta: dict[str, Any] = json.load(f)
        if core.image_dir_name(str(meta.get("digest", ""))) != os.path.basename(folder):
            return None
        if meta.get("base") != base.digest:
            return None
    except (OSError, ValueError):
        return None
    return AgentImage(meta["digest"], folder, base.kernel, os.path.join(folder, "initramfs.cpio"),
                      os.path.join(folder, "runtime.ext4"), base.kernel_release)


def _write_cpio(path: str, layout: list[core.Entry], files: dict[str, bytes]) -> None:
    """A cpio newc archive of ``layout`` (libarchive-c over Debian's libarchive13): every
    entry owned by root with mtime 0, so the same inputs give the same bytes."""
    import libarchive
    from libarchive.entry import FileType

    kinds = {"dir": FileType.DIRECTORY, "chardev": FileType.CHAR_DEVICE,
             "file": FileType.REGULAR_FILE}
    with libarchive.file_writer(path, "cpio_newc") as archive:
        for e in layout:
            data = files[e.source] if e.kind == "file" else b""
            archive.add_file_from_memory(
                e.path, len(data), data, filetype=kinds[e.kind], permission=e.mode,
                uid=0, gid=0, mtime=0, rdevmajor=e.rdev[0], rdevminor=e.rdev[1])


def ensure_agent(state_dir: str, **kw: Any) -> AgentImage:
    return build_agent(state_dir, **kw)[0]


# -- a runtime's tree disk: its executable, read-only at /rtx in the guest ------------------


def trees_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "microvm", "trees")


def ensure_tree_disk(state_dir: str, exe: str, *, limits: Limits = DEFAULT_LIMITS) -> str:
    """The tree disk of a runtime's executable (a Node binary: one self-contained ELF whose
    libraries the runtime disk carries): an ext4 image labelled ``core.TREE_LABEL`` holding
    ``bin/<name>``, content-addressed by the executable's SHA-256 and built once
    (``<state>/microvm/trees/<hex>/tree.ext4``, complete once ``tree.json`` exists). Readable
    by every uid: the environment's QEMU opens it as the environment's."""
    import subprocess

    real = os.path.realpath(exe)
    st = os.stat(real)
    if st.st_size > limits.microvm_runtime_disk_bytes_max:
        raise ImageError(f"{real} passes microvm_runtime_disk_bytes_max "
                         f"({limits.microvm_runtime_disk_bytes_max} bytes)")
    with open(real, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    name = os.path.basename(real)
    h = hashlib.sha256(f"{core.AGENT_FORMAT}\0tree\0{name}\0{sha}".encode()).hexdigest()
    root = trees_dir(state_dir)
    final = os.path.join(root, core.image_dir_name("sha256:" + h))
    disk = os.path.join(final, "tree.ext4")
    if os.path.exists(os.path.join(final, "tree.json")):
        return disk
    if shutil.which(MKFS) is None:
        raise ImageError(f"no {MKFS} (apt-get install e2fsprogs)")
    os.makedirs(root, mode=0o755, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".build-", dir=root)
    try:
        os.chmod(tmp, 0o755)
        stage = os.path.join(tmp, "stage")
        os.makedirs(os.path.join(stage, "bin"))
        shutil.copy2(real, os.path.join(stage, "bin", name))
        size_kib = st.st_size * 5 // 4 // 1024 + 16 * 1024
        r = subprocess.run([MKFS, "-q", "-F", "-O", "^has_journal", "-L", core.TREE_LABEL,
                            "-E", "root_owner=0:0", "-d", stage, os.path.join(tmp, "tree.ext4"),
                            f"{size_kib}k"], capture_output=True, text=True, timeout=300,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise ImageError(f"{MKFS} failed: {r.stderr.strip()[-300:]}")
        shutil.rmtree(stage)
        os.chmod(os.path.join(tmp, "tree.ext4"), 0o444)
        publish(tmp, final, "tree.json", {"exe": real, "sha256": sha})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return disk
