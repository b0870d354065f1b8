"""Lambda event filtering (core/event_filter.py): each rule of Lambda's filter syntax on SQS
records, and malformed patterns refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cellcloud.core import event_filter as ef


def _m(pattern: dict[str, Any], record: dict[str, Any]) -> bool:
    return ef.matches(ef.parse(json.dumps(pattern)), ef.sqs_view(record))


REC = {"messageId": "1", "body": json.dumps({"kind": "order", "n": 7, "tags": ["a", "b"],
                                             "addr": {"city": "Paris"}, "none": None,
                                             "empty": ""}),
       "attributes": {"ApproximateReceiveCount": "1"},
       "messageAttributes": {"k": {"stringValue": "v", "dataType": "String"}},
       "eventSource": "aws:sqs"}


@pytest.mark.parametrize("pattern, expected", [
    ({"body": {"kind": ["order"]}}, True),
    ({"body": {"kind": ["refund", "order"]}}, True),
    ({"body": {"kind": ["refund"]}}, False),
    ({"body": {"kind": [{"prefix": "ord"}]}}, True),
    ({"body": {"kind": [{"prefix": "x"}]}}, False),
    ({"body": {"kind": [{"suffix": "der"}]}}, True),
    ({"body": {"kind": [{"equals-ignore-case": "ORDER"}]}}, True),
    ({"body": {"kind": [{"anything-but": ["refund"]}]}}, True),
    ({"body": {"kind": [{"anything-but": "order"}]}}, False),
    ({"body": {"kind": [{"anything-but": {"prefix": "or"}}]}}, False),
    ({"body": {"missing": [{"anything-but": "x"}]}}, False),
    ({"body": {"n": [7]}}, True),
    ({"body": {"n": [7.0]}}, True),
    ({"body": {"n": ["7"]}}, False),
    ({"body": {"n": [{"numeric": [">", 5]}]}}, True),
    ({"body": {"n": [{"numeric": [">", 0, "<=", 7]}]}}, True),
    ({"body": {"n": [{"numeric": [">", 7, "<", 9]}]}}, False),
    ({"body": {"n": [{"numeric": ["=", 7]}]}}, True),
    ({"body": {"n": [{"anything-but": [7]}]}}, False),
    ({"body": {"kind": [{"numeric": [">", 0]}]}}, False),
    ({"body": {"kind": [{"exists": True}]}}, True),
    ({"body": {"missing": [{"exists": True}]}}, False),
    ({"body": {"missing": [{"exists": False}]}}, True),
    ({"body": {"kind": [{"exists": False}]}}, False),
    ({"body": {"addr": [{"exists": True}]}}, False),  # an object is not a leaf
    ({"body": {"addr": {"city": ["Paris"]}}}, True),
    ({"body": {"addr": {"city": ["Rome"]}}}, False),
    ({"body": {"tags": ["b"]}}, True),  # any element of an array
    ({"body": {"tags": ["c"]}}, False),
    ({"body": {"none": [None]}}, True),
    ({"body": {"kind": [None]}}, False),
    ({"body": {"empty": [""]}}, True),
    ({"body": {"kind": ["order"]}, "messageAttributes": {"k": {"stringValue": ["v"]}}}, True),
    ({"body": {"kind": ["order"]}, "attributes": {"ApproximateReceiveCount": ["2"]}}, False),
    ({"$or": [{"body": {"kind": ["refund"]}}, {"body": {"n": [7]}}]}, True),
    ({"$or": [{"body": {"kind": ["refund"]}}, {"body": {"n": [8]}}]}, False),
    ({"eventSource": ["aws:sqs"]}, True),
])
def test_rules_on_a_json_body(pattern: dict[str, Any], expected: bool) -> None:
    assert _m(pattern, REC) is expected


def test_a_plain_text_body_matches_as_a_string_only() -> None:
    rec = {**REC, "body": "hello world"}
    assert _m({"body": ["hello world"]}, rec)
    assert _m({"body": [{"prefix": "hello"}]}, rec)
    assert not _m({"body": {"kind": ["order"]}}, rec)
    # a body that is a JSON array or scalar is a plain string too
    assert _m({"body": ["[1, 2]"]}, {**REC, "body": "[1, 2]"})


@pytest.mark.parametrize("text", [
    "not json", "[]", "{}", '{"body": "order"}', '{"body": {"kind": []}}',
    '{"body": {"kind": [{"prefix": 1}]}}', '{"body": {"kind": [{"wildcard": "x"}]}}',
    '{"body": {"kind": [{"numeric": [">"]}]}}', '{"body": {"kind": [{"numeric": ["!", 1]}]}}',
    '{"body": {"kind": [{"numeric": [">", 5, "<", 1]}]}}',
    '{"body": {"kind": [{"numeric": [">", 1, ">", 2]}]}}',
    '{"body": {"kind": [{"numeric": [">", "1"]}]}}', '{"body": {"kind": [{"exists": "yes"}]}}',
    '{"body": {"kind": [{"anything-but": []}]}}', '{"body": {"kind": [{"anything-but": [{}]}]}}',
    '{"body": {"kind": [{"prefix": "a", "suffix": "b"}]}}', '{"$or": [{"a": ["x"]}]}',
    '{"body": {"kind": [[1]]}}', '{"body": {"n": [1e12]}}',
    '{"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": {"j": {"k": {"l": {"m": {"n": '
    '{"o": {"p": {"q": {"r": ["x"]}}}}}}}}}}}}}}}}}}',
    "x" * (ef.pattern_chars_max + 1), "[" * 4000,
])
def test_malformed_patterns_are_refused(text: str) -> None:
    with pytest.raises(ef.FilterError):
        ef.parse(text)


def test_criteria_or_their_filters_and_refuse_too_many() -> None:
    c = ef.parse_criteria({"Filters": [{"Pattern": '{"body": {"kind": ["refund"]}}'},
                                       {"Pattern": '{"body": {"n": [7]}}'}]}, 5)
    assert c.matches(ef.sqs_view(REC))
    assert not c.matches(ef.sqs_view({**REC, "body": '{"n": 8}'}))
    assert ef.parse_criteria(None, 5).matches(REC)  # no criteria: everything
    with pytest.raises(ef.FilterError):
        ef.parse_criteria({"Filters": [{"Pattern": '{"a": ["x"]}'}] * 6}, 5)
    with pytest.raises(ef.FilterError):
        ef.parse_criteria({"Filters": [{"Pattern": '{"a": ["x"]}', "Other": 1}]}, 5)
    with pytest.raises(ef.FilterError):
        ef.parse_criteria({"Filters": "x"}, 5)
