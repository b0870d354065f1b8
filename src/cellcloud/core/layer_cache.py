"""Which unpacked image layers an agent forgets (agent/images.py ``LayerCache``): pure, no I/O.

The agent's layer cache is bounded by ``agent_layer_cache_bytes_max`` (unpacked bytes, each
layer's size recorded at unpack). When it is over, the least recently used layers that no live
environment uses (and that are not protected: the layer just unpacked for a create that is
about to use it) are forgotten, oldest first, until it fits. A layer in use is never chosen, so
the cache may stay over its limit while live environments hold more than it: it then shrinks as
soon as they go (the agent decides again on every release). The caller reports what it could
not free (``Decision.over_bytes``) rather than failing the environment that needs the layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class CachedLayer:
    hex: str  # the layer's sha256 hex (its directory's name)
    size_bytes: int  # unpacked bytes, recorded at unpack
    last_used_ms: int  # unpacked, or last named by a create_env
    users: int  # live environments (and creates under way) on this layer

    def __post_init__(self) -> None:
        assert self.size_bytes >= 0 and self.users >= 0, self


@dataclass(frozen=True)
class Decision:
    evict: tuple[str, ...]  # hex digests to forget, least recently used first
    over_bytes: int  # still over the limit after those (layers in use or protected); 0 if fits


def evictions(layers: Iterable[CachedLayer], *, budget_bytes: int,
              protect: frozenset[str] = frozenset()) -> Decision:
    """Least recently used unused layers to forget so the cache fits ``budget_bytes``.
    Ties in ``last_used_ms`` are broken by digest, so the decision is deterministic."""
    assert budget_bytes >= 0
    layers = list(layers)
    total = sum(layer.size_bytes for layer in layers)
    if total <= budget_bytes:
        return Decision((), 0)
    candidates = sorted((layer for layer in layers
                         if layer.users == 0 and layer.hex not in protect),
                        key=lambda layer: (layer.last_used_ms, layer.hex))
    chosen: list[str] = []
    for layer in candidates:
        if total <= budget_bytes:
            break
        chosen.append(layer.hex)
        total -= layer.size_bytes
    return Decision(tuple(chosen), max(0, total - budget_bytes))
