from __future__ import annotations

import io
import os
import zipfile

import pytest


def make_zip(files: dict[str, str | bytes]) -> bytes:
    """A reproducible zip: fixed timestamps, so the same files always give the same digest
    (a zip stamped with the wall clock changes digest when a second ticks over)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, content)
    return buf.getvalue()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="integration tests need root (namespaces, cgroups, seccomp)")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)
