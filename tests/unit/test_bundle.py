import io
import os
import stat
import zipfile

import pytest

from cellcloud.core.bundle import inspect_zip
from cellcloud.core.errors import LambdaError
from cellcloud.core.limits import Limits
from cellcloud.sandbox.unpack import extract_zip


def zip_of(entries: dict[str, bytes], *, symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/shadow")
    return buf.getvalue()


def test_valid_zip() -> None:
    info = inspect_zip(zip_of({"app.py": b"x = 1\n", "pkg/mod.py": b""}))
    assert info.members == 2 and info.unzipped_bytes == 6 and len(info.sha256) == 64


@pytest.mark.parametrize("data", [b"", b"not a zip", b"PK\x03\x04garbage"])
def test_malformed(data: bytes) -> None:
    with pytest.raises(LambdaError) as e:
        inspect_zip(data)
    assert e.value.type == "InvalidParameterValueException"


@pytest.mark.parametrize("name", ["../evil.py", "a/../../evil.py", "/etc/evil", "a\\..\\b"])
def test_zip_slip(name: str) -> None:
    with pytest.raises(LambdaError) as e:
        inspect_zip(zip_of({name: b"x"}))
    assert e.value.status == 400


def test_symlinks_rejected() -> None:
    with pytest.raises(LambdaError):
        inspect_zip(zip_of({"app.py": b""}, symlink="link"))


def test_zip_bomb_by_declared_size() -> None:
    limits = Limits(unzipped_bytes_max=1000)
    with pytest.raises(LambdaError) as e:
        inspect_zip(zip_of({"big": b"\0" * 2000}), limits)
    assert "Unzipped size" in e.value.message


def test_zip_over_zipped_limit() -> None:
    with pytest.raises(LambdaError) as e:
        inspect_zip(zip_of({"a": os.urandom(2000)}), Limits(zip_bytes_max=1000))
    assert e.value.status == 413


def test_extract_counts_real_bytes(tmp_path: str) -> None:
    # A zip whose central directory understates the size: extraction still stops at the limit.
    data = bytearray(zip_of({"big": b"\0" * 5000}))
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24:cd + 28] = (10).to_bytes(4, "little")  # uncompressed size in the CD entry
    with pytest.raises(LambdaError):
        extract_zip(bytes(data), os.path.join(str(tmp_path), "out"), Limits(unzipped_bytes_max=1000))


def test_extract_layout_and_modes(tmp_path: str) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("app.py", "x")
        info = zipfile.ZipInfo("bootstrap")
        info.external_attr = (stat.S_IFREG | 0o777) << 16
        zf.writestr(info, "#!/bin/sh\n")
    dest = os.path.join(str(tmp_path), "b")
    extract_zip(buf.getvalue(), dest)
    assert stat.S_IMODE(os.stat(os.path.join(dest, "app.py")).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(os.path.join(dest, "bootstrap")).st_mode) == 0o755


# -- issue #11: zips whose members cannot be unpacked are refused at upload -----------------
from tests.malformed_zips import APP, malformed  # noqa: E402

MALFORMED = malformed()


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_member_refused_by_inspect(kind: str) -> None:
    data, why = MALFORMED[kind]
    with pytest.raises(LambdaError) as e:
        inspect_zip(data)
    assert e.value.status == 400 and e.value.type == "InvalidParameterValueException"
    assert why in e.value.message


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_member_refused_by_extract_leaves_nothing(kind: str, tmp_path: str) -> None:
    data, why = MALFORMED[kind]
    dest = os.path.join(str(tmp_path), "out")
    with pytest.raises(LambdaError) as e:
        extract_zip(data, dest)
    assert why in e.value.message
    assert os.listdir(str(tmp_path)) == []


def test_what_inspect_accepts_extract_unpacks(tmp_path: str) -> None:
    from tests.conftest import make_zip

    data = make_zip({"app.py": APP, "lib/": "", "lib/x.py": "y", "./": "", "a/./b.py": "z"})
    info = inspect_zip(data)
    dest = os.path.join(str(tmp_path), "out")
    assert extract_zip(data, dest).unzipped_bytes == info.unzipped_bytes
    assert sorted(os.listdir(dest)) == ["a", "app.py", "lib"]


def test_extract_removes_partial_tree_on_os_error(tmp_path: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A full disk half-way: the files already written must not stay (issue #11: ~100 MiB per
    # invoke leaked from a 51 KB zip).
    import errno

    import cellcloud.sandbox.unpack as bundle

    calls = []
    real_chmod = os.chmod

    def chmod(path: str, mode: int) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_chmod(path, mode)

    monkeypatch.setattr(bundle.os, "chmod", chmod)
    dest = os.path.join(str(tmp_path), "out")
    with pytest.raises(OSError):
        extract_zip(zip_of({"a.py": b"1", "b.py": b"2", "c.py": b"3"}), dest)
    assert len(calls) == 2  # one file was complete, the second failed
    assert os.listdir(str(tmp_path)) == []
