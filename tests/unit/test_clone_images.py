"""A tenant migration refuses image functions by name (their layers are in the cell's
registry, which does not move yet) instead of failing on a bundle that does not exist."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from cellcloud.core.limits import DEFAULT_LIMITS
from cellcloud.frontend.clone import CloneError, export_tenant
from cellcloud.frontend.store import FunctionRecord


def test_export_refuses_an_image_function_by_name() -> None:
    rec = FunctionRecord(account="1", name="imgfn", runtime="", handler="",
                         code_sha256="ab" * 32, code_size=1, package_type="Image",
                         image={"digest": "sha256:" + "ab" * 32})

    def no_bundle(sha: str) -> bytes:
        raise FileNotFoundError(sha)

    store: Any = SimpleNamespace(
        list_page=lambda account, after, n: [rec], list_provisioned=lambda: [],
        list_versions=lambda account, name, after, n: [],
        list_aliases=lambda account, name, after, n: [],
        version_counter=lambda account, name: 0, get_concurrency=lambda account, name: None,
        list_urls=lambda account, name, after, n: [],
        get_policy=lambda account, kind, name, q: None, get_bundle=no_bundle)
    with pytest.raises(CloneError, match="imgfn is a container-image function"):
        export_tenant(SimpleNamespace(store=store, limits=DEFAULT_LIMITS), "1")
