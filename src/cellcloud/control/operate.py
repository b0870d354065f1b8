"""Operator verbs against a running region (the CLI's ``migrate``): thin calls to the control
plane process named in ``region.json``."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from .. import runtime
from ..region.tenants import list_tenants
from ..transport import Client

migrate_timeout_s = 300.0


def _region(state_dir: str) -> dict[str, Any]:
    with open(os.path.join(state_dir, "region.json")) as f:
        doc: dict[str, Any] = json.load(f)
    return doc


def account_of(state_dir: str, tenant: str) -> str:
    for t in list_tenants(state_dir):
        if tenant in (t["name"], t["account_id"]):
            return t["account_id"]
    raise ValueError(f"no tenant {tenant!r}")


async def control_call(state_dir: str, op: str, body: Any, timeout_s: float) -> Any:
    c = _region(state_dir)["components"]["control"]
    runtime.client_security(state_dir)
    client = Client(c["host"], c["port"], expect_role="control")
    try:
        return await client.call(op, body, timeout_s=timeout_s)
    finally:
        await client.close()


def migrate(state_dir: str, tenant: str, to: str) -> dict[str, Any]:
    account = account_of(state_dir, tenant)
    res: dict[str, Any] = asyncio.run(control_call(
        state_dir, "migrate", {"tenant": account, "to": to}, migrate_timeout_s))
    return res
