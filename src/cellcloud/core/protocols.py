"""Versions of the internal protocols, and the negotiation on connect (pure: no I/O).

Each internal link speaks one protocol, named after the role that serves it: ``agent``
(frontend, router leases and control -> agent), ``frontend`` (router, control, dispatcher,
supervisor -> frontend), ``dispatcher``, ``control`` (router, operator CLI -> control) and
``router`` (control -> router's internal port). A component speaks a window of versions of
each, ``[min, max]``: the current one and the previous one (docs/design.md#protocol-versions
states the rules).

On connect a client's first call is the transport's ``hello`` (call id 0, never an op of the
server's table): ``{"protocol": name, "versions": [min, max]}``. The server answers the
highest version both speak (``{"protocol", "version", "versions": [its min, its max]}``), or
refuses with ``ProtocolVersionRefused``, naming both windows, and closes the link. A server
from before negotiation answers ``UnknownOperation``: its peer then speaks version 1 to it.
A client that sends no hello (one from before negotiation) is taken to speak version 1.

What changed, by protocol and version (the adapters below translate between the two, at the
edge of the transport, so that handlers and callers see only the current version):

- ``frontend`` 2: the router's ``http`` request is typed (:class:`~.messages.HttpRequest`)
  with whole field names (``method``, ``path``, ``query``, ``headers``, ``body``, ``account``,
  ``caller``) instead of version 1's ``m``/``p``/``q``/``h``/``b``/``a``/``c``.
- ``agent`` 2: an invoke reply no longer carries ``status`` ("ok"/"function_error": it was
  ``function_error`` said twice); a version 1 peer gets it back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: every protocol's window in this build: (oldest version served, current version)
PROTOCOLS: dict[str, tuple[int, int]] = {
    "agent": (1, 2),
    "frontend": (1, 2),
    "dispatcher": (1, 1),
    "control": (1, 1),
    "router": (1, 1),
}

HELLO_OP = "hello"  # the transport's first call on a link (call id 0), not a server op
REFUSED = "ProtocolVersionRefused"  # the error type of a refused hello


class ProtocolError(ValueError):
    """A hello that cannot be answered: an unknown protocol, a bad window, no common version."""


def window(protocol: str, cap: int | None = None) -> tuple[int, int]:
    """This build's window for ``protocol``, its top capped at ``cap`` (a build that must act
    as an older one: CELLCLOUD_PROTOCOL_MAX). A cap under the window's bottom leaves the
    window empty: such a build refuses every peer, which is what an operator asked for."""
    lo, hi = PROTOCOLS[protocol]
    if cap is not None:
        hi = min(hi, cap)
    return lo, hi


def parse_caps(spec: str) -> dict[str, int]:
    """``"agent=1,frontend=1"`` or ``"1"`` (every protocol) -> caps by protocol."""
    caps: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.rpartition("=")
        try:
            version = int(value)
        except ValueError:
            raise ProtocolError(f"CELLCLOUD_PROTOCOL_MAX: {part!r} is not "
                                "protocol=version or a version") from None
        if version < 1:
            raise ProtocolError(f"CELLCLOUD_PROTOCOL_MAX: {part!r}: versions start at 1")
        if not sep:
            caps.update(dict.fromkeys(PROTOCOLS, version))
        elif name in PROTOCOLS:
            caps[name] = version
        else:
            raise ProtocolError(f"CELLCLOUD_PROTOCOL_MAX: unknown protocol {name!r} "
                                f"(one of {', '.join(sorted(PROTOCOLS))})")
    return caps


def hello(protocol: str, versions: tuple[int, int]) -> dict[str, Any]:
    return {"protocol": protocol, "versions": [versions[0], versions[1]]}


def _versions(doc: Any, what: str) -> tuple[int, int]:
    v = doc.get("versions") if isinstance(doc, dict) else None
    if not (isinstance(v, list | tuple) and len(v) == 2
            and all(type(x) is int for x in v) and 1 <= v[0] <= v[1]):
        raise ProtocolError(f"{what}: 'versions' must be [min, max], two versions (>= 1, "
                            f"min <= max), not {v!r}")
    return v[0], v[1]


def negotiate(protocol: str, ours: tuple[int, int], doc: Any, peer: str = "the peer") -> int:
    """The server's side: the version to speak with a client whose hello is ``doc``."""
    name = doc.get("protocol") if isinstance(doc, dict) else None
    if name != protocol:
        raise ProtocolError(f"{peer} asked for protocol {name!r}; this server speaks "
                            f"{protocol!r} versions {ours[0]}..{ours[1]}")
    lo, hi = _versions(doc, f"{peer}'s hello")
    return common(protocol, ours, (lo, hi), peer)


def common(protocol: str, ours: tuple[int, int], theirs: tuple[int, int],
           peer: str = "the peer") -> int:
    """The highest version in both windows, or a :class:`ProtocolError` naming both."""
    top = min(ours[1], theirs[1])
    if top < max(ours[0], theirs[0]):
        raise ProtocolError(f"protocol {protocol!r}: {peer} speaks versions "
                            f"{theirs[0]}..{theirs[1]}, this side {ours[0]}..{ours[1]}; "
                            "no version in common (upgrade the older side first)")
    return top


def accepted(protocol: str, ours: tuple[int, int], doc: Any, peer: str = "the server") -> int:
    """The client's side: the version a server's hello answer names (checked against what
    this side offered)."""
    version = doc.get("version") if isinstance(doc, dict) else None
    if type(version) is not int or not ours[0] <= version <= ours[1]:
        raise ProtocolError(f"protocol {protocol!r}: {peer} chose version {version!r}, "
                            f"outside this side's {ours[0]}..{ours[1]}")
    return version


# -- adapters between a protocol's previous version and its current one ---------------------
Adapt = Callable[[Any], Any]


@dataclass(frozen=True)
class OpAdapter:
    """How one op of a protocol differs from the previous version; None: unchanged."""

    request_up: Adapt | None = None  # an old peer's request -> the current shape (server)
    request_down: Adapt | None = None  # a current request -> the old shape (client)
    reply_down: Adapt | None = None  # a current reply -> the old shape (server)
    item_down: Adapt | None = None  # a current streamed item -> the old shape (server)


_HTTP_V1 = {"m": "method", "p": "path", "q": "query", "h": "headers", "b": "body",
            "a": "account", "c": "caller"}
_HTTP_V2 = {v: k for k, v in _HTTP_V1.items()}


def _http_up(doc: Any) -> Any:
    if not isinstance(doc, dict):
        return doc
    out = {_HTTP_V1.get(k, k): v for k, v in doc.items()}
    return out


def _http_down(doc: Any) -> Any:
    if not isinstance(doc, dict):
        return doc
    out = {_HTTP_V2.get(k, k): v for k, v in doc.items()}
    if not out.get("c"):  # version 1 sends no caller unless it is another account
        out.pop("c", None)
    return out


def _with_status(doc: Any) -> Any:
    if isinstance(doc, dict) and "function_error" in doc and "status" not in doc:
        return {"status": "ok" if doc["function_error"] is None else "function_error", **doc}
    return doc


def _item_with_status(item: Any) -> Any:
    if isinstance(item, dict) and isinstance(item.get("r"), dict):
        return {**item, "r": _with_status(item["r"])}
    return item


#: (protocol, previous version) -> op -> how it differs from the next version
ADAPTERS: Mapping[tuple[str, int], Mapping[str, OpAdapter]] = {
    ("frontend", 1): {"http": OpAdapter(request_up=_http_up, request_down=_http_down)},
    ("agent", 1): {op: OpAdapter(reply_down=_with_status, item_down=_item_with_status)
                   for op in ("invoke", "leased_invoke")},
}


def adapters(protocol: str, version: int) -> Mapping[str, OpAdapter] | None:
    """The ops of ``protocol`` that a link at ``version`` must translate (None: none)."""
    if version >= PROTOCOLS[protocol][1]:
        return None
    if version != PROTOCOLS[protocol][1] - 1:
        raise ProtocolError(f"protocol {protocol!r}: version {version} is not served")
    return ADAPTERS.get((protocol, version))


def reply_to_version(protocol: str, op: str, version: int, doc: Any) -> Any:
    """A current reply of ``op`` as a peer at ``version`` gets it."""
    table = adapters(protocol, version)
    adapter = table.get(op) if table else None
    return adapter.reply_down(doc) if adapter and adapter.reply_down else doc


def request_to_version(protocol: str, op: str, version: int, doc: Any) -> Any:
    """A current request of ``op`` as a server at ``version`` takes it."""
    table = adapters(protocol, version)
    adapter = table.get(op) if table else None
    return adapter.request_down(doc) if adapter and adapter.request_down else doc
