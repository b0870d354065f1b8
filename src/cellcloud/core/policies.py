"""Resource-based policies (AddPermission, AddLayerVersionPermission): statements built and
edited as Lambda builds them. Pure: the caller passes the stored policy and a fresh revision id
in, and stores what comes back.

Function policies are enforced (:func:`allows`, decided in ``core/function_urls.py``) for
function URLs (AuthType NONE needs the public statement; AWS_IAM from another account needs a
grant) and for Invoke from another account (its keys naming this function's ARN). Layer
version policies are stored and returned, not enforced: a layer version is usable only by its
own account.
"""

from __future__ import annotations

import json
import re
from typing import Any

from . import errors

_SID = re.compile(r"^[a-zA-Z0-9_.-]{1,100}$")
_ACTION = re.compile(r"^(lambda:[*]|lambda:[a-zA-Z]+|[*])$")
_ACCOUNT = re.compile(r"^\d{12}$")
_URL_AUTH = ("NONE", "AWS_IAM")


def _string(doc: dict[str, Any], key: str, required: bool = False) -> str | None:
    value = doc.get(key)
    if value is None:
        if required:
            raise errors.invalid(f"{key} is required")
        return None
    if not isinstance(value, str) or not value:
        raise errors.invalid(f"{key} must be a non-empty string")
    return value


def _principal(value: str) -> Any:
    if value == "*":
        return "*"
    if _ACCOUNT.match(value):
        return {"AWS": f"arn:aws:iam::{value}:root"}
    if value.startswith("arn:"):
        return {"AWS": value}
    return {"Service": value}


def function_statement(doc: dict[str, Any], resource_arn: str) -> dict[str, Any]:
    """The statement AddPermission adds for ``doc`` (its JSON body) on ``resource_arn``."""
    sid = _string(doc, "StatementId", True)
    assert sid is not None
    if not _SID.match(sid):
        raise errors.invalid(f"StatementId {sid!r} must match [a-zA-Z0-9-_.]+ (1-100)")
    action = _string(doc, "Action", True)
    assert action is not None
    if not _ACTION.match(action):
        raise errors.invalid(f"Action {action!r} must be lambda:<Operation>, lambda:* or *")
    principal = _string(doc, "Principal", True)
    assert principal is not None
    cond: dict[str, dict[str, str]] = {}
    for key, op, name in (("SourceArn", "ArnLike", "AWS:SourceArn"),
                          ("SourceAccount", "StringEquals", "AWS:SourceAccount"),
                          ("PrincipalOrgID", "StringEquals", "aws:PrincipalOrgID"),
                          ("EventSourceToken", "StringEquals", "lambda:EventSourceToken"),
                          ("FunctionUrlAuthType", "StringEquals", "lambda:FunctionUrlAuthType")):
        value = _string(doc, key)
        if value is not None:
            if key == "FunctionUrlAuthType" and value not in _URL_AUTH:
                raise errors.invalid(f"FunctionUrlAuthType must be one of {', '.join(_URL_AUTH)}")
            cond.setdefault(op, {})[name] = value
    via_url = doc.get("InvokedViaFunctionUrl")
    if via_url is not None:
        if not isinstance(via_url, bool):
            raise errors.invalid("InvokedViaFunctionUrl must be a boolean")
        cond.setdefault("Bool", {})["lambda:InvokedViaFunctionUrl"] = str(via_url).lower()
    stmt: dict[str, Any] = {"Sid": sid, "Effect": "Allow", "Principal": _principal(principal),
                            "Action": action, "Resource": resource_arn}
    if cond:
        stmt["Condition"] = cond
    return stmt


def layer_statement(doc: dict[str, Any], resource_arn: str) -> dict[str, Any]:
    """The statement AddLayerVersionPermission adds."""
    sid = _string(doc, "StatementId", True)
    assert sid is not None
    if not _SID.match(sid):
        raise errors.invalid(f"StatementId {sid!r} must match [a-zA-Z0-9-_.]+ (1-100)")
    if doc.get("Action") != "lambda:GetLayerVersion":
        raise errors.invalid("Action must be lambda:GetLayerVersion")
    principal = _string(doc, "Principal", True)
    assert principal is not None
    if principal != "*" and not _ACCOUNT.match(principal) and not principal.startswith("arn:"):
        raise errors.invalid("Principal must be an account id, an account ARN or *")
    stmt: dict[str, Any] = {"Sid": sid, "Effect": "Allow", "Principal": _principal(principal)
                            if principal != "*" else "*",
                            "Action": "lambda:GetLayerVersion", "Resource": resource_arn}
    org = _string(doc, "OrganizationId")
    if org is not None:
        stmt["Condition"] = {"StringEquals": {"aws:PrincipalOrgID": org}}
    return stmt


def _load(stored: str | None) -> tuple[list[dict[str, Any]], str]:
    if stored is None:
        return [], ""
    doc = json.loads(stored)
    return list(doc["Statement"]), str(doc["RevisionId"])


def _check_revision(expected: object, current: str) -> None:
    if expected is not None and expected != current:
        raise errors.LambdaError(412, "PreconditionFailedException",
                                 "The Revision Id provided does not match the latest Revision Id."
                                 " Call the GetPolicy API to retrieve the latest Revision Id")


def add(stored: str | None, stmt: dict[str, Any], revision_id: object,
        new_revision: str) -> str:
    """The stored policy with ``stmt`` added (409 if its Sid is taken)."""
    statements, current = _load(stored)
    _check_revision(revision_id, current)
    if any(s["Sid"] == stmt["Sid"] for s in statements):
        raise errors.LambdaError(409, "ResourceConflictException",
                                 f"The statement id ({stmt['Sid']}) provided already exists. "
                                 "Please provide a new statement id, or remove the existing "
                                 "statement.")
    return json.dumps({"Statement": [*statements, stmt], "RevisionId": new_revision})


def remove(stored: str | None, sid: str, revision_id: object, new_revision: str) -> str | None:
    """The stored policy without statement ``sid`` (None when none is left); 404 if absent."""
    statements, current = _load(stored)
    _check_revision(revision_id, current)
    kept = [s for s in statements if s["Sid"] != sid]
    if len(kept) == len(statements):
        raise errors.not_found(f"Statement {sid} is not found in resource policy.")
    return json.dumps({"Statement": kept, "RevisionId": new_revision}) if kept else None


def policy_doc(stored: str | None) -> dict[str, Any]:
    """GetPolicy / GetLayerVersionPolicy's answer (404 when no statement exists)."""
    if stored is None:
        raise errors.not_found("The resource you requested does not exist.")
    statements, revision = _load(stored)
    return {"Policy": json.dumps({"Version": "2012-10-17", "Id": "default",
                                  "Statement": statements}), "RevisionId": revision}


def _principal_matches(principal: Any, caller: str | None) -> bool:
    if principal == "*":
        return True
    if not isinstance(principal, dict) or caller is None:
        return False
    aws = principal.get("AWS")
    values = aws if isinstance(aws, list) else [aws]
    for v in values:
        if v == "*" or v == caller:
            return True
        if isinstance(v, str) and v.startswith("arn:"):
            parts = v.split(":")
            if len(parts) > 4 and parts[4] == caller:
                return True
    return False


def allows(stored: str | None, action: str, caller: str | None, context: dict[str, str],
           require: tuple[str, ...] = ()) -> bool:
    """Does the stored policy allow ``caller`` (an account id; None: anonymous) ``action``?

    A statement applies when its action is ``action``, ``lambda:*`` or ``*``; its principal is
    ``*`` or names the caller's account; every condition holds on ``context`` (a condition on a
    key the context lacks does not hold, so a statement for a service with a ``SourceArn`` never
    lets a direct caller in); and it has a condition on each key in ``require``. Pure."""
    if stored is None:
        return False
    statements, _ = _load(stored)
    for stmt in statements:
        if stmt.get("Effect") != "Allow":
            continue
        if stmt.get("Action") not in (action, "lambda:*", "*"):
            continue
        if not _principal_matches(stmt.get("Principal"), caller):
            continue
        cond: dict[str, dict[str, str]] = stmt.get("Condition") or {}
        keys = {k for block in cond.values() for k in block}
        if any(k not in keys for k in require):
            continue
        if all(op in ("StringEquals", "Bool", "ArnLike") and k in context
               and context[k] == v for op, block in cond.items() for k, v in block.items()):
            return True
    return False
