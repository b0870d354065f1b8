"""CloudWatch Logs filter patterns (core/logfilter.py): terms, phrases, exclusions, ?any, JSON."""

from __future__ import annotations

import pytest

from cellcloud.core.logfilter import PatternError, compile_pattern

LINES = [
    "START RequestId: 1 Version: $LATEST\n",
    "[ERROR] ValueError: bad input\n",
    "[WARNING] disk almost full\n",
    "user alice logged in\n",
    '{"level": "ERROR", "message": "boom", "code": 500, "ok": false, "tags": ["a", "b"]}\n',
    '{"level": "INFO", "message": "fine", "code": 200, "ok": true, "user": {"id": 7}}\n',
    '{"level": "DEBUG", "message": null}\n',
    "not json { at all\n",
]


def matching(pattern: str) -> list[int]:
    m = compile_pattern(pattern)
    return [i for i, line in enumerate(LINES) if m(line)]


def test_empty_pattern_matches_everything() -> None:
    assert matching("") == list(range(len(LINES)))
    assert matching("   ") == list(range(len(LINES)))


def test_terms_are_anded_and_case_sensitive() -> None:
    assert matching("ERROR") == [1, 4]
    assert matching("error") == []
    assert matching("ERROR ValueError") == [1]


def test_quoted_phrase() -> None:
    assert matching('"alice logged"') == [3]
    assert matching('"logged alice"') == []


def test_exclusion() -> None:
    assert matching("ERROR -ValueError") == [4]
    assert matching('ERROR -"bad input"') == [4]


def test_any_of() -> None:
    assert matching("?WARNING ?alice") == [2, 3]


@pytest.mark.parametrize("pattern, expected", [
    ('{ $.level = "ERROR" }', [4]),
    ('{$.level="ERROR"}', [4]),
    ('{ $.level != "ERROR" }', [5, 6]),
    ('{ $.level = "ERR*" }', [4]),
    ('{ $.code >= 500 }', [4]),
    ('{ $.code < 500 }', [5]),
    ('{ $.code = 200 }', [5]),
    ('{ $.ok IS TRUE }', [5]),
    ('{ $.ok IS FALSE }', [4]),
    ('{ $.message IS NULL }', [6]),
    ('{ $.user NOT EXISTS }', [4, 6]),
    ('{ $.user.id = 7 }', [5]),
    ('{ $.tags[1] = "b" }', [4]),
    ('{ $.level = "ERROR" || $.level = "DEBUG" }', [4, 6]),
    ('{ ($.level = "INFO" || $.level = "ERROR") && $.code > 300 }', [4]),
])
def test_json_patterns(pattern: str, expected: list[int]) -> None:
    assert matching(pattern) == expected


@pytest.mark.parametrize("pattern", [
    '"unterminated', "-", "?", "ERROR ?WARN", "-only",
    "{ $.level = }", '{ $.level = "x"', '{ $.level = "x" } extra', "{ level = 1 }",
    '{ $.a < "x" }', "{ $.a IS MAYBE }", "{ $.a NOT THERE }",
    "[ip, user]", "%ERR.*%",
    "{ " + " && ".join(["$.a = 1"] * 65) + " }",
])
def test_refused_patterns(pattern: str) -> None:
    with pytest.raises(PatternError):
        compile_pattern(pattern)
