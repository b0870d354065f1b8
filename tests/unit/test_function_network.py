"""A function's network setting (VpcConfig, issue #12) through the frontend's Cell, in process:
validated at create/update, stored with the record, echoed as AWS does, and part of the
placement key."""

from __future__ import annotations

import base64

import pytest

from cellcloud.core import vpc
from cellcloud.core.errors import LambdaError
from cellcloud.frontend.cell import Cell
from cellcloud.frontend.store import SqliteFunctionStore, config_doc
from tests.conftest import make_zip

ACCOUNT = "123456789012"
ZIP = base64.b64encode(make_zip({"app.py": "def handler(e, c):\n    return 1\n"})).decode()


@pytest.fixture
def cell(tmp_path: str) -> Cell:
    return Cell("cell-t", SqliteFunctionStore(str(tmp_path)), {})


def create(cell: Cell, name: str, **kw: object) -> dict[str, object]:
    return cell.catalog.create_function(ACCOUNT, {"FunctionName": name, "Runtime": "python3.11",
                                          "Handler": "app.handler", "Code": {"ZipFile": ZIP},
                                          **kw})


def test_setting_is_stored_and_echoed(cell: Cell) -> None:
    out = create(cell, "f", VpcConfig={"SubnetIds": ["cellcloud-none"], "SecurityGroupIds": []})
    want = {"SubnetIds": ["cellcloud-none"], "SecurityGroupIds": [], "VpcId": "cellcloud-none",
            "Ipv6AllowedForDualStack": False}
    assert out["VpcConfig"] == want
    rec = cell.catalog.function(ACCOUNT, "f")
    assert rec.network == "none"
    assert config_doc(rec, "r")["VpcConfig"] == want
    # without VpcConfig: the region default, echoed empty
    assert create(cell, "g")["VpcConfig"]["SubnetIds"] == []
    assert cell.catalog.function(ACCOUNT, "g").network == ""


@pytest.mark.parametrize("vpc,named", [
    ({"SubnetIds": ["subnet-0abc"]}, "subnet-0abc"),
    ({"SubnetIds": ["cellcloud-egress", "cellcloud-none"]}, "more than one"),
    ({"SubnetIds": "cellcloud-none"}, "SubnetIds"),
])
def test_malformed_is_refused_and_nothing_stored(cell: Cell, vpc: object, named: str) -> None:
    with pytest.raises(LambdaError) as e:
        create(cell, "bad", VpcConfig=vpc)
    assert e.value.type == "InvalidParameterValueException" and named in str(e.value)
    with pytest.raises(LambdaError):
        cell.catalog.function(ACCOUNT, "bad")
    create(cell, "ok")
    with pytest.raises(LambdaError) as e:
        cell.catalog.update_configuration(ACCOUNT, "ok", {"VpcConfig": vpc})
    assert named in str(e.value)
    assert cell.catalog.function(ACCOUNT, "ok").network == ""


def test_update_changes_the_setting_and_the_placement_key(cell: Cell) -> None:
    create(cell, "f", VpcConfig={"SubnetIds": ["cellcloud-egress"]})
    before = cell.catalog.function(ACCOUNT, "f")
    assert before.network == "egress"
    out = cell.catalog.update_configuration(
        ACCOUNT, "f", {"VpcConfig": {"SubnetIds": ["cellcloud-none"]}})
    assert out["VpcConfig"]["VpcId"] == "cellcloud-none"
    after = cell.catalog.function(ACCOUNT, "f")
    assert after.network == "none" and after.key != before.key
    # an update that leaves VpcConfig out keeps the setting
    cell.catalog.update_configuration(ACCOUNT, "f", {"Timeout": 5})
    assert cell.catalog.function(ACCOUNT, "f").network == "none"


def test_allow_list_is_stored_and_echoed_and_internal_entries_refused(cell: Cell) -> None:
    allow = {"SubnetIds": ["cellcloud-egress"],
             "SecurityGroupIds": ["allow:10.1.2.0/24:5432", "allow:0.0.0.0/0:443"]}
    out = create(cell, "f", VpcConfig=allow)
    assert out["VpcConfig"] == {**allow, "VpcId": "cellcloud-egress",
                                "Ipv6AllowedForDualStack": False}
    assert cell.catalog.function(ACCOUNT, "f").net_allow == ["10.1.2.0/24:5432", "0.0.0.0/0:443"]
    with open("/proc/net/fib_trie") as f:
        own = [a for a in vpc.local_addresses(f.read()) if not a.startswith("127.")]
    for entry in ["allow:100.64.1.0/24:80",  # the pool
                  "allow:169.254.169.254/32:80", "allow:127.0.0.1/32:80",
                  *(f"allow:{a}:22" for a in own[:1])]:  # this host's own address
        doc = {"SubnetIds": ["cellcloud-egress"], "SecurityGroupIds": [entry]}
        with pytest.raises(LambdaError) as e:
            cell.catalog.update_configuration(ACCOUNT, "f", {"VpcConfig": doc})
        assert entry in str(e.value) and "region-internal" in str(e.value)
    assert cell.catalog.function(ACCOUNT, "f").net_allow == ["10.1.2.0/24:5432", "0.0.0.0/0:443"]
