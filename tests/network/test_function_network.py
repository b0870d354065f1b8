"""A function's own network setting (VpcConfig.SubnetIds cellcloud-none | cellcloud-egress,
issue #12) in a region whose default is egress."""

from __future__ import annotations

import tempfile

import pytest

from cellcloud.sdk import CellcloudError
from tests.conftest import make_zip
from tests.integration.conftest import start_region, stop_region

from .conftest import World

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CODE = '''
import socket, urllib.request
def handler(event, context):
    lines = open("/proc/net/dev").read().splitlines()[2:]
    ifaces = sorted(line.split(":")[0].strip() for line in lines)
    try:
        fetched = urllib.request.urlopen(event["url"], timeout=10).read().decode()
    except OSError as e:
        fetched = type(e).__name__
    other = "none asked"
    if "other" in event:
        try:
            socket.create_connection(tuple(event["other"]), timeout=5).close()
            other = "reached"
        except OSError as e:
            other = type(e).__name__
    return {"ifaces": ifaces, "fetched": fetched, "other": other}
'''
NONE = {"SubnetIds": ["cellcloud-none"], "SecurityGroupIds": []}
EGRESS = {"SubnetIds": ["cellcloud-egress"]}


def test_function_network_settings(world: World) -> None:
    d = tempfile.mkdtemp(prefix="cellcloud-netfn-")
    region = start_region(d, "--agents-per-cell", "1")
    # the world's DNS over TCP: another port on the same host
    url = {"url": f"http://{world.addr}:8080/", "other": [world.addr, 53]}
    try:
        zipped = make_zip({"app.py": CODE})
        # the control: a function with the region's default reaches the world
        region.client.create_function("dflt", zipped, "app.handler", timeout_s=30)
        out = region.client.invoke("dflt", url).json()
        assert out["fetched"] == world.token and "eth0" in out["ifaces"], out
        assert out["other"] == "reached", out
        # an allow-list for the world's HTTP port: that, and not the other port
        allow = {"SubnetIds": ["cellcloud-egress"],
                 "SecurityGroupIds": [f"allow:{world.addr}/32:8080"]}
        made = region.client.create_function("allowed", zipped, "app.handler", timeout_s=30,
                                             vpc_config=allow)
        assert made["VpcConfig"] == {**allow, "VpcId": "cellcloud-egress",
                                     "Ipv6AllowedForDualStack": False}
        out = region.client.invoke("allowed", url).json()
        assert out["fetched"] == world.token and out["other"] != "reached", out
        # a function that says none: only its loopback, in the same region
        made = region.client.create_function("nonet", zipped, "app.handler", timeout_s=30,
                                             vpc_config=NONE)
        assert made["VpcConfig"]["VpcId"] == "cellcloud-none"
        out = region.client.invoke("nonet", url).json()
        assert out["ifaces"] == ["lo"] and out["fetched"] != world.token, out
        assert region.client.get_function("nonet")["Configuration"]["VpcConfig"] == {
            **NONE, "VpcId": "cellcloud-none", "Ipv6AllowedForDualStack": False}
        # a malformed setting is refused at create, naming the entry; nothing is stored
        with pytest.raises(CellcloudError) as e:
            region.client.create_function("bad", zipped, "app.handler",
                                          vpc_config={"SubnetIds": ["subnet-0abc"]})
        assert "subnet-0abc" in str(e.value)
        with pytest.raises(CellcloudError):
            region.client.get_function("bad")
        # so is an allow entry naming region-internal addresses: the pool, the host's own
        for entry in ("allow:100.64.0.0/24:80", f"allow:{world.host_addr}/32:80",
                      "allow:169.254.169.254/32:80"):
            with pytest.raises(CellcloudError) as e:
                region.client.create_function("bad", zipped, "app.handler", vpc_config={
                    "SubnetIds": ["cellcloud-egress"], "SecurityGroupIds": [entry]})
            assert e.value.type == "InvalidParameterValueException" and entry in str(e.value)
            with pytest.raises(CellcloudError):
                region.client.get_function("bad")
        # egress -> none: the next cold start has no network; the warm egress env is not reused
        region.client.create_function("flip", zipped, "app.handler", timeout_s=30,
                                      vpc_config=EGRESS)
        out = region.client.invoke("flip", url).json()
        assert out["fetched"] == world.token, out
        region.client.update_function_configuration("flip", VpcConfig=NONE)
        out = region.client.invoke("flip", url).json()
        assert out["ifaces"] == ["lo"] and out["fetched"] != world.token, out
    finally:
        stop_region(region)
