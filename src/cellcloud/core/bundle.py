"""Code bundles: validation of untrusted zips (malformed, zip-slip, zip bombs) and safe extraction.

A bundle is validated twice: by the frontend before it is accepted, and by the agent before it is
unpacked (the agent trusts nothing that crosses its API).
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import stat
import zipfile
from dataclasses import dataclass

from .errors import LambdaError, invalid
from .limits import DEFAULT_LIMITS, Limits

_CHUNK = 1 << 20


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


def inspect_zip(data: bytes, limits: Limits = DEFAULT_LIMITS) -> BundleInfo:
    """Validate a zip without extracting it. Raises a Lambda-shaped error for any bad input."""
    if len(data) > limits.zip_bytes_max:
        raise LambdaError(
            413,
            "RequestEntityTooLargeException",
            f"Zipped code size {len(data)} exceeds the maximum of {limits.zip_bytes_max} bytes",
        )
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as e:
        raise invalid(f"Could not unzip uploaded file. Please check your file, then try to upload again. ({e})") from e
    if len(infos) > limits.zip_members_max:
        raise invalid(f"Zip has {len(infos)} entries; the maximum is {limits.zip_members_max}")
    total = 0
    for info in infos:
        _safe_member_path(info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise invalid(f"Symbolic links are not allowed in a bundle: {info.filename!r}")
        total += info.file_size
        if total > limits.unzipped_bytes_max:
            raise invalid(
                f"Unzipped size must be smaller than {limits.unzipped_bytes_max} bytes"
            )
    return BundleInfo(sha256_hex(data), len(data), total, len(infos))


def extract_zip(data: bytes, dest: str, limits: Limits = DEFAULT_LIMITS) -> BundleInfo:
    """Extract into ``dest`` (which must not exist yet), counting real bytes, not declared ones:
    a zip can lie about its sizes, so the bomb check is repeated on what actually comes out."""
    info = inspect_zip(data, limits)
    zf = zipfile.ZipFile(io.BytesIO(data))
    os.makedirs(dest, mode=0o755)
    written = 0
    root = os.path.realpath(dest)
    for member in zf.infolist():
        rel = _safe_member_path(member.filename)
        target = os.path.realpath(os.path.join(root, rel))
        if target != root and not target.startswith(root + os.sep):
            raise invalid(f"Unzipped file path escapes the bundle root: {member.filename!r}")
        if member.is_dir():
            os.makedirs(target, mode=0o755, exist_ok=True)
            continue
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        mode = (member.external_attr >> 16) & 0o777
        # Executable bits are kept (a custom runtime's bootstrap); write bits never are.
        perm = 0o755 if mode & 0o111 else 0o644
        try:
            with zf.open(member) as src, open(target, "wb") as out:
                while chunk := src.read(_CHUNK):
                    written += len(chunk)
                    if written > limits.unzipped_bytes_max:
                        raise invalid(
                            f"Unzipped size must be smaller than {limits.unzipped_bytes_max} bytes"
                        )
                    out.write(chunk)
        except (zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError) as e:
            raise invalid(f"Could not unzip uploaded file: {member.filename!r}: {e}") from e
        os.chmod(target, perm)
    return info
