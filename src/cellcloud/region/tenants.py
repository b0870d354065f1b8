"""The tenant table (``tenants.json`` in the state directory, mode 0600).

A tenant is a name, an AWS-style 12-digit account id (the partition key: a tenant's functions
and layers live in one cell, and their ARNs carry it) and one access key pair that signs its
requests with SigV4. The router reads the table; ``cellcloud up`` creates a default tenant and
``cellcloud tenant create`` adds more.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import secrets
from typing import Any

FILE = "tenants.json"
OPERATOR_FILE = "operator.json"  # {"token": ...}: the operator's bearer token, mode 0600
tenants_max = 10_000
_TENANT_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")


def _path(state_dir: str) -> str:
    return os.path.join(state_dir, FILE)


def new_access_key() -> tuple[str, str]:
    """An access key id (AKIA + 16 base32 characters, like AWS's) and a 40-character secret."""
    akid = "AKIA" + base64.b32encode(secrets.token_bytes(10)).decode()[:16]
    secret = base64.b64encode(secrets.token_bytes(30)).decode()
    return akid, secret


def _new_account(taken: set[str]) -> str:
    while True:
        account = "".join(str(secrets.randbelow(10)) for _ in range(12))
        if account not in taken and account[0] != "0":
            return account


def _write(state_dir: str, doc: dict[str, Any]) -> None:
    path = _path(state_dir)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.rename(tmp, path)


def _read(state_dir: str) -> dict[str, Any] | None:
    try:
        with open(_path(state_dir)) as f:
            doc: dict[str, Any] = json.load(f)
    except FileNotFoundError:
        return None
    return doc


class _Lock:
    """Serialises writers of the table (the CLI and the supervisor) with an flock."""

    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.fd = os.open(os.path.join(state_dir, ".tenants.lock"), os.O_RDWR | os.O_CREAT, 0o600)

    def __enter__(self) -> _Lock:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def ensure_tenants(state_dir: str) -> dict[str, Any]:
    """The tenant table, created with one default tenant on first use; tenants from before
    SigV4 (an ``api_key`` only) get an access key pair."""
    with _Lock(state_dir):
        doc = _read(state_dir)
        changed = False
        if doc is None:
            doc = {"tenants": []}
            changed = True
        if not doc["tenants"]:
            doc["tenants"].append({"name": "default", "account_id": _new_account(set())})
            changed = True
        for t in doc["tenants"]:
            if "access_key_id" not in t or "secret_access_key" not in t:
                t["access_key_id"], t["secret_access_key"] = new_access_key()
                changed = True
        if changed:
            _write(state_dir, doc)
        return doc


def create_tenant(state_dir: str, name: str) -> dict[str, str]:
    if not _TENANT_NAME.match(name):
        raise ValueError("a tenant name is 1-63 letters, digits, '_', '.' or '-'")
    ensure_tenants(state_dir)
    with _Lock(state_dir):
        doc = _read(state_dir)
        assert doc is not None
        if any(t["name"] == name for t in doc["tenants"]):
            raise ValueError(f"tenant {name!r} already exists")
        if len(doc["tenants"]) >= tenants_max:
            raise ValueError(f"at most {tenants_max} tenants")
        akid, secret = new_access_key()
        tenant = {"name": name,
                  "account_id": _new_account({t["account_id"] for t in doc["tenants"]}),
                  "access_key_id": akid, "secret_access_key": secret}
        doc["tenants"].append(tenant)
        _write(state_dir, doc)
        return tenant


def list_tenants(state_dir: str) -> list[dict[str, str]]:
    doc = _read(state_dir) or {"tenants": []}
    return list(doc["tenants"])


def default_tenant(state_dir: str) -> dict[str, str]:
    return list_tenants(state_dir)[0]


def operator_token_path(state_dir: str) -> str:
    return os.path.join(state_dir, OPERATOR_FILE)


def ensure_operator_token(state_dir: str) -> str:
    """The operator's bearer token (region-wide status), created on first use with mode 0600.

    It is not a tenant: it signs nothing and names no account; the router accepts it as
    ``Authorization: Bearer <token>`` on the region status paths only.
    """
    path = operator_token_path(state_dir)
    with _Lock(state_dir):
        try:
            with open(path) as f:
                token = str(json.load(f)["token"])
            if token:
                return token
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            pass
        token = secrets.token_urlsafe(32)
        tmp = f"{path}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"token": token}, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.rename(tmp, path)
        return token


def read_operator_token(state_dir: str) -> str | None:
    try:
        with open(operator_token_path(state_dir)) as f:
            return str(json.load(f)["token"]) or None
    except (OSError, ValueError, KeyError, TypeError):
        return None
