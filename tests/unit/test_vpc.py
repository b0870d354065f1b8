"""core/vpc.py: a function's network setting from VpcConfig, and its echo."""

from __future__ import annotations

from typing import Any

import pytest

from cellcloud.core import vpc
from cellcloud.core.vpc import Setting

INTERNAL = ["127.0.0.0/8", "169.254.0.0/16", "100.64.0.0/16", "192.168.7.9/32"]


@pytest.mark.parametrize("doc,setting", [
    (None, Setting()),
    ({}, Setting()),
    ({"SubnetIds": []}, Setting()),
    ({"SubnetIds": None, "SecurityGroupIds": []}, Setting()),
    ({"SubnetIds": ["cellcloud-none"]}, Setting("none")),
    ({"SubnetIds": ["cellcloud-egress"], "SecurityGroupIds": []}, Setting("egress")),
    ({"SubnetIds": ["cellcloud-egress"],
      "SecurityGroupIds": ["allow:10.1.2.0/24:5432", "allow:0.0.0.0/0:443",
                           "allow:10.1.2.0/24:5432", "allow:192.168.7.8/32:80"]},
     Setting("egress", ("10.1.2.0/24:5432", "0.0.0.0/0:443", "192.168.7.8/32:80"))),
])
def test_parse(doc: Any, setting: Setting) -> None:
    assert vpc.parse(doc, INTERNAL) == setting


@pytest.mark.parametrize("doc,named", [
    ({"SubnetIds": ["subnet-0abc"]}, "subnet-0abc"),
    ({"SubnetIds": ["cellcloud-"]}, "cellcloud-"),
    ({"SubnetIds": ["cellcloud-None"]}, "cellcloud-None"),
    ({"SubnetIds": ["cellcloud-egress", "cellcloud-none"]}, "more than one"),
    ({"SubnetIds": "cellcloud-none"}, "list of strings"),
    ({"SubnetIds": [3]}, "list of strings"),
    ("cellcloud-none", "object"),
    # allow-lists: only with egress, well formed, never region-internal
    ({"SubnetIds": ["cellcloud-none"], "SecurityGroupIds": ["allow:1.2.3.0/24:80"]}, "egress"),
    ({"SecurityGroupIds": ["allow:1.2.3.0/24:80"]}, "egress"),
    ({"SubnetIds": ["cellcloud-egress"], "SecurityGroupIds": ["sg-0abc"]}, "sg-0abc"),
    ({"SubnetIds": ["cellcloud-egress"], "SecurityGroupIds": ["allow:1.2.3.0/24"]},
     "allow:1.2.3.0/24"),
    ({"SubnetIds": ["cellcloud-egress"], "SecurityGroupIds": ["allow:1.2.3.4:80"]},
     "allow:1.2.3.4:80"),  # a CIDR, with its prefix length
    ({"SubnetIds": ["cellcloud-egress"], "SecurityGroupIds": ["allow:1.2.3.4/24:80"]},
     "allow:1.2.3.4/24:80"),  # host bits set
    ({"SubnetIds": ["cellcloud-egress"], "SecurityGroupIds": ["allow:1.2.3.0/24:0"]},
     "allow:1.2.3.0/24:0"),
    ({"SubnetIds": ["cellcloud-egress"], "SecurityGroupIds": ["allow:1.2.3.0/24:65536"]},
     "allow:1.2.3.0/24:65536"),
    ({"SubnetIds": ["cellcloud-egress"], "SecurityGroupIds": ["allow:::/0:80"]}, "allow:::/0:80"),
    ({"SubnetIds": ["cellcloud-egress"], "SecurityGroupIds": ["allow:127.0.0.1/32:80"]},
     "region-internal"),
    ({"SubnetIds": ["cellcloud-egress"], "SecurityGroupIds": ["allow:169.254.169.254/32:80"]},
     "169.254.169.254/32"),
    ({"SubnetIds": ["cellcloud-egress"], "SecurityGroupIds": ["allow:100.64.4.0/22:80"]},
     "100.64.4.0/22"),
    ({"SubnetIds": ["cellcloud-egress"], "SecurityGroupIds": ["allow:192.168.7.9/32:22"]},
     "192.168.7.9/32"),
    ({"SubnetIds": ["cellcloud-egress"],
      "SecurityGroupIds": [f"allow:10.0.{i}.0/24:80" for i in range(vpc.ALLOW_ENTRIES_MAX + 1)]},
     "at most"),
])
def test_parse_refuses_naming_the_entry(doc: Any, named: str) -> None:
    with pytest.raises(vpc.VpcError) as e:
        vpc.parse(doc, INTERNAL)
    assert named in str(e.value)


def test_echo_round_trips() -> None:
    for setting in (Setting(), Setting("egress"), Setting("none"),
                    Setting("egress", ("10.1.2.0/24:5432", "0.0.0.0/0:443"))):
        echoed = vpc.echo(setting)
        assert set(echoed) == {"SubnetIds", "SecurityGroupIds", "VpcId",
                               "Ipv6AllowedForDualStack"}
        assert vpc.parse(echoed, INTERNAL) == setting
    assert vpc.echo(Setting("none"))["VpcId"] == "cellcloud-none"
    assert vpc.echo(Setting())["SubnetIds"] == []
    assert vpc.echo(Setting("egress", ("0.0.0.0/0:443",)))["SecurityGroupIds"] == [
        "allow:0.0.0.0/0:443"]


def test_local_addresses() -> None:
    text = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.0.0.0/24 2 0 2
        |-- 10.0.0.0
           /24 link UNICAST
        |-- 10.0.0.7
           /32 host LOCAL
        |-- 10.0.0.255
           /32 link BROADCAST
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
        |-- 10.0.0.7
           /32 host LOCAL
"""
    assert vpc.local_addresses(text) == ["10.0.0.7/32", "127.0.0.1/32"]
