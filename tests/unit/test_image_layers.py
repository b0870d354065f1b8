"""The agent's layer cache (agent/images.py): chunked, digest-checked blobs, and the unpack
that refuses every unsafe entry of the issue's list (nothing of a refused layer kept)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile

import pytest

from cellcloud.agent.images import LayerCache, LayerRefused, unpack_layer
from cellcloud.core.limits import Limits
from cellcloud.transport import OpError


def _tar(entries: list[tarfile.TarInfo], data: dict[str, bytes] | None = None,
         gz: bool = True) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info in entries:
            body = (data or {}).get(info.name)
            if body is not None:
                info.size = len(body)
            tar.addfile(info, io.BytesIO(body) if body is not None else None)
    return gzip.compress(raw.getvalue()) if gz else raw.getvalue()


def _e(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, link: str = "",
       devmajor: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    info.devmajor = devmajor
    return info


def _unpack(blob: bytes, tmp_path: os.PathLike[str]) -> str:
    dest = os.path.join(tmp_path, "out")
    unpack_layer(io.BytesIO(blob), dest)
    return dest


def test_files_dirs_links_and_whiteouts_unpack(tmp_path: os.PathLike[str]) -> None:
    blob = _tar([_e("usr/", tarfile.DIRTYPE, 0o755), _e("usr/bin/tool", mode=0o755),
                 _e("usr/bin/alias", tarfile.SYMTYPE, link="/usr/bin/tool"),
                 _e("usr/bin/hard", tarfile.LNKTYPE, link="usr/bin/tool"),
                 _e("etc/.wh.gone"), _e("var/.wh..wh..opq")],
                {"usr/bin/tool": b"#!x", "etc/.wh.gone": b"", "var/.wh..wh..opq": b""})
    dest = _unpack(blob, tmp_path)
    assert open(os.path.join(dest, "usr/bin/tool"), "rb").read() == b"#!x"
    assert os.stat(os.path.join(dest, "usr/bin/tool")).st_mode & 0o777 == 0o755
    assert os.readlink(os.path.join(dest, "usr/bin/alias")) == "/usr/bin/tool"
    assert os.stat(os.path.join(dest, "usr/bin/hard")).st_ino == \
        os.stat(os.path.join(dest, "usr/bin/tool")).st_ino
    st = os.lstat(os.path.join(dest, "etc/gone"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0  # an overlayfs whiteout
    assert not os.path.exists(os.path.join(dest, "etc/.wh.gone"))
    assert os.getxattr(os.path.join(dest, "var"), "trusted.overlay.opaque") == b"y"


BAD = {
    "dotdot": ([_e("../escape")], "leaves the root"),
    "dotdot_inside": ([_e("a/../../escape")], "leaves the root"),
    "absolute_climbing": ([_e("/../../etc/x")], "leaves the root"),
    "symlink_out": ([_e("a", tarfile.SYMTYPE, link="../../etc/shadow")], "leaves the root"),
    "symlink_abs_climb": ([_e("a", tarfile.SYMTYPE, link="/../../etc")], "leaves the root"),
    "hardlink_out": ([_e("a", tarfile.LNKTYPE, link="../../etc/shadow")], "leaves the root"),
    "hardlink_to_host_abs": ([_e("a", tarfile.LNKTYPE, link="/etc/shadow")],
                             "not a file of this layer"),
    "through_symlink": ([_e("d", tarfile.SYMTYPE, link="/tmp"), _e("d/planted")],
                        "goes through a symlink"),
    "hardlink_via_symlink": ([_e("d", tarfile.SYMTYPE, link="/etc"),
                              _e("x", tarfile.LNKTYPE, link="d/shadow")],
                             "goes through a symlink"),
    "chardev": ([_e("dev/mem", tarfile.CHRTYPE, devmajor=1)], "chardev"),
    "blockdev": ([_e("dev/sda", tarfile.BLKTYPE, devmajor=8)], "blockdev"),
    "fifo": ([_e("pipe", tarfile.FIFOTYPE)], "fifo"),
    "setuid": ([_e("bin/su", mode=0o4755)], "setuid/setgid"),
    "setgid": ([_e("bin/sg", mode=0o2755)], "setuid/setgid"),
    "whiteout_escape": ([_e("../.wh.etc")], "leaves the root"),
    "whiteout_dotdot": ([_e("a/.wh...")], "whiteout names no entry"),
    "whiteout_empty": ([_e("a/.wh.")], "whiteout names no entry"),
    "whiteout_symlink": ([_e("a/.wh.x", tarfile.SYMTYPE, link="/etc")], "empty regular file"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_unsafe_layer_refused_and_nothing_kept(case: str, tmp_path: os.PathLike[str]) -> None:
    entries, why = BAD[case]
    dest = os.path.join(tmp_path, "out")
    with pytest.raises(LayerRefused, match=why):
        unpack_layer(io.BytesIO(_tar(entries)), dest)
    assert not os.path.exists(dest)
    assert not os.path.exists("/tmp/planted")


def test_entry_count_limit(tmp_path: os.PathLike[str]) -> None:
    limits = Limits(image_layer_entries_max=3)
    blob = _tar([_e(f"f{i}") for i in range(4)])
    with pytest.raises(LayerRefused, match="more than 3 entries"):
        unpack_layer(io.BytesIO(blob), os.path.join(tmp_path, "out"), limits)


def test_cache_chunks_verify_digest_and_refuse_bad_offsets(tmp_path: os.PathLike[str]) -> None:
    cache = LayerCache(str(tmp_path), Limits(registry_chunk_bytes_max=64))
    blob = _tar([_e("hello")], {"hello": os.urandom(300)}, gz=False)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    with pytest.raises(OpError, match="per call"):
        cache.put(digest, 0, blob[:65], False)
    with pytest.raises(OpError) as e:
        cache.put(digest, 64, blob[64:128], False)  # nothing there yet
    assert e.value.type == "BlobOffset" and e.value.data["offset"] == 0
    off = 0
    while off < len(blob):
        piece = blob[off:off + 64]
        off = cache.put(digest, off, piece, off + len(piece) >= len(blob))["offset"]
    assert cache.have(digest)
    assert open(os.path.join(cache.layer_dir(digest), "hello"), "rb").read() == blob[512:812]
    assert os.listdir(cache.blobs) == []  # the blob goes once unpacked


def test_cache_refuses_a_blob_that_does_not_match_its_digest(tmp_path: os.PathLike[str]) -> None:
    cache = LayerCache(str(tmp_path))
    blob = _tar([_e("x")], {"x": b"1"})
    wrong = "sha256:" + hashlib.sha256(b"other").hexdigest()
    with pytest.raises(OpError) as e:
        cache.put(wrong, 0, blob, True)
    assert e.value.type == "BlobDigestMismatch"
    assert not cache.have(wrong) and os.listdir(cache.blobs) == []


def test_cache_refused_layer_leaves_nothing(tmp_path: os.PathLike[str]) -> None:
    cache = LayerCache(str(tmp_path))
    blob = _tar([_e("ok"), _e("../../escape")], {"ok": b"1"})
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    with pytest.raises(OpError) as e:
        cache.put(digest, 0, blob, True)
    assert e.value.type == "LayerRefused"
    assert os.listdir(cache.layers) == [] and os.listdir(cache.blobs) == []


def test_an_image_over_the_unpacked_limit_is_refused(tmp_path: os.PathLike[str]) -> None:
    """Lambda's 10 GB (uncompressed) is a limit on the whole image: each layer fits, together
    they do not (here with a limit of 1,000 bytes)."""
    cache = LayerCache(str(tmp_path), Limits(registry_image_bytes_max=1000))
    digests = []
    for i in range(2):
        blob = _tar([_e(f"f{i}")], {f"f{i}": os.urandom(600)})
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        cache.put(digest, 0, blob, True)
        digests.append(digest)
    cache.check_image_size(digests[:1])
    with pytest.raises(OpError) as e:
        cache.check_image_size(digests)
    assert e.value.type == "ImageTooLarge"


def test_a_layer_over_the_unpacked_limit_is_refused(tmp_path: os.PathLike[str]) -> None:
    blob = _tar([_e("big")], {"big": os.urandom(1200)})
    with pytest.raises(LayerRefused, match="over 1000 bytes unpacked"):
        unpack_layer(io.BytesIO(blob), os.path.join(tmp_path, "out"),
                     Limits(registry_image_bytes_max=1000))
    assert not os.path.exists(os.path.join(tmp_path, "out"))


def test_absolute_entry_names_are_taken_inside_the_layer(tmp_path: os.PathLike[str]) -> None:
    """The issue's "absolute paths": a name like ``/etc/x`` is stripped of its leading ``/``
    (as docker and containerd unpack it) and lands in the layer, never on the host; one that
    climbs (``/../x``) is refused (BAD above)."""
    name = f"cellcloud-abs-{os.getpid()}"
    blob = _tar([_e(f"/tmp/{name}"), _e(f"//etc/{name}")],
                {f"/tmp/{name}": b"in", f"//etc/{name}": b"in"})
    dest = _unpack(blob, tmp_path)
    assert open(os.path.join(dest, "tmp", name), "rb").read() == b"in"
    assert open(os.path.join(dest, "etc", name), "rb").read() == b"in"
    assert not os.path.exists(f"/tmp/{name}") and not os.path.exists(f"/etc/{name}")
