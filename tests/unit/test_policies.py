"""Resource policies (issue #15): the pure statement rules (core/policies.py) and their SQLite
table (a state dir from before the table gains it; rows survive a reopen)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from cellcloud.core import policies
from cellcloud.core.errors import LambdaError
from cellcloud.frontend.store import SqliteFunctionStore

ARN = "arn:aws:lambda:cc-local-1:123456789012:function:f"


def test_statement_add_remove_and_revisions() -> None:
    stmt = policies.function_statement({"StatementId": "a", "Action": "lambda:InvokeFunction",
                                        "Principal": "*"}, ARN)
    assert stmt == {"Sid": "a", "Effect": "Allow", "Principal": "*",
                    "Action": "lambda:InvokeFunction", "Resource": ARN}
    one = policies.add(None, stmt, None, "r1")
    with pytest.raises(LambdaError) as e:
        policies.add(one, stmt, None, "r2")
    assert e.value.type == "ResourceConflictException"
    with pytest.raises(LambdaError) as e:
        policies.add(one, {**stmt, "Sid": "b"}, "r0", "r2")
    assert e.value.type == "PreconditionFailedException"
    two = policies.add(one, {**stmt, "Sid": "b"}, "r1", "r2")
    assert json.loads(policies.policy_doc(two)["Policy"])["Statement"][1]["Sid"] == "b"
    assert policies.remove(policies.remove(two, "a", None, "r3"), "b", None, "r4") is None
    for bad in ({"StatementId": "a b", "Action": "lambda:X", "Principal": "*"},
                {"StatementId": "a", "Action": "s3:GetObject", "Principal": "*"},
                {"StatementId": "a", "Action": "lambda:X", "Principal": "*",
                 "FunctionUrlAuthType": "OPEN"},
                {"StatementId": "a", "Action": "lambda:X"}):
        with pytest.raises(LambdaError) as e:
            policies.function_statement(bad, ARN)
        assert e.value.type == "InvalidParameterValueException"


def test_policy_table_is_added_to_an_old_state_dir_and_persists(tmp_path: Path) -> None:
    SqliteFunctionStore(str(tmp_path)).db.close()
    db = sqlite3.connect(tmp_path / "cell.db")
    db.execute("DROP TABLE policies")  # a state dir from before issue #15
    db.commit()
    db.close()
    store = SqliteFunctionStore(str(tmp_path))
    assert store.get_policy("1", "f", "fn", "") is None
    store.put_policy("1", "f", "fn", "", '{"Statement": [], "RevisionId": "r"}')
    store.db.close()
    store = SqliteFunctionStore(str(tmp_path))
    assert store.get_policy("1", "f", "fn", "") == '{"Statement": [], "RevisionId": "r"}'
    store.put_policy("1", "f", "fn", "", None)
    assert store.get_policy("1", "f", "fn", "") is None
