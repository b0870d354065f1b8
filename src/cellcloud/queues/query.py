"""SQS's query protocol (``Action=<Op>&...`` form bodies, XML answers), translated to and
from the JSON protocol's documents so that both reach the same operations (queues/api.py).

The form's names are the 2012-11-05 query model's: flattened lists and maps numbered from 1
(``Attribute.1.Name``/``Attribute.1.Value``, ``AttributeName.1``,
``MessageAttribute.1.Value.StringValue``, ``SendMessageBatchRequestEntry.1.Id``,
``Tag.1.Key``). Answers are ``<OpResponse><OpResult>…</OpResult><ResponseMetadata>`` documents
in SQS's namespace, built with :mod:`xml.etree.ElementTree`; errors are ``<ErrorResponse>``.
Pure: no I/O.
"""

from __future__ import annotations

import re
import uuid
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import parse_qsl

from .store import QueueError, invalid

NAMESPACE = "http://queue.amazonaws.com/doc/2012-11-05/"
XML = "text/xml"
_ACTION = re.compile(r"^[A-Za-z]{1,64}$")
#: query member name -> JSON member name, and how the numbered items fold
_LISTS = {"AttributeName": "AttributeNames",
          "MessageAttributeName": "MessageAttributeNames",
          "MessageSystemAttributeName": "MessageSystemAttributeNames",
          "TagKey": "TagKeys"}
#: flattened maps: query name -> (JSON name, key member, value member)
_MAPS = {"Attribute": ("Attributes", "Name", "Value"),
         "MessageAttribute": ("MessageAttributes", "Name", "Value"),
         "MessageSystemAttribute": ("MessageSystemAttributes", "Name", "Value"),
         "Tag": ("Tags", "Key", "Value")}
_ENTRIES = ("SendMessageBatchRequestEntry", "DeleteMessageBatchRequestEntry",
            "ChangeMessageVisibilityBatchRequestEntry")
#: members that are integers in the model (everything else is a string)
_INTS = {"DelaySeconds", "MaxNumberOfMessages", "VisibilityTimeout", "WaitTimeSeconds",
         "MaxResults", "MaxNumberOfMessagesPerSecond"}
#: result lists, JSON name -> the element each item is written as
_RESULT_LISTS = {"QueueUrls": "QueueUrl", "queueUrls": "QueueUrl", "Messages": "Message",
                 "Failed": "BatchResultErrorEntry", "Results": "ListMessageMoveTasksResultEntry"}
#: result maps, JSON name -> (element, key element, value element)
_RESULT_MAPS = {"Attributes": ("Attribute", "Name", "Value"),
                "MessageAttributes": ("MessageAttribute", "Name", "Value"),
                "Tags": ("Tag", "Key", "Value")}


def _tree(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """``a.1.b=x`` pairs as nested dicts (numbered segments stay keys for now)."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        parts = key.split(".")
        node = root
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise invalid(f"The parameter {key} is malformed.")
            node = nxt
        if isinstance(node.get(parts[-1]), dict) or parts[-1] in node:
            raise invalid(f"The parameter {key} is given more than once or malformed.")
        node[parts[-1]] = value
    return root


def _numbered(node: Any, name: str) -> list[Any]:
    if not isinstance(node, dict) or not all(k.isdigit() and k != "0" for k in node):
        raise invalid(f"The parameter {name} must be numbered from 1.")
    return [node[k] for k in sorted(node, key=int)]


def _value(name: str, v: Any) -> Any:
    if isinstance(v, dict):
        return _fold(v)
    if name in _INTS:
        try:
            return int(v)
        except ValueError:
            raise invalid(f"Value {v} for parameter {name} is invalid. Reason: must be an "
                          f"integer.") from None
    return v


def _fold(node: dict[str, Any]) -> dict[str, Any]:
    """A query tree's structure as the JSON protocol's document."""
    out: dict[str, Any] = {}
    for key, v in node.items():
        if key in _LISTS:
            out[_LISTS[key]] = [str(x) for x in _numbered(v, key)]
        elif key in _MAPS:
            json_name, k_name, v_name = _MAPS[key]
            m: dict[str, Any] = {}
            for item in _numbered(v, key):
                if not isinstance(item, dict) or k_name not in item or v_name not in item:
                    raise invalid(f"The parameter {key} needs {k_name} and {v_name}.")
                m[str(item[k_name])] = _value(v_name, item[v_name])
            out[json_name] = m
        elif key in _ENTRIES:
            out["Entries"] = [_fold(e) if isinstance(e, dict) else e
                              for e in _numbered(v, key)]
        else:
            out[key] = _value(key, v)
    return out


def parse(body: bytes, query: str) -> tuple[str, dict[str, Any]]:
    """The operation and its JSON-protocol document from a query request's form (the body,
    or for a GET the query string)."""
    try:
        pairs = parse_qsl(body.decode() if body else query, keep_blank_values=True,
                          strict_parsing=False, max_num_fields=2000)
    except (UnicodeDecodeError, ValueError):
        raise invalid("The request form is malformed.") from None
    action = ""
    version = ""
    rest = []
    for k, v in pairs:
        if k == "Action":
            action = v
        elif k == "Version":
            version = v
        else:
            rest.append((k, v))
    if not _ACTION.match(action):
        raise QueueError("MissingAction", "MissingAction",
                         "The request must contain the parameter Action.")
    if version and version != "2012-11-05":
        raise QueueError("InvalidParameterValue", "InvalidParameterValue",
                         f"Version {version} is not supported (2012-11-05 is).")
    # CreateQueue's tags are "Tag.N" on the wire and "tags" in the JSON model
    doc = _fold(_tree(rest))
    if action == "CreateQueue" and "Tags" in doc:
        doc["tags"] = doc.pop("Tags")
    return action, doc


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _put(parent: ET.Element, name: str, v: Any) -> None:
    if name in _RESULT_MAPS and isinstance(v, dict):
        el_name, k_name, v_name = _RESULT_MAPS[name]
        for k, val in v.items():
            el = ET.SubElement(parent, el_name)
            ET.SubElement(el, k_name).text = str(k)
            _put(el, v_name, val)
    elif isinstance(v, list):
        item_name = _RESULT_LISTS.get(name)
        if item_name is None:  # the batches' Successful: <Op>ResultEntry, set by the caller
            item_name = name
        for item in v:
            _put(parent, item_name, item)
    elif isinstance(v, dict):
        el = ET.SubElement(parent, name)
        for k, val in v.items():
            _put(el, k, val)
    else:
        ET.SubElement(parent, name).text = _text(v)


def response(op: str, result: dict[str, Any], request_id: str) -> bytes:
    root = ET.Element(f"{op}Response", xmlns=NAMESPACE)
    res = ET.SubElement(root, f"{op}Result")
    for k, v in result.items():
        if k == "Successful":
            _put(res, f"{op}ResultEntry", v)
        else:
            _put(res, k, v)
    meta = ET.SubElement(root, "ResponseMetadata")
    ET.SubElement(meta, "RequestId").text = request_id
    return b'<?xml version="1.0"?>' + ET.tostring(root)


def error(e: QueueError, request_id: str) -> bytes:
    root = ET.Element("ErrorResponse", xmlns=NAMESPACE)
    err = ET.SubElement(root, "Error")
    ET.SubElement(err, "Type").text = "Sender" if e.status < 500 else "Receiver"
    ET.SubElement(err, "Code").text = e.code
    ET.SubElement(err, "Message").text = e.message
    ET.SubElement(err, "Detail")
    ET.SubElement(root, "RequestId").text = request_id
    return b'<?xml version="1.0"?>' + ET.tostring(root)


#: the router's refusals (Lambda error types) as SQS names them
_ROUTER_CODES = {"InvalidSignatureException": "SignatureDoesNotMatch",
                 "UnrecognizedClientException": "InvalidClientTokenId",
                 "MissingAuthenticationTokenException": "MissingAuthenticationToken"}


def router_error(status: int, type_: str, message: str) -> tuple[dict[str, str], bytes]:
    """A refusal by the router (signature, key, size) of a query-protocol request, in XML."""
    e = QueueError(type_, _ROUTER_CODES.get(type_, type_), message, status)
    return {"content-type": XML}, error(e, str(uuid.uuid4()))
