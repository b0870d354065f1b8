"""Unpacking a bundle onto disk: the shell around ``core/bundle.py``'s checked plan."""

from __future__ import annotations

import os
import shutil

from ..core.bundle import BundleInfo, entry_chunks, sha256_hex, unpack_plan
from ..core.errors import invalid
from ..core.limits import DEFAULT_LIMITS, Limits


def extract_zip(data: bytes, dest: str, limits: Limits = DEFAULT_LIMITS) -> BundleInfo:
    """Extract into ``dest`` (which must not exist yet), with the checks of
    :func:`cellcloud.core.bundle.inspect_zip` made on the way (one pass over the data). On any
    failure — a malformed member, a full disk — ``dest`` is removed: nothing half-written
    stays behind."""
    zf, entries = unpack_plan(data, limits)
    os.makedirs(dest, mode=0o755)
    try:
        written = 0
        root = os.path.realpath(dest)
        for entry in entries:
            target = os.path.realpath(os.path.join(root, entry.rel))
            if target != root and not target.startswith(root + os.sep):
                raise invalid("Unzipped file path escapes the bundle root: "
                              f"{entry.member.filename!r}")
            if entry.is_dir:
                os.makedirs(target, mode=0o755, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            with open(target, "xb") as out:
                for chunk in entry_chunks(zf, entry):
                    written += len(chunk)
                    out.write(chunk)
            os.chmod(target, entry.perm)
        assert written <= limits.unzipped_bytes_max  # declared sizes are capped, real == declared
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return BundleInfo(sha256_hex(data), len(data), written, len(entries))
