"""A tenant migration carries its function URLs and resource policies: the URL id names the
account, so after the move the same URL reaches the new cell, public as before."""

from __future__ import annotations

import base64
import random
from typing import Any

from cellcloud.core import function_urls as fu
from cellcloud.core import policies
from cellcloud.frontend.cell import Cell
from cellcloud.frontend.clone import export_tenant, import_tenant
from cellcloud.frontend.store import AliasRecord, SqliteFunctionStore
from tests.conftest import make_zip

ACCOUNT = "123456789012"


def test_urls_and_policies_move_with_the_tenant(tmp_path: Any) -> None:
    old = Cell("cell-a", SqliteFunctionStore(str(tmp_path / "a")), {})
    new = Cell("cell-b", SqliteFunctionStore(str(tmp_path / "b")), {})
    old.catalog.create_function(ACCOUNT, {
        "FunctionName": "f", "Runtime": "python3.11", "Handler": "app.handler",
        "Role": "arn:aws:iam::123456789012:role/r",
        "Code": {"ZipFile": base64.b64encode(make_zip({"app.py": "x = 1\n"})).decode()}})
    old.store.put_alias(AliasRecord(ACCOUNT, "f", "live", "$LATEST"), new=True)
    url_id = fu.new_url_id(ACCOUNT, random.Random(1))
    doc = {"AuthType": "NONE", "InvokeMode": "BUFFERED", "CreationTime": "t",
           "LastModifiedTime": "t"}
    old.store.put_url(ACCOUNT, "f", "live", url_id, doc, new=True)
    stmt = policies.function_statement(
        {"StatementId": "public", "Action": "lambda:InvokeFunctionUrl", "Principal": "*",
         "FunctionUrlAuthType": "NONE"}, "arn")
    old.store.put_policy(ACCOUNT, "f", "f", "live", policies.add(None, stmt, None, "r1"))
    exported = export_tenant(old, ACCOUNT)
    import_tenant(new, exported)
    import_tenant(new, exported)  # idempotent
    found = new.store.get_url_by_id(url_id)
    assert found == (ACCOUNT, "f", "live", doc)
    assert fu.authorize_url("NONE", ACCOUNT, None,
                            new.store.get_policy(ACCOUNT, "f", "f", "live"))
