"""A helper starting up removes what SIGKILLed helpers of other prefixes left behind — and
nothing of a helper still alive (it holds its prefix's lock for its whole life)."""

from __future__ import annotations

import fcntl
import os
import secrets
import subprocess

from pyroute2 import IPRoute

from cellcloud.network import helper as H
from cellcloud.network import policy as P


def _leftover(prefix: str) -> None:
    """What a killed helper leaves: its bridge and its three nft tables."""
    subprocess.run(["ip", "link", "add", prefix + "br", "type", "bridge"], check=True)
    script = "".join(f"table {fam} cellcloud_{prefix} {{}}\n" for fam in ("inet", "ip", "bridge"))
    subprocess.run(["nft", "-f", "-"], input=script.encode(), check=True)


def _present(prefix: str) -> tuple[bool, bool]:
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    return prefix + "br" in links, f"cellcloud_{prefix}" in tables


def test_prefixes_of_names() -> None:
    assert P.prefixes_of(["cc1a2b3cbr", "cellcloud_cc4d5e6f", "cc1a2b3c0", "ccXXlate", "eth0",
                          "cc12345678br", "cellcloud_other"]) == {"cc1a2b3c", "cc4d5e6f"}


def test_orphans_are_swept_and_live_helpers_kept() -> None:
    dead, alive, own = ("cc" + secrets.token_hex(3) for _ in range(3))
    for p in (dead, alive, own):
        _leftover(p)
    os.makedirs(H.LOCK_DIR, exist_ok=True)
    held = os.open(os.path.join(H.LOCK_DIR, alive), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live helper holds its own
    try:
        pool = P.check_pool("100.64.0.0/16")
        with IPRoute() as ipr:
            swept = H.sweep_orphans(ipr, own, pool, P.Policy(), P.DEFAULT_SUBNET_PREFIXLEN)
        assert dead in swept and alive not in swept and own not in swept
        assert _present(dead) == (False, False)
        assert _present(alive) == (True, True)
        assert _present(own) == (True, True)  # the caller sweeps its own prefix itself
    finally:
        os.close(held)
        for p in (alive, own, dead):
            subprocess.run(["ip", "link", "del", p + "br"], check=False, capture_output=True)
            for fam in ("inet", "ip", "bridge"):
                subprocess.run(["nft", "delete", "table", fam, f"cellcloud_{p}"], check=False,
                               capture_output=True)
