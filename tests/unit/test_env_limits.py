"""The pure parts of the environments' limits and privilege checks."""

from __future__ import annotations

from cellcloud.core.limits import DEFAULT_LIMITS
from cellcloud.sandbox.cgroups import cpu_quota_us
from cellcloud.sandbox.jail import privilege_problems


def test_cpu_quota_is_the_memorys_share_of_a_vcpu() -> None:
    period = DEFAULT_LIMITS.env_cpu_period_us
    assert DEFAULT_LIMITS.memory_mb_per_vcpu == 1769
    assert cpu_quota_us(1769) == period  # one full vCPU, as on Lambda
    assert cpu_quota_us(128) == period * 128 // 1769  # 0.072 vCPU
    assert cpu_quota_us(10_240) == period * 10_240 // 1769  # ~5.8 vCPUs
    assert cpu_quota_us(3538) == 2 * period
    assert cpu_quota_us(1) == DEFAULT_LIMITS.env_cpu_quota_us_min  # the kernel's minimum


def test_init_phase_gets_at_least_one_vcpu() -> None:
    period = DEFAULT_LIMITS.env_cpu_period_us
    assert cpu_quota_us(128, init=True) == period * DEFAULT_LIMITS.env_init_vcpu_min
    assert cpu_quota_us(10_240, init=True) == cpu_quota_us(10_240)  # already above it


ZERO = {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapBnd": 0, "CapAmb": 0}


def test_privilege_check_accepts_a_fully_dropped_process() -> None:
    assert privilege_problems((7, 7, 7), (8, 8, 8), [], ZERO, uid=7, gid=8) == []


def test_privilege_check_names_every_leftover() -> None:
    # A saved uid of 0 could setuid(0) back; a capability in any set, or a bounding set
    # that still holds one, is a privilege kept.
    assert privilege_problems((7, 7, 0), (8, 8, 8), [], ZERO, uid=7, gid=8)
    assert privilege_problems((7, 7, 7), (0, 8, 8), [], ZERO, uid=7, gid=8)
    assert privilege_problems((7, 7, 7), (8, 8, 8), [0], ZERO, uid=7, gid=8)
    for name in ZERO:
        caps = dict(ZERO, **{name: 1 << 21})
        problems = privilege_problems((7, 7, 7), (8, 8, 8), [], caps, uid=7, gid=8)
        assert len(problems) == 1 and name in problems[0]
    missing = {k: v for k, v in ZERO.items() if k != "CapBnd"}
    assert privilege_problems((7, 7, 7), (8, 8, 8), [], missing, uid=7, gid=8)
    # Only a test's negative control (the capbset layer off) may leave the bounding set.
    full_bounding = dict(ZERO, CapBnd=(1 << 41) - 1)
    assert privilege_problems((7, 7, 7), (8, 8, 8), [], full_bounding, uid=7, gid=8,
                              bounding_set_empty=False) == []
