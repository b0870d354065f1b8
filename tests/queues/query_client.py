"""A query-protocol SQS client as older SDKs are: ``Action=...`` forms signed with botocore's
SigV4Auth (service ``sqs``), XML answers read with ElementTree."""

from __future__ import annotations

import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import urlencode

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

NS = {"q": "http://queue.amazonaws.com/doc/2012-11-05/"}


class QueryError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class QueryClient:
    def __init__(self, endpoint: str, region: str, akid: str, secret: str) -> None:
        self.endpoint, self.region = endpoint, region
        self.creds = Credentials(akid, secret)

    def call(self, action: str, url: str | None = None, **form: Any) -> ET.Element:
        body = urlencode({"Action": action, "Version": "2012-11-05",
                          **{k: str(v) for k, v in form.items()}}).encode()
        req = AWSRequest(method="POST", url=url or self.endpoint + "/", data=body, headers={
            "Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
        SigV4Auth(self.creds, "sqs", self.region).add_auth(req)
        prepared = req.prepare()
        r = urllib.request.Request(prepared.url, data=body, method="POST",
                                   headers=dict(prepared.headers.items()))
        try:
            with urllib.request.urlopen(r, timeout=60) as resp:
                root = ET.fromstring(resp.read())
        except urllib.error.HTTPError as e:
            raw = e.read()
            if not raw.startswith(b"<"):  # refused by the router before the cell (signature)
                raise QueryError(e.code, "", raw.decode(errors="replace")) from None
            err = ET.fromstring(raw)
            raise QueryError(e.code, err.findtext("q:Error/q:Code", "", NS),
                             err.findtext("q:Error/q:Message", "", NS)) from None
        assert root.tag == f"{{{NS['q']}}}{action}Response", root.tag
        assert root.findtext("q:ResponseMetadata/q:RequestId", None, NS)
        result = root.find(f"q:{action}Result", NS)
        assert result is not None
        return result


def text(el: ET.Element, path: str) -> str:
    return el.findtext("/".join(f"q:{p}" for p in path.split("/")), "", NS)


def all_of(el: ET.Element, path: str) -> list[ET.Element]:
    return el.findall("/".join(f"q:{p}" for p in path.split("/")), NS)


def attrs(el: ET.Element, name: str = "Attribute", k: str = "Name") -> dict[str, str]:
    return {text(a, k): text(a, "Value") for a in all_of(el, name)}
