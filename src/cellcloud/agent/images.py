"""The agent's image-layer cache: layers arrive from the frontend in bounded chunks
(``image_blob`` op: the agent never dials out), are verified against their digest, unpacked
once — every entry checked by ``registry.core.tar_entry_problem`` — into
``<state>/images/layers/<hex>``, and shared read-only by every environment of every image that
names them (overlayfs lower dirs, sandbox/jail.py).

Nothing holds a whole layer: a chunk (at most ``registry_chunk_bytes_max``) is appended to
``blobs/<hex>.part-<pid>`` with a running SHA-256, and the unpack streams the file through tarfile.
Refused (the whole layer, nothing of it kept): paths that leave the root (``../``, absolute
names climbing out), entries reached through a symlink, hard links to outside the layer or to
a non-file, device nodes and FIFOs, setuid/setgid files (refused, not stripped: an image that
needs them cannot run unprivileged anyway), whiteouts that name nothing inside their directory,
more than ``image_layer_entries_max`` entries or ``registry_image_bytes_max`` bytes.
Whiteouts become overlayfs whiteouts (a 0/0 character device; ``trusted.overlay.opaque``).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import stat
import tarfile
import threading
import time
from typing import IO, Any

from ..core import layer_cache
from ..core.limits import DEFAULT_LIMITS, Limits
from ..registry import core as reg
from ..transport import OpError

GZIP_TYPES = ("tar+gzip", "tar.gzip")
_copy_bytes = 1024 * 1024


class LayerRefused(Exception):
    """A layer that may not be unpacked (the message says which entry and why)."""


def hex_of(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef"
                                                         for c in hexpart):
        raise OpError("InvalidDigest", f"not a sha256 digest: {digest[:80]!r}")
    return hexpart


def _kind(m: tarfile.TarInfo) -> str:
    if m.isreg():
        return "file"
    if m.isdir():
        return "dir"
    if m.issym():
        return "symlink"
    if m.islnk():
        return "hardlink"
    if m.ischr():
        return "chardev"
    if m.isblk():
        return "blockdev"
    if m.isfifo():
        return "fifo"
    return "other"


def _walk_parent(root: str, parts: list[str]) -> str:
    """The host path of ``parts``' parent inside ``root``, creating missing directories and
    refusing a path that goes through anything but a real directory (a symlink unpacked
    earlier in the same layer would otherwise let a later entry write outside the root)."""
    path = root
    for p in parts[:-1]:
        path = os.path.join(path, p)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            os.mkdir(path, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise LayerRefused(f"{'/'.join(parts)[:200]!r}: path goes through a "
                               f"{'symlink' if stat.S_ISLNK(st.st_mode) else 'non-directory'}")
    return os.path.join(path, parts[-1])


def _remove(path: str) -> None:
    """An earlier entry of the same layer at this path goes (tar semantics: the last wins)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def unpack_layer(fileobj: IO[bytes], dest: str, limits: Limits = DEFAULT_LIMITS) -> int:
    """Stream one layer tar (plain or gzip: tarfile detects it) into ``dest`` (must not exist).
    Returns the bytes written. On any refusal or error ``dest`` is removed."""
    os.mkdir(dest, 0o755)
    root = os.path.realpath(dest)
    written = entries = 0
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for m in tar:
                entries += 1
                if entries > limits.image_layer_entries_max:
                    raise LayerRefused(f"more than {limits.image_layer_entries_max} entries")
                entry = reg.TarEntry(m.name, _kind(m), m.mode, m.linkname)
                problem = reg.tar_entry_problem(entry)
                if problem:
                    raise LayerRefused(problem)
                parts = [p for p in m.name.split("/") if p not in ("", ".")]
                if not parts:
                    continue  # the root itself ("./")
                wh = reg.whiteout(m.name)
                target = _walk_parent(root, parts)
                if wh is not None:
                    parent, hidden = wh
                    if hidden == "":
                        os.makedirs(os.path.dirname(target), exist_ok=True)
                        os.setxattr(os.path.dirname(target), "trusted.overlay.opaque", b"y")
                    else:
                        gone = os.path.join(os.path.dirname(target), hidden)
                        _remove(gone)
                        os.mknod(gone, stat.S_IFCHR | 0o000, os.makedev(0, 0))
                    continue
                perm = m.mode & 0o777
                if entry.kind == "dir":
                    if os.path.lexists(target) and not os.path.isdir(target):
                        os.unlink(target)
                    os.makedirs(target, 0o755, exist_ok=True)
                    os.chmod(target, perm | 0o700)
                    continue
                _remove(target)
                if entry.kind == "symlink":
                    os.symlink(m.linkname, target)
                elif entry.kind == "hardlink":
                    lparts = [p for p in m.linkname.split("/") if p not in ("", ".")]
                    source = _walk_parent(root, lparts) if lparts else root
                    st = os.lstat(source) if os.path.lexists(source) else None
                    if st is None or not stat.S_ISREG(st.st_mode):
                        raise LayerRefused(f"{m.name[:200]!r}: hard link to "
                                           f"{m.linkname[:200]!r}, not a file of this layer")
                    os.link(source, target, follow_symlinks=False)
                else:
                    src = tar.extractfile(m)
                    assert src is not None
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                 0o600)
                    with os.fdopen(fd, "wb") as out:
                        while chunk := src.read(_copy_bytes):
                            written += len(chunk)
                            if written > limits.registry_image_bytes_max:
                                raise LayerRefused(
                                    f"over {limits.registry_image_bytes_max} bytes unpacked")
                            out.write(chunk)
                    os.chmod(target, perm)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return written


class LayerCache:
    """``<state>/images``: ``blobs/<hex>.part-<pid>`` (a layer arriving), ``layers/<hex>`` (unpacked,
    read-only to environments), ``layers/<hex>.measure`` (its tree digest at unpack),
    ``layers/<hex>.size`` (its unpacked bytes).

    Bounded by ``agent_layer_cache_bytes_max``: environments hold the layers they run on
    (:meth:`acquire` / :meth:`release`, by environment id); after an unpack and after a release
    the least recently used layers no environment holds are forgotten until the cache fits
    (the decision is ``core.layer_cache.evictions``). ``put`` runs in threads and ``acquire`` on
    the event loop, so the index, the holds and the eviction's rename out of ``layers/`` happen
    under one lock: a layer is either held (never evicted) or gone from ``layers/`` before any
    ``acquire`` can see it missing. A create that finds a layer gone answers ``LayerMissing`` and
    the frontend streams it again."""

    def __init__(self, state_dir: str, limits: Limits = DEFAULT_LIMITS) -> None:
        self.root = os.path.join(state_dir, "images")
        self.blobs = os.path.join(self.root, "blobs")
        self.layers = os.path.join(self.root, "layers")
        os.makedirs(self.blobs, exist_ok=True)
        os.makedirs(self.layers, exist_ok=True)
        self.limits = limits
        self._hashes: dict[str, Any] = {}  # hex -> running sha256 of blobs/<hex>.part
        self.counters = {"layers_unpacked": 0, "layers_refused": 0, "blob_bytes_in": 0,
                         "layers_evicted": 0, "bytes_evicted": 0}
        self._lock = threading.Lock()
        self._index: dict[str, list[int]] = {}  # hex -> [unpacked bytes, last used (ms)]
        self._holds: dict[str, tuple[str, ...]] = {}  # env id -> hexes it runs on
        self.over_bytes = 0  # over the limit after the last decision (layers in use)
        self.sweep()
        self._load_index()
        self._evict(frozenset())

    def _load_index(self) -> None:
        """The layers on disk at start: sizes from ``.size`` (measured now for a layer from
        before sizes were recorded), recency from the directory's mtime."""
        for entry in os.listdir(self.layers):
            path = os.path.join(self.layers, entry)
            if len(entry) != 64 or not os.path.isdir(path) or os.path.islink(path):
                continue
            try:
                with open(path + ".size") as f:
                    size = int(f.read().strip())
            except (OSError, ValueError):
                size = _tree_bytes(path)
                with open(path + ".size", "w") as f:
                    f.write(str(size))
            self._index[entry] = [size, int(os.lstat(path).st_mtime * 1000)]

    def sweep(self) -> None:
        """Partial blobs and half-unpacked trees of an earlier process are removed at start
        (those of a process still alive — the predecessor during a live update — are its)."""
        for d in (self.blobs, self.layers):
            for entry in os.listdir(d):
                _, sep, rest = entry.partition(".part-") if ".part-" in entry \
                    else entry.partition(".tmp-")
                if sep:
                    pid = rest.split("-", 1)[0].split(".", 1)[0]
                    if (pid.isdigit() and int(pid) != os.getpid()
                            and os.path.exists(f"/proc/{pid}")):
                        continue
                    path = os.path.join(d, entry)
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(path)

    def statistics(self) -> dict[str, int]:
        with self._lock:
            return {"cached": len(self._index),
                    "bytes": sum(v[0] for v in self._index.values()),
                    "bytes_max": self.limits.agent_layer_cache_bytes_max,
                    "in_use": len(self._users()), "over_bytes": self.over_bytes,
                    **self.counters}

    def layer_dir(self, digest: str) -> str:
        return os.path.join(self.layers, hex_of(digest))

    def have(self, digest: str) -> bool:
        hexd = hex_of(digest)
        with self._lock:
            return hexd in self._index

    def acquire(self, env_id: str, digests: list[str]) -> list[str]:
        """Hold every layer of an image for environment ``env_id`` (until :meth:`release`), or
        none: ``LayerMissing`` names the first one the cache lacks. Returns their dirs."""
        hexes = tuple(hex_of(d) for d in digests)
        now = _now_ms()
        with self._lock:
            assert env_id not in self._holds, env_id
            for hexd, digest in zip(hexes, digests, strict=True):
                if hexd not in self._index:
                    raise OpError("LayerMissing", digest, digest=digest)
            for hexd in hexes:
                self._index[hexd][1] = now
            self._holds[env_id] = hexes
        return [os.path.join(self.layers, h) for h in hexes]

    def adopt(self, env_id: str, dirs: list[str]) -> None:
        """An environment handed over by the previous agent process holds its layers."""
        with self._lock:
            self._holds[env_id] = tuple(os.path.basename(d) for d in dirs
                                        if os.path.basename(d) in self._index)

    def release(self, env_id: str) -> None:
        """The environment is gone (or its create failed): its layers may be forgotten when the
        cache is over its limit. Releasing an environment that holds nothing does nothing."""
        with self._lock:
            if self._holds.pop(env_id, None) is None:
                return
        # Called on the agent's event loop: the evicted trees (maybe gigabytes) are removed
        # by a thread of their own; they already left layers/ (renamed) under the lock.
        doomed = self._evict(frozenset(), remove=False)
        if doomed:
            threading.Thread(target=_remove_trees, args=(doomed,), daemon=True,
                             name="layer-evict").start()

    def _users(self) -> dict[str, int]:
        users: dict[str, int] = {}
        for hexes in self._holds.values():
            for h in hexes:
                users[h] = users.get(h, 0) + 1
        return users

    def _evict(self, protect: frozenset[str], remove: bool = True) -> list[str]:
        """Forget least recently used layers no environment holds until the cache fits; each
        leaves ``layers/`` by rename under the lock, and is removed after it (here, or by the
        caller: the renamed paths are returned)."""
        doomed: list[str] = []
        with self._lock:
            users = self._users()
            decision = layer_cache.evictions(
                [layer_cache.CachedLayer(h, v[0], v[1], users.get(h, 0))
                 for h, v in self._index.items()],
                budget_bytes=self.limits.agent_layer_cache_bytes_max, protect=protect)
            self.over_bytes = decision.over_bytes
            for hexd in decision.evict:
                size = self._index.pop(hexd)[0]
                path = os.path.join(self.layers, hexd)
                for suffix in (".measure", ".size"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path + suffix)
                gone = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
                try:
                    os.rename(path, gone)
                    doomed.append(gone)
                except FileNotFoundError:
                    pass
                self.counters["layers_evicted"] += 1
                self.counters["bytes_evicted"] += size
        if remove:
            _remove_trees(doomed)
        return doomed

    def put(self, digest: str, offset: int, data: bytes, last: bool) -> dict[str, Any]:
        """One chunk of a layer blob (sync: the agent runs it in a thread). The next chunk
        must start where the blob is so far; ``last`` verifies, unpacks and drops the blob."""
        hexd = hex_of(digest)
        if len(data) > self.limits.registry_chunk_bytes_max:
            raise OpError("ChunkTooLarge", f"{len(data)} bytes; at most "
                          f"{self.limits.registry_chunk_bytes_max} per call")
        if self.have(digest):
            return {"have": True, "offset": offset + len(data)}
        part = os.path.join(self.blobs, f"{hexd}.part-{os.getpid()}")
        size = os.path.getsize(part) if os.path.exists(part) else 0
        if offset == 0 and size:
            os.unlink(part)  # a fresh start (the sender restarted)
            self._hashes.pop(hexd, None)
            size = 0
        if offset != size:
            raise OpError("BlobOffset", f"the blob has {size} bytes, not {offset}", offset=size)
        if size + len(data) > self.limits.registry_blob_bytes_max:
            raise OpError("BlobTooLarge", f"over {self.limits.registry_blob_bytes_max} bytes")
        h = self._hashes.get(hexd)
        if h is None:
            h = hashlib.sha256()
            if size:  # an agent restarted mid-blob: hash what is there
                with open(part, "rb") as f:
                    while chunk := f.read(_copy_bytes):
                        h.update(chunk)
            self._hashes[hexd] = h
        with open(part, "ab") as f:
            f.write(data)
        h.update(data)
        self.counters["blob_bytes_in"] += len(data)
        if not last:
            return {"have": False, "offset": size + len(data)}
        self._hashes.pop(hexd, None)
        try:
            if h.hexdigest() != hexd:
                raise OpError("BlobDigestMismatch", f"the layer does not hash to {digest}")
            self._unpack(hexd, part)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
        # The new layer is about to be used by the create that asked for it: protected from
        # this decision (it is held once that create runs).
        self._evict(frozenset({hexd}))
        return {"have": True, "offset": size + len(data)}

    def _unpack(self, hexd: str, part: str) -> None:
        from ..security import attestation

        dest = os.path.join(self.layers, hexd)
        tmp = f"{dest}.tmp-{os.getpid()}-{time.monotonic_ns()}"
        try:
            with open(part, "rb") as f:
                written = unpack_layer(f, tmp, self.limits)
            digest = attestation.measure_tree(tmp)
            with open(tmp + ".measure", "w") as f:
                f.write(digest)
            with open(tmp + ".size", "w") as f:
                f.write(str(written))
            with self._lock:
                os.rename(tmp + ".size", dest + ".size")
                os.rename(tmp + ".measure", dest + ".measure")
                os.rename(tmp, dest)
                self._index[hexd] = [written, _now_ms()]
        except LayerRefused as e:
            self.counters["layers_refused"] += 1
            raise OpError("LayerRefused", str(e)) from e
        except (tarfile.TarError, gzip.BadGzipFile, EOFError) as e:
            self.counters["layers_refused"] += 1
            raise OpError("LayerRefused", f"not a layer tar: {e}") from e
        except OSError as e:
            raise OpError("LayerUnpackFailed", f"could not unpack the layer: {e}") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            for suffix in (".measure", ".size"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp + suffix)
        self.counters["layers_unpacked"] += 1

    def check_image_size(self, digests: list[str]) -> None:
        """Lambda's 10 GB limit on an image, uncompressed: the layers' unpacked bytes (each
        recorded at unpack) added up; refused before any environment starts from it."""
        hexes = [hex_of(d) for d in digests]
        with self._lock:
            total = sum(self._index[h][0] for h in hexes if h in self._index)
        if total > self.limits.registry_image_bytes_max:
            raise OpError("ImageTooLarge", f"the image unpacks to {total} bytes; at most "
                          f"{self.limits.registry_image_bytes_max}")

    def drop(self, digest: str) -> None:
        """Forget one layer now (no environment may hold it): a cold-cache benchmark's reset."""
        hexd = hex_of(digest)
        path = self.layer_dir(digest)
        with self._lock:
            assert hexd not in self._users(), f"{digest} is in use"
            self._index.pop(hexd, None)
            doomed = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
            try:
                os.rename(path, doomed)
            except FileNotFoundError:
                pass
            for suffix in (".measure", ".size"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path + suffix)
        shutil.rmtree(doomed, ignore_errors=True)


def _remove_trees(paths: list[str]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _tree_bytes(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
