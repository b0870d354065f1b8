"""Lambda event filtering (an event source mapping's ``FilterCriteria``), pure.

A pattern is a JSON object whose keys name fields of the record and whose leaves are arrays
of *rules*; a record matches a pattern when every field of it matches (AND), and a field
matches when any rule of its array does (OR). ``"$or": [pattern, ...]`` matches when any of
its sub-patterns does. A criteria's filters are OR-ed: a record matches when any filter does.
The rules are Lambda's (the "Filter rule syntax" table of the Lambda developer guide):

==================  =========================================================
rule                matches a leaf value
==================  =========================================================
``"x"``, ``1.5``,   equal to it (strings exactly, numbers numerically,
``true``, ``null``  ``null`` only a null, ``""`` only an empty string)
``{"prefix": s}``   a string starting with ``s``
``{"suffix": s}``   a string ending with ``s``
``{"equals-ignore-case": s}``  a string equal to ``s`` ignoring case
``{"anything-but": v | [v, ...] | {"prefix": s} | {"suffix": s}}``
                    present and none of them
``{"numeric": [op, n, (op, n)]}``  a number within the range (``=``, ``<``, ``<=``,
                    ``>``, ``>=``; at most one lower and one upper bound)
``{"exists": b}``   ``true``: the field is present (as a leaf); ``false``: absent
==================  =========================================================

A data array matches when any of its elements does. A pattern naming a field that holds an
object, with a rule array, does not match (rules only match leaves). ``parse`` refuses
anything else with :class:`FilterError` naming what is wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: a pattern's JSON text (Lambda: 4,096 characters)
pattern_chars_max = 4096
#: nesting of fields and $or inside one pattern
pattern_depth_max = 16
#: rules and fields counted over one pattern (its "complexity")
pattern_rules_max = 1000
_NUMERIC_OPS = ("=", "<", "<=", ">", ">=")
#: EventBridge's range for numeric rules (the matcher is exact within it)
numeric_abs_max = 5.0e9


class FilterError(ValueError):
    """A malformed pattern; the message says where and why."""


@dataclass(frozen=True)
class _Rule:
    kind: str  # equals | prefix | suffix | ignore_case | anything_but | numeric | exists
    value: Any = None


@dataclass(frozen=True)
class Pattern:
    fields: tuple[tuple[str, Pattern | tuple[_Rule, ...]], ...]
    ors: tuple[tuple[Pattern, ...], ...] = ()


def parse(text: str) -> Pattern:
    """One filter's ``Pattern`` (JSON text), checked; raises :class:`FilterError`."""
    if not isinstance(text, str):
        raise FilterError("a pattern is a JSON string")
    if len(text) > pattern_chars_max:
        raise FilterError(f"a pattern is at most {pattern_chars_max} characters")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise FilterError(f"the pattern is not valid JSON or nests too deep ({e})") from None
    count = [0]
    return _pattern(doc, "", 0, count)


def _pattern(doc: Any, path: str, depth: int, count: list[int]) -> Pattern:
    if not isinstance(doc, dict) or not doc:
        raise FilterError(f"{path or 'the pattern'} must be a non-empty JSON object")
    if depth > pattern_depth_max:
        raise FilterError(f"the pattern nests deeper than {pattern_depth_max} levels")
    fields: list[tuple[str, Pattern | tuple[_Rule, ...]]] = []
    ors: list[tuple[Pattern, ...]] = []
    for key, value in doc.items():
        count[0] += 1
        if count[0] > pattern_rules_max:
            raise FilterError(f"the pattern has more than {pattern_rules_max} fields and rules")
        where = f"{path}.{key}" if path else key
        if key == "$or":
            if not isinstance(value, list) or len(value) < 2:
                raise FilterError(f"{where} must be an array of at least two patterns")
            ors.append(tuple(_pattern(v, where, depth + 1, count) for v in value))
        elif isinstance(value, dict):
            fields.append((key, _pattern(value, where, depth + 1, count)))
        elif isinstance(value, list):
            if not value:
                raise FilterError(f"{where}: an empty array matches nothing")
            rules = []
            for r in value:
                count[0] += 1
                rules.append(_rule(r, where))
            fields.append((key, tuple(rules)))
        else:
            raise FilterError(f"{where}: a field's value must be an array of rules or an "
                              f"object of fields, not {json.dumps(value)}")
    return Pattern(tuple(fields), tuple(ors))


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(
            v) > numeric_abs_max:
        raise FilterError(f"{where}: {json.dumps(v)} is not a number within "
                          f"±{numeric_abs_max:g}")
    return float(v)


def _rule(r: Any, where: str) -> _Rule:
    if r is None or isinstance(r, (str, bool)):
        return _Rule("equals", r)
    if isinstance(r, (int, float)):
        return _Rule("equals", _number(r, where))
    if not isinstance(r, dict) or len(r) != 1:
        raise FilterError(f"{where}: a rule is a value or an object with one operator, not "
                          f"{json.dumps(r)}")
    (op, arg), = r.items()
    if op in ("prefix", "suffix", "equals-ignore-case"):
        if not isinstance(arg, str):
            raise FilterError(f"{where}: {op} takes a string")
        return _Rule("ignore_case" if op == "equals-ignore-case" else op,
                     arg.lower() if op == "equals-ignore-case" else arg)
    if op == "exists":
        if not isinstance(arg, bool):
            raise FilterError(f"{where}: exists takes true or false")
        return _Rule("exists", arg)
    if op == "anything-but":
        if isinstance(arg, dict):
            if len(arg) != 1 or next(iter(arg)) not in ("prefix", "suffix") or not isinstance(
                    next(iter(arg.values())), str):
                raise FilterError(f"{where}: anything-but takes values, or one prefix or "
                                  "suffix")
            return _Rule("anything_but", _rule(arg, where))
        values = arg if isinstance(arg, list) else [arg]
        if not values:
            raise FilterError(f"{where}: anything-but needs at least one value")
        out = []
        for v in values:
            if v is None or isinstance(v, (dict, list, bool)):
                raise FilterError(f"{where}: anything-but takes strings or numbers")
            out.append(_number(v, where) if isinstance(v, (int, float)) else v)
        return _Rule("anything_but", tuple(out))
    if op == "numeric":
        return _Rule("numeric", _numeric(arg, where))
    raise FilterError(f"{where}: unknown operator {op!r}")


def _numeric(arg: Any, where: str) -> tuple[tuple[str, float], ...]:
    if not isinstance(arg, list) or len(arg) not in (2, 4):
        raise FilterError(f"{where}: numeric takes [op, number] or [op, number, op, number]")
    pairs = []
    for i in range(0, len(arg), 2):
        op = arg[i]
        if op not in _NUMERIC_OPS:
            raise FilterError(f"{where}: numeric operator {json.dumps(op)} is not one of "
                              f"{', '.join(_NUMERIC_OPS)}")
        pairs.append((op, _number(arg[i + 1], where)))
    if len(pairs) == 2:
        lower = [p for p in pairs if p[0] in (">", ">=")]
        upper = [p for p in pairs if p[0] in ("<", "<=")]
        if len(lower) != 1 or len(upper) != 1 or lower[0][1] >= upper[0][1]:
            raise FilterError(f"{where}: a numeric range has one lower bound (> or >=) below "
                              "one upper bound (< or <=)")
    return tuple(pairs)


_MISSING = object()


def matches(pattern: Pattern, record: Mapping[str, Any]) -> bool:
    """Whether ``record`` (a decoded JSON object) matches ``pattern``."""
    for key, sub in pattern.fields:
        value = record.get(key, _MISSING) if isinstance(record, Mapping) else _MISSING
        if isinstance(sub, Pattern):
            if isinstance(value, list):
                if not any(isinstance(v, Mapping) and matches(sub, v) for v in value):
                    return False
            elif not isinstance(value, Mapping) or not matches(sub, value):
                # an absent object only matches a sub-pattern of exists:false fields
                if value is _MISSING and _only_absent(sub):
                    continue
                return False
        elif not any(_leaf(rule, value) for rule in sub):
            return False
    return all(any(matches(p, record) for p in group) for group in pattern.ors)


def _only_absent(p: Pattern) -> bool:
    return not p.ors and all(
        (isinstance(sub, Pattern) and _only_absent(sub)) or (
            not isinstance(sub, Pattern) and any(r.kind == "exists" and r.value is False
                                                 for r in sub))
        for _, sub in p.fields)


def _leaf(rule: _Rule, value: Any) -> bool:
    if rule.kind == "exists":
        present = value is not _MISSING and not isinstance(value, Mapping) and not (
            isinstance(value, list) and not value)
        return present == rule.value
    if value is _MISSING:
        return False
    if isinstance(value, list):
        return any(_leaf(rule, v) for v in value)
    if isinstance(value, Mapping):
        return False
    return _scalar(rule, value)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _scalar(rule: _Rule, value: Any) -> bool:
    k = rule.kind
    if k == "equals":
        if rule.value is None or isinstance(rule.value, bool):
            return value is rule.value if isinstance(value, bool) or value is None else False
        if isinstance(rule.value, float):
            return _is_number(value) and float(value) == rule.value
        return isinstance(value, str) and value == rule.value
    if k == "prefix":
        return isinstance(value, str) and value.startswith(rule.value)
    if k == "suffix":
        return isinstance(value, str) and value.endswith(rule.value)
    if k == "ignore_case":
        return isinstance(value, str) and value.lower() == rule.value
    if k == "anything_but":
        if isinstance(rule.value, _Rule):
            return isinstance(value, str) and not _scalar(rule.value, value)
        for v in rule.value:
            if isinstance(v, float) and _is_number(value) and float(value) == v:
                return False
            if isinstance(v, str) and value == v:
                return False
        return True
    if k == "numeric":
        if not _is_number(value):
            return False
        x = float(value)
        return all(_compare(x, op, n) for op, n in rule.value)
    raise AssertionError(k)


def _compare(x: float, op: str, n: float) -> bool:
    return {"=": x == n, "<": x < n, "<=": x <= n, ">": x > n, ">=": x >= n}[op]


@dataclass(frozen=True)
class Criteria:
    """A mapping's ``FilterCriteria``: its patterns (OR-ed), as given and parsed."""
    texts: tuple[str, ...]
    patterns: tuple[Pattern, ...]

    def matches(self, record: Mapping[str, Any]) -> bool:
        return not self.patterns or any(matches(p, record) for p in self.patterns)


def parse_criteria(doc: Any, filters_max: int) -> Criteria:
    """``FilterCriteria`` as the API receives it: ``{"Filters": [{"Pattern": "..."}]}``."""
    if doc is None:
        return Criteria((), ())
    if not isinstance(doc, Mapping) or set(doc) - {"Filters"}:
        raise FilterError("FilterCriteria is an object with Filters")
    filters = doc.get("Filters") or []
    if not isinstance(filters, Sequence) or isinstance(filters, (str, bytes)):
        raise FilterError("FilterCriteria.Filters is a list")
    if len(filters) > filters_max:
        raise FilterError(f"at most {filters_max} filters per event source mapping")
    texts = []
    for f in filters:
        if not isinstance(f, Mapping) or set(f) - {"Pattern"} or not isinstance(
                f.get("Pattern"), str):
            raise FilterError("each filter is {\"Pattern\": \"<JSON text>\"}")
        texts.append(str(f["Pattern"]))
    return Criteria(tuple(texts), tuple(parse(t) for t in texts))


def sqs_view(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record as an SQS filter sees it: the body decoded when it is a JSON object (a
    pattern on body fields then applies to them), else the body as the plain string."""
    out = dict(record)
    body = record.get("body")
    if isinstance(body, str):
        try:
            decoded = json.loads(body)
        except ValueError:
            decoded = None
        if isinstance(decoded, dict):
            out["body"] = decoded
    return out
