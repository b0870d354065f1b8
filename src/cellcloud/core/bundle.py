"""Code bundles: validation of untrusted zips (malformed, zip-slip, zip bombs) and safe extraction.

A bundle is validated twice: by the frontend before it is accepted, and by the agent before it is
unpacked (the agent trusts nothing that crosses its API). Both do the same thing to every member:
the validation decompresses it (into nothing), the extraction into a file. So a zip the frontend
accepted is a zip every agent can unpack: no member whose sizes lie, whose CRC is wrong, whose
compression method is unknown, whose data is corrupt, whose path escapes the root, is the root,
or collides with another member's path (a file ``lib`` beside ``lib/x.py``, a name twice).
"""

from __future__ import annotations

import copy
import hashlib
import io
import lzma
import posixpath
import stat
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import LambdaError, invalid
from .limits import DEFAULT_LIMITS, Limits

_CHUNK = 1 << 20

#: What reading a member's data can raise for a malformed zip (never for a valid one).
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, NotImplementedError,
                RuntimeError, ValueError, OSError)


@dataclass(frozen=True)
class BundleInfo:
    sha256: str
    zip_bytes: int
    unzipped_bytes: int
    members: int


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _safe_member_path(name: str) -> str:
    """The member's path relative to the bundle root, or an error for escaping/absolute paths."""
    if "\x00" in name or "\\" in name:
        raise invalid(f"Unzipped file path is not allowed: {name!r}")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise invalid(f"Unzipped file path is absolute, which is not allowed: {name!r}")
    norm = posixpath.normpath(name)
    if norm == ".." or norm.startswith("../") or "/../" in f"/{name}/":
        raise invalid(f"Unzipped file path escapes the bundle root (zip-slip): {name!r}")
    return norm


def _unzip_error(name: str, why: object) -> LambdaError:
    return invalid(f"Could not unzip uploaded file: member {name!r}: {why}. "
                   "Please check your file, then try to upload again.")


def _open(data: bytes) -> list[zipfile.ZipInfo]:
    try:
        return zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as e:
        raise invalid(f"Could not unzip uploaded file. Please check your file, then try to "
                      f"upload again. ({e})") from e


def check_members(infos: list[zipfile.ZipInfo], limits: Limits = DEFAULT_LIMITS
                  ) -> list[tuple[zipfile.ZipInfo, str]]:
    """Every member's path relative to the root, after the checks that need no data: count,
    declared sizes, zip-slip, absolute paths, symlinks, the root itself as a file, two members
    at one path, a file where another member needs a directory."""
    if len(infos) > limits.zip_members_max:
        raise invalid(f"Zip has {len(infos)} entries; the maximum is {limits.zip_members_max}")
    total = 0
    files: dict[str, str] = {}  # relative path -> member name
    dirs: dict[str, str] = {}  # every directory some member needs -> a member that needs it
    out = []
    for info in infos:
        name = info.filename
        rel = _safe_member_path(name)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise invalid(f"Symbolic links are not allowed in a bundle: {name!r}")
        total += info.file_size
        if total > limits.unzipped_bytes_max:
            raise invalid(f"Unzipped size must be smaller than {limits.unzipped_bytes_max} bytes")
        if info.is_dir():
            if rel != ".":
                dirs.setdefault(rel, name)
        elif rel == ".":
            raise invalid(f"Unzipped file path is the bundle root itself: {name!r}")
        elif rel in files:
            raise invalid(f"Zip has two members at one path: {files[rel]!r} and {name!r}")
        else:
            files[rel] = name
        parent = posixpath.dirname(rel)
        while parent and parent not in dirs:
            dirs[parent] = name
            parent = posixpath.dirname(parent)
        out.append((info, rel))
    for rel, needed_by in dirs.items():
        if rel in files:
            raise invalid(f"Zip member {files[rel]!r} is a file where {needed_by!r} needs a "
                          "directory")
    return out


def _chunks(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[bytes]:
    """A member's real bytes, checked against what the central directory declares: its size,
    its CRC-32 (zipfile's own check, over everything the member really holds) and its
    compression method. At most one byte more than declared is read (zip bombs stay bounded).
    Raises a Lambda-shaped error naming the member."""
    name = info.filename
    # zipfile silently drops what a member holds beyond its declared size; reading with one
    # byte of room makes a member that is bigger than it says show up as one byte too many.
    probe = copy.copy(info)
    probe.file_size = info.file_size + 1
    got = 0
    try:
        with zf.open(probe) as src:
            while chunk := src.read(_CHUNK):
                got += len(chunk)
                if got > info.file_size:
                    raise _unzip_error(name, f"it holds more than its declared size of "
                                             f"{info.file_size} bytes")
                yield chunk
    except LambdaError:
        raise
    except _READ_ERRORS as e:
        raise _unzip_error(name, e) from e
    if got != info.file_size:
        raise _unzip_error(name, f"declared size {info.file_size} bytes, real size {got} bytes")


def _check_zip_bytes(data: bytes, limits: Limits) -> None:
    if len(data) > limits.zip_bytes_max:
        raise LambdaError(
            413,
            "RequestEntityTooLargeException",
            f"Zipped code size {len(data)} exceeds the maximum of {limits.zip_bytes_max} bytes",
        )


def inspect_zip(data: bytes, limits: Limits = DEFAULT_LIMITS) -> BundleInfo:
    """Validate a zip by decompressing every member (into nothing: no file is written), so a
    zip that passes unpacks on every agent. Raises a Lambda-shaped error for any bad input."""
    _check_zip_bytes(data, limits)
    members = check_members(_open(data), limits)
    zf = zipfile.ZipFile(io.BytesIO(data))
    total = 0
    for info, _ in members:
        for chunk in _chunks(zf, info):
            total += len(chunk)
    return BundleInfo(sha256_hex(data), len(data), total, len(members))


@dataclass(frozen=True)
class Entry:
    """One member of a checked zip, as it is to be written below a bundle root."""

    member: zipfile.ZipInfo
    rel: str  # the normalised path below the root
    is_dir: bool
    # Executable bits are kept (a custom runtime's bootstrap); write bits never are.
    perm: int


def unpack_plan(data: bytes, limits: Limits = DEFAULT_LIMITS
                ) -> tuple[zipfile.ZipFile, list[Entry]]:
    """What an unpack writes, after the checks of :func:`inspect_zip` on the names and declared
    sizes; each file's bytes come from :func:`entry_chunks`, which checks them on the way. The
    writing itself is the shell's (``sandbox/unpack.py``): this module does no I/O."""
    _check_zip_bytes(data, limits)
    members = check_members(_open(data), limits)
    zf = zipfile.ZipFile(io.BytesIO(data))
    out = []
    for info, rel in members:
        mode = (info.external_attr >> 16) & 0o777
        out.append(Entry(info, rel, info.is_dir(), 0o755 if mode & 0o111 else 0o644))
    return zf, out


def entry_chunks(zf: zipfile.ZipFile, entry: Entry) -> Iterator[bytes]:
    return _chunks(zf, entry.member)
