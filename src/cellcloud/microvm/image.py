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
    import libarchive  # libarchive-c over Debian's libarchive13
    from libarchive.entry import FileType

    kinds = {"dir": FileType.DIRECTORY, "chardev": FileType.CHAR_DEVICE,
             "file": FileType.REGULAR_FILE}
    with libarchive.file_writer(path, "cpio_newc") as archive:
        for e in core.initramfs_layout():
            data = files[e.source] if e.kind == "file" else b""
            archive.add_file_from_memory(
                e.path, len(data), data, filetype=kinds[e.kind], permission=e.mode,
                uid=0, gid=0, mtime=0, rdevmajor=e.rdev[0], rdevminor=e.rdev[1])


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
        with open(os.path.join(tmp, "image.json"), "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if os.path.isdir(final):  # an incomplete folder (no image.json) from a crash
            shutil.rmtree(final)
        os.rename(tmp, final)
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
