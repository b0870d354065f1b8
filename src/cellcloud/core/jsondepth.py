"""How deep a JSON document nests, found without recursing (and without parsing it).

``json.loads`` recurses once per ``[``/``{``; a client document nested near Python's
recursion limit (1000) raises ``RecursionError`` in the parser, or in whatever walks the result
later (``json.dumps``, msgpack). Every client body is measured here first and refused over
``Limits.json_depth_max`` (512), well below that limit.

The measure: brackets outside strings. Strings are cut out with one regular expression (an
unrolled loop, no backtracking), the remaining ``[{`` become +1 and ``]}`` -1 (signed bytes),
and the running sum's maximum is the depth. A body with no more opening brackets than the limit
is within it whatever its strings hold, so the common case costs two ``bytes.count`` calls.
On a malformed document the measure is an upper bound of sorts; such a body is refused by the
parser anyway.
"""

from __future__ import annotations

import itertools
import re

from .errors import LambdaError

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_KEEP = b"[]{}"
_DROP = bytes(b for b in range(256) if b not in _KEEP)
# '[' and '{' -> 0x01 (+1); ']' and '}' -> 0xff (-1 as a signed byte).
_SIGN = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def json_depth(raw: bytes | str) -> int:
    """The deepest nesting of arrays/objects in ``raw`` (0 for a scalar)."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if b'"' in data:
        data = _STRING.sub(b"", data)
    brackets = data.translate(None, _DROP).translate(_SIGN)
    if not brackets:
        return 0
    return max(0, max(itertools.accumulate(memoryview(brackets).cast("b"))))


def json_depth_within(raw: bytes | str, depth_max: int) -> bool:
    """Whether ``raw`` nests at most ``depth_max`` deep (cheap when it obviously does)."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if data.count(b"[") + data.count(b"{") <= depth_max:
        return True
    return json_depth(data) <= depth_max


def check_json_depth(raw: bytes | str, depth_max: int) -> None:
    """Raise 400 ``InvalidRequestContentException`` when ``raw`` nests deeper than allowed."""
    if not json_depth_within(raw, depth_max):
        raise LambdaError(400, "InvalidRequestContentException",
                          f"Could not parse request body into json: nesting deeper than "
                          f"{depth_max} levels")
