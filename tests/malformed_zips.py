"""Zips whose members cannot be unpacked, each built from a valid one by editing its bytes the
way a broken or hostile zip tool would (issue #11). Shared by the unit, SDK and boto3 tests."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

from tests.conftest import make_zip

APP = 'def handler(event, context):\n    return {"ok": True}\n'
DATA = b"hello world " * 100

# field -> (offset in the central directory entry, offset in the local file header)
_FIELDS = {"method": (10, 8), "crc": (16, 14), "csize": (20, 18), "usize": (24, 22)}


def _patch(data: bytes, name: str, **fields: int) -> bytes:
    """Set fields of member ``name`` in both its central directory entry and its local header."""
    out = bytearray(data)
    for sig, name_len_at, name_at, which in ((b"PK\x01\x02", 28, 46, 0), (b"PK\x03\x04", 26, 30, 1)):
        i = out.find(sig)
        while i >= 0:
            n = struct.unpack_from("<H", out, i + name_len_at)[0]
            if bytes(out[i + name_at:i + name_at + n]).decode() == name:
                for field, value in fields.items():
                    struct.pack_into("<H" if field == "method" else "<I", out,
                                     i + _FIELDS[field][which], value)
            i = out.find(sig, i + 4)
    return bytes(out)


def _stored(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, content in files.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), content)
    return buf.getvalue()


def malformed() -> dict[str, tuple[bytes, str]]:
    """kind -> (zip, a phrase the refusal must contain)."""
    deflated = make_zip({"app.py": APP, "data.txt": DATA})
    stored = _stored({"app.py": APP.encode(), "data.txt": DATA})
    n = len(DATA)
    crc = zlib.crc32(DATA)
    return {
        "size-less": (_patch(deflated, "data.txt", usize=n - 10), "data.txt"),
        "size-less-crc-matching": (_patch(deflated, "data.txt", usize=n - 10,
                                          crc=zlib.crc32(DATA[:-10])), "data.txt"),
        "size-more": (_patch(deflated, "data.txt", usize=n + 10), "declared size"),
        "stored-size-less": (_patch(stored, "data.txt", usize=n - 10,
                                    crc=zlib.crc32(DATA[:-10])), "data.txt"),
        "stored-size-more": (_patch(stored, "data.txt", usize=n + 10), "declared size"),
        "bad-crc": (_patch(deflated, "data.txt", crc=crc ^ 1), "CRC"),
        "file-beside-dir": (make_zip({"app.py": APP, "lib": "x", "lib/x.py": "y"}),
                            "needs a directory"),
        "file-beside-dir-entry": (make_zip({"app.py": APP, "lib/": "", "lib": "y"}),
                                  "needs a directory"),
        "dot": (make_zip({"app.py": APP, ".": "x"}), "bundle root"),
        "same-path-twice": (make_zip({"app.py": APP, "a/b.py": "1", "a//b.py": "2"}),
                            "two members at one path"),
        "unknown-method": (_patch(deflated, "data.txt", method=99), "compression method"),
        "corrupt-deflate": (_patch_data(deflated, "data.txt"), "data.txt"),
    }


def _patch_data(data: bytes, name: str) -> bytes:
    """Garbage in the member's compressed data (its CRC and sizes left as they were)."""
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(name)
    out = bytearray(data)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start, start + min(16, info.compress_size)):
        out[i] ^= 0xA5
    return bytes(out)
