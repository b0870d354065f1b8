"""The invoke core (core/invoke.py), stimulus by stimulus: no I/O, time passed in."""

from cellcloud.core.invoke import (
    AgentBack,
    AgentLost,
    Answer,
    CreateEnv,
    DestroyEnv,
    EnvCreated,
    EnvCreateFailed,
    FunctionRef,
    InvokeCore,
    InvokeFinished,
    InvokeParams,
    InvokeRequested,
    MarkAgentDown,
    ProvisionedSet,
    RunInvoke,
    Throttle,
    Tick,
)
from cellcloud.core.placement import Placement, Use
from cellcloud.core.placement import Throttle as PlacementThrottle
from cellcloud.core.poison import PoisonDetector, PoisonParams
from cellcloud.core.sharding import PlainSharder, Worker

F = FunctionRef("a/f/1", "a/f", timeout_ms=1000, memory_mb=128)
G = FunctionRef("a/g/1", "a/g", timeout_ms=1000, memory_mb=128)


def _core(agents=("a1", "a2"), shard_size=2, memory_mb_max=None, **params) -> InvokeCore:
    placement = Placement(env_id_prefix="t", idle_timeout_ms=60_000)
    for a in agents:
        placement.add_agent(a, 10, memory_mb_max)
    return InvokeCore(placement, params=InvokeParams(answer_slack_ms=500, **params),
                      poison=PoisonDetector(PoisonParams.for_shard(shard_size)),
                      sharder=PlainSharder([Worker(a) for a in agents], shard_size))


def _one(out, kind):
    found = [i for i in out if isinstance(i, kind)]
    assert len(found) == 1, out
    return found[0]


def _running(core, rid, fn=F, now=0) -> RunInvoke:
    create = _one(core.handle(InvokeRequested(rid, fn), now), CreateEnv)
    return _one(core.handle(EnvCreated(create.env_id), now), RunInvoke)


def test_cold_then_warm_reuse_and_answer():
    core = _core()
    run = _running(core, "r1")
    assert run.cold
    out = core.handle(InvokeFinished("r1", "ok"), 5)
    assert _one(out, Answer).ok
    assert core.inflight_total == 0
    out = core.handle(InvokeRequested("r2", F), 6)
    warm = _one(out, RunInvoke)
    assert warm.env_id == run.env_id and not warm.cold


def test_transport_lost_is_answered_never_run_again():
    core = _core()
    _running(core, "r1")
    out = core.handle(InvokeFinished("r1", "transport_lost"), 10)
    answer = _one(out, Answer)
    assert not answer.ok and answer.error_type == "ServiceException"
    assert not [i for i in out if isinstance(i, (RunInvoke, CreateEnv))]
    assert isinstance(out[0], MarkAgentDown)


def test_create_failure_retries_on_another_agent_of_the_shard():
    core = _core(agents=("a1", "a2", "a3"), shard_size=2)
    first = _one(core.handle(InvokeRequested("r1", F), 0), CreateEnv)
    out = core.handle(EnvCreateFailed(first.env_id, "error"), 1)
    second = _one(out, CreateEnv)
    assert second.agent_id != first.agent_id
    assert {first.agent_id, second.agent_id} == set(core.shard_of("a/f"))
    out = core.handle(EnvCreateFailed(second.env_id, "agent_full"), 2)
    throttle = _one(out, Throttle)  # both agents of the shard refused for capacity
    assert throttle.reason == "ConcurrentInvocationLimitExceeded"
    assert core.inflight_total == 0


def test_env_gone_is_placed_again_a_bounded_number_of_times():
    core = _core(env_gone_retries_max=2)
    _running(core, "r1")
    for n in range(2):
        out = core.handle(InvokeFinished("r1", "env_gone"), n)
        create = _one(out, CreateEnv)
        _one(core.handle(EnvCreated(create.env_id), n), RunInvoke)
    out = core.handle(InvokeFinished("r1", "env_gone"), 9)
    assert not _one(out, Answer).ok and core.inflight_total == 0


def test_deadline_answers_and_the_slot_is_held_until_the_agent_reports():
    core = _core()
    _running(core, "r1", fn=FunctionRef("a/f/1", "a/f", 1000, reserved=1))
    assert core.handle(Tick(), 1499) == []
    answer = _one(core.handle(Tick(), 1500), Answer)
    assert not answer.ok and "not answered within" in answer.message
    # The handler may still run: reserved concurrency 1 is still taken.
    out = core.handle(InvokeRequested("r2", FunctionRef("a/f/1", "a/f", 1000, reserved=1)), 1501)
    assert _one(out, Throttle).reason == "ReservedFunctionConcurrentInvocationLimitExceeded"
    assert core.handle(InvokeFinished("r1", "ok"), 1600) == []  # answered already
    assert core.inflight_total == 0


def test_reserved_zero_is_flagged_for_async_events():
    core = _core()
    out = core.handle(InvokeRequested("r1", FunctionRef("a/f/1", "a/f", 1000, reserved=0)), 0)
    assert _one(out, Throttle).reserved_zero


def test_reserved_concurrency_counts_all_versions():
    core = _core()
    v1 = FunctionRef("a/f/1", "a/f", 1000, reserved=1)
    v2 = FunctionRef("a/f/2", "a/f", 1000, reserved=1)
    _one(core.handle(InvokeRequested("r1", v1), 0), CreateEnv)
    _one(core.handle(InvokeRequested("r2", v2), 0), Throttle)


def test_cell_cap():
    core = _core(invokes_inflight_max=1)
    _one(core.handle(InvokeRequested("r1", F), 0), CreateEnv)
    assert _one(core.handle(InvokeRequested("r2", G), 0), Throttle).reason == \
        "CellConcurrencyLimitExceeded"


def test_agent_memory_is_known_to_placement_not_learnt_from_refusals():
    core = _core(agents=("a1", "a2"), memory_mb_max=256)
    big = FunctionRef("a/f/1", "a/f", 1000, memory_mb=256)
    first = _one(core.handle(InvokeRequested("r1", big), 0), CreateEnv)
    second = _one(core.handle(InvokeRequested("r2", big), 0), CreateEnv)
    assert first.agent_id != second.agent_id
    # Both agents' memory is committed: the third is throttled without asking an agent.
    out = core.handle(InvokeRequested("r3", big), 0)
    assert _one(out, Throttle).reason == "ConcurrentInvocationLimitExceeded"
    core.handle(AgentBack("a1", 10, 512), 1)  # the agent reports a larger budget
    assert _one(core.handle(InvokeRequested("r4", big), 2), CreateEnv).agent_id == "a1"


# -- issue #20: a host's death is one function's fault only under that function alone ---------

def test_agent_death_under_one_functions_invocation_counts_against_it():
    core = _core()
    run = _running(core, "r1")
    core.handle(InvokeFinished("r1", "transport_lost"), 10)
    assert core.poison.state("a/f") == "throttled"
    out = core.handle(InvokeRequested("r2", F), 11)
    assert _one(out, Throttle).reason == "FunctionKillsWorkers"
    assert run.agent_id in core.placement.agents


def test_agent_death_while_running_other_functions_is_nobodys_fault():
    core = _core(agents=("a1",), shard_size=1)
    _running(core, "r1", F)
    _running(core, "r2", G)
    core.handle(InvokeFinished("r1", "transport_lost"), 10)
    core.handle(InvokeFinished("r2", "transport_lost"), 10)
    assert core.poison.state("a/f") == "ok" and core.poison.state("a/g") == "ok"
    assert core.counters["poison_spared"] == 1


def test_agent_death_with_nothing_in_flight_is_nobodys_fault():
    core = _core()
    _running(core, "r1")
    core.handle(InvokeFinished("r1", "ok"), 5)
    out = core.handle(AgentLost("a1"), 6)
    core.handle(AgentLost("a2"), 6)
    assert _one(out, MarkAgentDown)
    assert core.poison.state("a/f") == "ok"


def test_call_never_delivered_is_not_charged_and_is_placed_elsewhere():
    core = _core(agents=("a1", "a2", "a3"), shard_size=2)
    run = _running(core, "r1")
    core.handle(InvokeFinished("r1", "ok"), 5)
    out = core.handle(InvokeRequested("r2", F), 6)
    assert _one(out, RunInvoke).env_id == run.env_id
    out = core.handle(InvokeFinished("r2", "not_delivered"), 7)
    create = _one(out, CreateEnv)
    assert create.agent_id != run.agent_id and core.poison.state("a/f") == "ok"


# -- provisioned pools -------------------------------------------------------------------------

def test_provisioned_pool_is_replaced_after_its_agent_is_lost():
    core = _core()
    creates = [i for i in core.handle(ProvisionedSet(F, 2), 0) if isinstance(i, CreateEnv)]
    assert len(creates) == 2 and all(c.request_id is None for c in creates)
    for c in creates:
        core.handle(EnvCreated(c.env_id), 1)
    lost = creates[0].agent_id
    core.handle(AgentLost(lost), 2)
    again = [i for i in core.handle(Tick(), 3) if isinstance(i, CreateEnv)]
    assert len(again) == 1 and again[0].agent_id != lost


def test_retired_function_destroys_its_idle_environments():
    from cellcloud.core.invoke import FunctionRetired
    core = _core()
    run = _running(core, "r1")
    core.handle(InvokeFinished("r1", "ok"), 1)
    assert core.handle(FunctionRetired("a/f/1"), 2) == [DestroyEnv(run.env_id, run.agent_id)]


def test_placement_cap_holds_for_warm_provisioned_environments():
    # Regression (found by frontend/sim.py): a provisioned pool's idle environments were
    # handed out past the per-version concurrency limit.
    p = Placement(env_id_prefix="t", idle_timeout_ms=60_000)
    p.add_agent("a1", 10)
    p.set_provisioned("k", 2)
    for c in p.provision(0):
        p.prewarmed(c.env_id, 0)
    assert isinstance(p.acquire("k", 1, 1), Use)
    assert isinstance(p.acquire("k", 1, 1), PlacementThrottle)


# -- leases (a router's claim on one warm environment) -----------------------------------------

def test_lease_is_counted_revoked_at_expiry_and_freed_only_when_the_agent_confirms():
    from cellcloud.core.invoke import (
        GrantLease,
        LeaseRequested,
        LeaseReturned,
        LeaseRevoked,
        RevokeLease,
    )
    core = _core(lease_ms=1000)
    capped = FunctionRef("a/f/1", "a/f", 100, reserved=1)
    create = _one(core.handle(LeaseRequested("l1", "router-1", capped), 0), CreateEnv)
    grant = _one(core.handle(EnvCreated(create.env_id), 1), GrantLease)
    assert grant.env_id == create.env_id and grant.expires_ms == 1001
    # The lease holds the function's only slot.
    assert _one(core.handle(InvokeRequested("r1", capped), 2), Throttle)
    revoke = _one(core.handle(Tick(), 1001), RevokeLease)
    assert revoke.lease_id == "l1"
    assert _one(core.handle(InvokeRequested("r2", capped), 1002), Throttle)  # not yet free
    assert core.handle(LeaseRevoked("l1"), 1003) == []
    run = _one(core.handle(InvokeRequested("r3", capped), 1004), RunInvoke)
    assert run.env_id == grant.env_id  # the warm environment is reused
    assert core.handle(LeaseReturned("l1"), 1005) == []  # late: ignored


def test_lease_holder_lost_revokes_its_leases():
    from cellcloud.core.invoke import GrantLease, LeaseHolderLost, LeaseRequested, RevokeLease
    core = _core()
    create = _one(core.handle(LeaseRequested("l1", "router-1", F), 0), CreateEnv)
    _one(core.handle(EnvCreated(create.env_id), 1), GrantLease)
    assert _one(core.handle(LeaseHolderLost("router-1"), 2), RevokeLease).lease_id == "l1"
    assert core.inflight_total == 1  # until the agent confirms


def test_a_warm_only_lease_never_costs_a_cold_start():
    from cellcloud.core.invoke import GrantLease, LeaseRequested
    core = _core()
    out = core.handle(LeaseRequested("l1", "router-1", F, warm_only=True), 0)
    refused = _one(out, Answer)
    assert not refused.ok and refused.error_type == "NoWarmEnvironment"
    assert not [i for i in out if isinstance(i, CreateEnv)] and core.inflight_total == 0
    run = _running(core, "r1", now=1)
    core.handle(InvokeFinished("r1", "ok"), 2)
    grant = _one(core.handle(LeaseRequested("l2", "router-1", F, warm_only=True), 3), GrantLease)
    assert grant.env_id == run.env_id and core.inflight_total == 1


def test_retired_function_revokes_its_leases():
    # New code or configuration: no invocation of the old one may start under a lease.
    from cellcloud.core.invoke import FunctionRetired, GrantLease, LeaseRequested, RevokeLease
    core = _core()
    create = _one(core.handle(LeaseRequested("l1", "router-1", F), 0), CreateEnv)
    grant = _one(core.handle(EnvCreated(create.env_id), 1), GrantLease)
    revoke = _one(core.handle(FunctionRetired("a/f/1"), 2), RevokeLease)
    assert (revoke.lease_id, revoke.env_id) == ("l1", grant.env_id)


def test_a_reserved_concurrency_change_revokes_the_functions_leases():
    from cellcloud.core.invoke import GrantLease, LeaseRequested, ReservedChanged, RevokeLease
    core = _core()
    create = _one(core.handle(LeaseRequested("l1", "router-1", F), 0), CreateEnv)
    _one(core.handle(EnvCreated(create.env_id), 1), GrantLease)
    assert core.handle(ReservedChanged("a/g"), 2) == []  # another function: untouched
    assert _one(core.handle(ReservedChanged("a/f"), 3), RevokeLease).lease_id == "l1"
