"""SQS FIFO queues' decisions, pure (time passed in): which deduplication id a send has, whether
it is a duplicate, and which visible messages a receive may take.

Ordering: messages of one ``MessageGroupId`` are delivered in send order, and while any
message of a group is in flight (received, neither deleted nor back to visible) no other
message of that group is delivered — one in-flight batch per group. Groups are independent.

Deduplication: the id is ``MessageDeduplicationId`` or, with ``ContentBasedDeduplication``,
the SHA-256 of the body. Scope ``queue`` compares ids across the queue, ``messageGroup`` within
the message's group. A send whose id was accepted less than the window ago is answered
successfully with the first message's id and sequence number, and nothing is stored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from .limits import DEFAULT_LIMITS

SUFFIX = ".fifo"
DEDUP_SCOPES = ("queue", "messageGroup")
THROUGHPUT_LIMITS = ("perQueue", "perMessageGroupId")


def is_fifo(name: str) -> bool:
    return name.endswith(SUFFIX)


class FifoError(ValueError):
    """A send the FIFO rules refuse (the shell answers InvalidParameterValue)."""


def dedup_id(explicit: str | None, body: str, content_based: bool) -> str:
    if explicit:
        return explicit
    if not content_based:
        raise FifoError("The queue should either have ContentBasedDeduplication enabled or "
                        "MessageDeduplicationId provided explicitly")
    return hashlib.sha256(body.encode()).hexdigest()


def dedup_scope_key(scope: str, group: str) -> str:
    """The part of the deduplication key beside the id: the group, or nothing (whole queue)."""
    return group if scope == "messageGroup" else ""


def is_duplicate(first_sent_ms: int | None, now_ms: int,
                 window_ms: int = DEFAULT_LIMITS.sqs_fifo_dedup_window_ms) -> bool:
    return first_sent_ms is not None and now_ms - first_sent_ms < window_ms


def check_settings(content_based: str, scope: str, throughput: str) -> None:
    """FIFO queue attributes as SQS checks them together."""
    if content_based not in ("true", "false"):
        raise FifoError("ContentBasedDeduplication must be true or false")
    if scope not in DEDUP_SCOPES:
        raise FifoError("DeduplicationScope must be queue or messageGroup")
    if throughput not in THROUGHPUT_LIMITS:
        raise FifoError("FifoThroughputLimit must be perQueue or perMessageGroupId")
    if throughput == "perMessageGroupId" and scope != "messageGroup":
        raise FifoError("FifoThroughputLimit perMessageGroupId needs DeduplicationScope "
                        "messageGroup")


@dataclass(frozen=True)
class Candidate:
    id: str
    group: str
    seq: int


def pick(visible: Iterable[Candidate], in_flight_groups: set[str], n: int) -> list[Candidate]:
    """Up to ``n`` visible messages a receive may take: in sequence order, none of a group
    that has a message in flight, and within a group only the head run (a group's messages
    after one that is not taken are not taken either)."""
    out: list[Candidate] = []
    stopped = set(in_flight_groups)
    for c in sorted(visible, key=lambda c: c.seq):
        if len(out) >= n:
            break
        if c.group in stopped:
            continue
        out.append(c)
    return out


def sequence_number(seq: int) -> str:
    """SQS's SequenceNumber: a 128-bit decimal, shown 20 digits wide."""
    return f"{seq:020d}"
