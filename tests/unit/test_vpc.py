"""core/vpc.py: a function's network setting from VpcConfig, and its echo."""

from __future__ import annotations

from typing import Any

import pytest

from cellcloud.core import vpc


@pytest.mark.parametrize("doc,setting", [
    (None, ""),
    ({}, ""),
    ({"SubnetIds": []}, ""),
    ({"SubnetIds": None, "SecurityGroupIds": []}, ""),
    ({"SubnetIds": ["cellcloud-none"]}, "none"),
    ({"SubnetIds": ["cellcloud-egress"], "SecurityGroupIds": []}, "egress"),
])
def test_parse(doc: Any, setting: str) -> None:
    assert vpc.parse(doc) == setting


@pytest.mark.parametrize("doc,named", [
    ({"SubnetIds": ["subnet-0abc"]}, "subnet-0abc"),
    ({"SubnetIds": ["cellcloud-"]}, "cellcloud-"),
    ({"SubnetIds": ["cellcloud-None"]}, "cellcloud-None"),
    ({"SubnetIds": ["cellcloud-egress", "cellcloud-none"]}, "more than one"),
    ({"SubnetIds": "cellcloud-none"}, "list of strings"),
    ({"SubnetIds": [3]}, "list of strings"),
    ("cellcloud-none", "object"),
])
def test_parse_refuses_naming_the_entry(doc: Any, named: str) -> None:
    with pytest.raises(vpc.VpcError) as e:
        vpc.parse(doc)
    assert named in str(e.value)


def test_echo_round_trips() -> None:
    for setting in ("", "egress", "none"):
        echoed = vpc.echo(setting)
        assert set(echoed) == {"SubnetIds", "SecurityGroupIds", "VpcId",
                               "Ipv6AllowedForDualStack"}
        assert vpc.parse(echoed) == setting
    assert vpc.echo("none")["VpcId"] == "cellcloud-none"
    assert vpc.echo("")["SubnetIds"] == []
