"""CloudWatch Logs filter patterns (FilterLogEvents' ``filterPattern``), pure.

Two kinds, as CloudWatch has them:

* **terms** — ``ERROR`` (the event contains it; case-sensitive), several terms (all of
  them), ``"a quoted phrase"``, ``-term`` / ``-"phrase"`` (none of these), ``?term``
  (at least one of the ``?`` terms). An empty pattern matches every event.
* **JSON** — ``{ $.level = "ERROR" }``: selectors ``$.a.b``, ``$.a[0]``; operators
  ``=``, ``!=`` (strings, ``*`` as a wildcard, or numbers), ``<``, ``<=``, ``>``, ``>=``
  (numbers); ``IS TRUE``, ``IS FALSE``, ``IS NULL``, ``NOT EXISTS``; ``&&``, ``||`` and
  parentheses. An event that is not a JSON object matches no JSON pattern.

``compile_pattern(text)`` raises :class:`PatternError` (the API's
``InvalidParameterException``) for anything else: space-delimited ``[...]`` and ``%regex%``
patterns are not supported, and are refused by name rather than matched wrongly. A compiled
pattern is a plain function ``str -> bool``; its cost is bounded by the pattern's length
(``logs_filter_pattern_chars_max``) times the event's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Matcher = Callable[[str], bool]

# Bounds of a JSON pattern's parse (its length is bounded by the caller too).
json_terms_max = 64
selector_parts_max = 32


class PatternError(ValueError):
    """A filter pattern this module does not accept (``InvalidParameterException``)."""


def compile_pattern(text: str) -> Matcher:
    text = text.strip()
    if not text:
        return _all
    if text.startswith("{"):
        return _JsonParser(text).parse()
    if text.startswith("["):
        raise PatternError("space-delimited filter patterns ([...]) are not supported")
    if text.startswith("%"):
        raise PatternError("regular expression filter patterns (%...%) are not supported")
    return _compile_terms(text)


def _all(_message: str) -> bool:
    return True


# -- terms ----------------------------------------------------------------------------------
def _terms(text: str) -> list[tuple[str, str]]:
    """(prefix, term) pairs: prefix '' (required), '-' (excluded) or '?' (any of)."""
    out: list[tuple[str, str]] = []
    i = 0
    n = len(text)
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        prefix = ""
        if text[i] in "-?":
            prefix = text[i]
            i += 1
            if i >= n or text[i].isspace():
                raise PatternError(f"'{prefix}' must be followed by a term")
        if text[i] == '"':
            end = i + 1
            buf = []
            while end < n and text[end] != '"':
                if text[end] == "\\" and end + 1 < n:
                    end += 1
                buf.append(text[end])
                end += 1
            if end >= n:
                raise PatternError("unterminated quoted phrase in the filter pattern")
            term = "".join(buf)
            i = end + 1
        else:
            end = i
            while end < n and not text[end].isspace():
                end += 1
            term = text[i:end]
            i = end
        if not term:
            raise PatternError("empty term in the filter pattern")
        out.append((prefix, term))
    return out


def _compile_terms(text: str) -> Matcher:
    terms = _terms(text)
    required = [t for p, t in terms if p == ""]
    excluded = [t for p, t in terms if p == "-"]
    any_of = [t for p, t in terms if p == "?"]
    if any_of and (required or excluded):
        raise PatternError("'?' terms cannot be mixed with other terms")
    if excluded and not required:
        raise PatternError("a pattern of only excluded ('-') terms matches nothing to exclude "
                           "from; add a term")

    def match(message: str) -> bool:
        if any_of:
            return any(t in message for t in any_of)
        return all(t in message for t in required) and not any(t in message for t in excluded)

    return match


# -- JSON ------------------------------------------------------------------------------------
_MISSING = object()

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<op>&&|\|\||!=|<=|>=|=|<|>|\(|\)|\{|\})
    | (?P<sel>\$(?:\.[A-Za-z0-9_\-@$]+|\[\d+\])*)
    | (?P<str>"(?:[^"\\]|\\.)*")
    | (?P<num>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)
    | (?P<word>[A-Za-z_*][A-Za-z0-9_*.\-]*)
    )""", re.VERBOSE)


@dataclass(frozen=True)
class _Tok:
    kind: str  # op, sel, str, num, word
    text: str


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i = 0
    text = text.rstrip()
    while i < len(text):
        m = _TOKEN.match(text, i)
        if m is None or m.end() == i:
            raise PatternError(f"invalid JSON filter pattern near {text[i:i + 20]!r}")
        kind = m.lastgroup
        assert kind is not None
        toks.append(_Tok(kind, m.group(kind)))
        i = m.end()
    return toks


def _select(doc: Any, selector: str) -> Any:
    parts = re.findall(r"\.([A-Za-z0-9_\-@$]+)|\[(\d+)\]", selector[1:])
    if len(parts) > selector_parts_max:
        raise PatternError(f"a selector has more than {selector_parts_max} parts")
    cur = doc
    for key, index in parts:
        if key:
            if not isinstance(cur, dict) or key not in cur:
                return _MISSING
            cur = cur[key]
        else:
            if not isinstance(cur, list) or int(index) >= len(cur):
                return _MISSING
            cur = cur[int(index)]
    return cur


def _wildcard(pattern: str) -> re.Pattern[str]:
    return re.compile("".join(".*" if c == "*" else re.escape(c) for c in pattern), re.DOTALL)


_Pred = Callable[[Any], bool]


class _JsonParser:
    def __init__(self, text: str) -> None:
        self.toks = _tokenize(text)
        self.i = 0
        self.terms = 0

    def _peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _take(self) -> _Tok:
        tok = self._peek()
        if tok is None:
            raise PatternError("the JSON filter pattern ends too early")
        self.i += 1
        return tok

    def _expect(self, text: str) -> None:
        tok = self._take()
        if tok.text != text:
            raise PatternError(f"expected {text!r} in the JSON filter pattern, found {tok.text!r}")

    def parse(self) -> Matcher:
        self._expect("{")
        pred = self._or()
        self._expect("}")
        if self._peek() is not None:
            raise PatternError("text after the closing '}' of the JSON filter pattern")

        def match(message: str) -> bool:
            s = message.strip()
            if not s.startswith("{"):
                return False
            try:
                doc = json.loads(s)
            except ValueError:
                return False
            return isinstance(doc, dict) and pred(doc)

        return match

    def _or(self) -> _Pred:
        left = self._and()
        while (tok := self._peek()) is not None and tok.text == "||":
            self.i += 1
            right = self._and()
            left = (lambda a, b: lambda d: a(d) or b(d))(left, right)
        return left

    def _and(self) -> _Pred:
        left = self._unit()
        while (tok := self._peek()) is not None and tok.text == "&&":
            self.i += 1
            right = self._unit()
            left = (lambda a, b: lambda d: a(d) and b(d))(left, right)
        return left

    def _unit(self) -> _Pred:
        tok = self._take()
        if tok.text == "(":
            pred = self._or()
            self._expect(")")
            return pred
        if tok.kind != "sel":
            raise PatternError(f"expected a selector ($.field) in the JSON filter pattern, "
                               f"found {tok.text!r}")
        self.terms += 1
        if self.terms > json_terms_max:
            raise PatternError(f"a JSON filter pattern has at most {json_terms_max} comparisons")
        sel = tok.text
        _select({}, sel)  # checks the selector's size once, at compile time
        op = self._take()
        if op.kind == "word" and op.text.upper() == "IS":
            what = self._take().text.upper()
            if what == "TRUE":
                return lambda d: _select(d, sel) is True
            if what == "FALSE":
                return lambda d: _select(d, sel) is False
            if what == "NULL":
                return lambda d: _select(d, sel) is None
            raise PatternError(f"IS {what}: expected TRUE, FALSE or NULL")
        if op.kind == "word" and op.text.upper() == "NOT":
            if self._take().text.upper() != "EXISTS":
                raise PatternError("NOT must be followed by EXISTS")
            return lambda d: _select(d, sel) is _MISSING
        if op.kind != "op" or op.text not in ("=", "!=", "<", "<=", ">", ">="):
            raise PatternError(f"expected a comparison after {sel}, found {op.text!r}")
        value = self._take()
        if value.kind == "num":
            number = float(value.text)
            cmp = _NUMERIC[op.text]

            def num_pred(d: Any) -> bool:
                v = _select(d, sel)
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    return False
                return cmp(float(v), number)

            return num_pred
        if op.text not in ("=", "!="):
            raise PatternError(f"{op.text} compares numbers only")
        if value.kind == "str":
            literal = json.loads(value.text)
        elif value.kind == "word":
            literal = value.text  # an unquoted word, as CloudWatch accepts
        else:
            raise PatternError(f"expected a value after {sel} {op.text}, found {value.text!r}")
        rx = _wildcard(literal)
        negate = op.text == "!="

        def str_pred(d: Any) -> bool:
            v = _select(d, sel)
            if v is _MISSING:
                return False
            if isinstance(v, str):
                s = v
            elif isinstance(v, bool) or v is None or isinstance(v, (dict, list)):
                return negate
            else:
                s = json.dumps(v)
            return (rx.fullmatch(s) is not None) != negate

        return str_pred


_NUMERIC: dict[str, Callable[[float, float], bool]] = {
    "=": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
}
