"""Environment uid ranges are claimed per region, host-wide, for the supervisor's life."""

from __future__ import annotations

import os

from cellcloud.region.supervisor import claim_uid_range, uid_range_base, uid_range_size


def test_claims_are_disjoint_and_freed_with_their_holder(tmp_path: str) -> None:
    d = os.path.join(str(tmp_path), "ranges")
    first, fd1 = claim_uid_range(d)
    second, fd2 = claim_uid_range(d)
    assert first == uid_range_base
    assert second == uid_range_base + uid_range_size  # the next range, not the same one
    os.close(fd1)  # the first region stops (or dies: the kernel drops its lock)
    again, fd3 = claim_uid_range(d)
    assert again == first
    os.close(fd2)
    os.close(fd3)
