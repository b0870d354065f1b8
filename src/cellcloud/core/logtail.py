"""`cellcloud logs --follow`'s bookkeeping, as AWS CLI v2's `aws logs tail --follow` does it:
poll FilterLogEvents from ``start_ms`` (inclusive), print each event once, then move
``start_ms`` to the newest timestamp seen and remember only the event ids at that instant
(the only ones the next poll can return again). Pure: the caller polls and sleeps."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

_SINCE = re.compile(r"^(\d+)\s*(s|m|h|d|w)$")
_UNIT_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
since_ms_max = 3653 * 86_400_000  # CloudWatch keeps 10 years at most


def parse_since(text: str) -> int:
    """``30s``, ``10m``, ``2h``, ``1d``, ``1w`` -> milliseconds (bounded)."""
    m = _SINCE.match(text.strip())
    if m is None:
        raise ValueError(f"--since {text!r}: give a number and a unit (s, m, h, d or w), "
                         "such as 10m")
    return min(int(m.group(1)) * _UNIT_MS[m.group(2)], since_ms_max)


class Follower:
    def __init__(self, start_ms: int) -> None:
        self.start_ms = max(0, start_ms)
        self._seen: set[str] = set()  # ids of the events at start_ms already printed

    def new(self, events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """The events not printed yet, in time order; advances the position."""
        fresh = [e for e in events if str(e.get("eventId")) not in self._seen
                 and int(e.get("timestamp", 0)) >= self.start_ms]
        fresh.sort(key=lambda e: (int(e["timestamp"]), len(str(e.get("eventId"))),
                                  str(e.get("eventId"))))
        if fresh:
            newest = int(fresh[-1]["timestamp"])
            if newest > self.start_ms:
                self.start_ms = newest
                self._seen = set()
            self._seen.update(str(e.get("eventId")) for e in fresh
                              if int(e["timestamp"]) == self.start_ms)
        return fresh
