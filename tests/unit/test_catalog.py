"""The function catalog (frontend/functions.py) apart from the invoke path: its clock is
injected, and what the invoke side must do when the catalog changes goes through the
``Environments`` it was given."""

from __future__ import annotations

import base64
import io
import time
import zipfile
from typing import Any

import pytest

from cellcloud.core import catalog_rules
from cellcloud.core.errors import LambdaError
from cellcloud.core.limits import Limits
from cellcloud.frontend.cell import Cell
from cellcloud.frontend.functions import Catalog
from cellcloud.frontend.store import SqliteFunctionStore

ACCOUNT = "111111111111"
T0 = 1_700_000_000.25  # 2023-11-14T22:13:20.250Z


def code(tag: str = "a") -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("app.py", f"def handler(e, c):\n    return {tag!r}\n")
    return base64.b64encode(buf.getvalue()).decode()


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Envs:
    """Records what the catalog asks of the invoke side."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.ready: dict[str, int] = {}

    def retire_function(self, function_key: str) -> None:
        self.calls.append(("retire", function_key))

    def set_provisioned(self, rec: Any, count: int) -> None:
        self.calls.append(("provisioned", (rec.key, count)))

    def provisioned_ready(self, function_key: str) -> int:
        return self.ready.get(function_key, 0)

    def bundles_freed(self, digests: list[str]) -> None:
        self.calls.append(("freed", sorted(digests)))


def create(catalog: Catalog | Cell, name: str = "f", tag: str = "a") -> dict[str, Any]:
    target = catalog.catalog if isinstance(catalog, Cell) else catalog
    return target.create_function(ACCOUNT, {"FunctionName": name, "Runtime": "python3.11",
                                            "Handler": "app.handler",
                                            "Code": {"ZipFile": code(tag)}})


def test_the_cell_passes_its_clock_to_the_catalog(tmp_path: Any) -> None:
    clock = Clock(T0)
    cell = Cell("cell-t", SqliteFunctionStore(str(tmp_path)), {}, clock=clock)
    assert create(cell)["LastModified"] == "2023-11-14T22:13:20.250+0000"
    clock.t = T0 + 3600.5
    out = cell.catalog.update_configuration(ACCOUNT, "f", {"Timeout": 5})
    assert out["LastModified"] == "2023-11-14T23:13:20.750+0000"
    layer = cell.catalog.publish_layer_version(ACCOUNT, "lib", {"Content": {"ZipFile": code()}})
    assert layer["CreatedDate"] == "2023-11-14T23:13:20.750+0000"


def test_the_catalog_tells_the_invoke_side_what_changed(tmp_path: Any) -> None:
    envs = Envs()
    catalog = Catalog(SqliteFunctionStore(str(tmp_path)), envs, region="cc-local-1",
                      clock=Clock(T0))
    create(catalog)
    first = catalog.function(ACCOUNT, "f")
    catalog.update_code(ACCOUNT, "f", {"ZipFile": code("b")})
    # The old record's environments go, and its code, held by nothing now, is freed.
    assert envs.calls == [("retire", first.key), ("freed", [first.code_sha256])]
    envs.calls.clear()

    v1 = catalog.publish_version(ACCOUNT, "f", {})
    key = f"{ACCOUNT}/f/{v1['Version']}/{catalog.function(ACCOUNT, 'f').revision}"
    doc = catalog.put_provisioned(ACCOUNT, "f", v1["Version"],
                                  {"ProvisionedConcurrentExecutions": 2})
    assert envs.calls == [("provisioned", (key, 2))]
    assert doc["Status"] == "IN_PROGRESS" and doc["LastModified"] == "2023-11-14T22:13:20.250+0000"
    envs.ready[key] = 2
    assert catalog.provisioned_doc(ACCOUNT, "f", v1["Version"])["Status"] == "READY"
    assert catalog.provisioned_records() == {key: catalog.version(ACCOUNT, "f", v1["Version"])}
    envs.calls.clear()

    catalog.delete_function(ACCOUNT, "f")
    assert ("provisioned", (key, 0)) in envs.calls
    assert {c[1] for c in envs.calls if c[0] == "retire"} == {
        f"{ACCOUNT}/f/$LATEST/2", key}


def test_a_pinned_bundle_is_freed_when_unpinned(tmp_path: Any) -> None:
    envs = Envs()
    catalog = Catalog(SqliteFunctionStore(str(tmp_path)), envs, region="cc-local-1")
    create(catalog)
    digest = catalog.function(ACCOUNT, "f").code_sha256
    catalog.pin_bundles({digest})
    catalog.delete_function(ACCOUNT, "f")
    assert ("freed", [digest]) not in envs.calls and digest in catalog.bundles_deferred
    catalog.unpin_bundles({digest})
    assert ("freed", [digest]) in envs.calls and not catalog.bundles_deferred
    assert catalog.bundle_pins == {}


def test_catalog_limits_come_from_limits(tmp_path: Any) -> None:
    limits = Limits(tags_per_function_max=1, description_chars_max=3, aliases_per_function_max=1)
    catalog = Catalog(SqliteFunctionStore(str(tmp_path)), Envs(), region="cc-local-1",
                      limits=limits)
    with pytest.raises(LambdaError, match="at most 1 tags"):
        catalog.create_function(ACCOUNT, {"FunctionName": "f", "Runtime": "python3.11",
                                          "Handler": "app.handler", "Code": {"ZipFile": code()},
                                          "Tags": {"a": "1", "b": "2"}})
    create(catalog)
    with pytest.raises(LambdaError, match="less than or equal to 3"):
        catalog.update_configuration(ACCOUNT, "f", {"Description": "four"})
    catalog.create_alias(ACCOUNT, "f", {"Name": "live", "FunctionVersion": "$LATEST"})
    with pytest.raises(LambdaError, match="at most 1 aliases"):
        catalog.create_alias(ACCOUNT, "f", {"Name": "two", "FunctionVersion": "$LATEST"})


@pytest.mark.parametrize("t", [0.0, 1.0, 1.9999, 59.999, T0, T0 + 0.9995, 4_102_444_799.999])
def test_iso_time_ms_is_the_old_formula(t: float) -> None:
    old = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}+0000"
    assert catalog_rules.iso_time_ms(t) == old


def test_page_size_is_bounded_by_limits() -> None:
    assert catalog_rules.page_size(None) == 50
    assert catalog_rules.page_size("7") == 7
    assert catalog_rules.page_size("10000") == 50
    assert catalog_rules.page_size("9", Limits(list_page_items_max=5)) == 5
    with pytest.raises(LambdaError, match="between 1 and 10000"):
        catalog_rules.page_size("10001")
