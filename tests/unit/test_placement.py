from cellcloud.core.placement import Create, Destroy, NoRoom, Placement, TaskPlaced, Throttle, Use


def make(agents: int = 2, envs_max: int = 10, idle_ms: int = 1000) -> Placement:
    p = Placement(env_id_prefix="c1", idle_timeout_ms=idle_ms)
    for i in range(agents):
        p.add_agent(f"a{i}", envs_max)
    return p


def test_cold_then_warm_reuse() -> None:
    p = make()
    d = p.acquire("f", 10, now_ms=0)
    assert isinstance(d, Create)
    p.created(d.env_id, 1)
    assert p.release(d.env_id, 2) == []
    d2 = p.acquire("f", 10, now_ms=3)
    assert d2 == Use(d.env_id, d.agent_id)


def test_one_invocation_per_environment_and_spread_over_agents() -> None:
    p = make(agents=2)
    decisions = [p.acquire("f", 20, now_ms=0) for _ in range(20)]
    assert all(isinstance(d, Create) for d in decisions)
    assert len({d.env_id for d in decisions}) == 20  # type: ignore[union-attr]
    per_agent = [sum(1 for d in decisions if d.agent_id == a) for a in ("a0", "a1")]  # type: ignore[union-attr]
    assert per_agent == [10, 10]


def test_function_concurrency_limit_throttles() -> None:
    p = make()
    for _ in range(3):
        assert isinstance(p.acquire("f", 3, 0), Create)
    d = p.acquire("f", 3, 0)
    assert isinstance(d, Throttle)
    assert d.reason == "ReservedFunctionConcurrentInvocationLimitExceeded"
    # Other functions are unaffected.
    assert isinstance(p.acquire("g", 3, 0), Create)


def test_cell_full_throttles() -> None:
    p = make(agents=2, envs_max=1)
    assert isinstance(p.acquire("f", 10, 0), Create)
    assert isinstance(p.acquire("g", 10, 0), Create)
    d = p.acquire("h", 10, 0)
    assert isinstance(d, Throttle) and d.reason == "ConcurrentInvocationLimitExceeded"


def test_idle_environments_are_reaped_oldest_first() -> None:
    p = make(idle_ms=100)
    a = p.acquire("f", 10, 0)
    b = p.acquire("f", 10, 0)
    assert isinstance(a, Create) and isinstance(b, Create)
    p.created(a.env_id, 0)
    p.created(b.env_id, 0)
    p.release(a.env_id, 10)
    p.release(b.env_id, 50)
    assert p.on_tick(100) == []
    assert p.on_tick(115) == [Destroy(a.env_id, a.agent_id)]
    assert p.on_tick(200) == [Destroy(b.env_id, b.agent_id)]
    assert p.envs == {}


def test_most_recently_used_is_reused_first() -> None:
    p = make()
    a = p.acquire("f", 10, 0)
    b = p.acquire("f", 10, 0)
    assert isinstance(a, Create) and isinstance(b, Create)
    p.created(a.env_id, 0)
    p.created(b.env_id, 0)
    p.release(a.env_id, 10)
    p.release(b.env_id, 20)
    d = p.acquire("f", 10, 30)
    assert isinstance(d, Use) and d.env_id == b.env_id


def test_retire_destroys_idle_now_and_busy_on_release() -> None:
    p = make()
    a = p.acquire("f", 10, 0)
    b = p.acquire("f", 10, 0)
    assert isinstance(a, Create) and isinstance(b, Create)
    p.created(a.env_id, 0)
    p.created(b.env_id, 0)
    p.release(a.env_id, 1)
    assert p.retire_function("f") == [Destroy(a.env_id, a.agent_id)]
    assert p.release(b.env_id, 2) == [Destroy(b.env_id, b.agent_id)]
    assert p.envs == {}
    # The retired function's concurrency was given back.
    assert isinstance(p.acquire("f", 1, 3), Create)


def test_agent_down_forgets_its_environments_and_new_ones_go_elsewhere() -> None:
    p = make(agents=2)
    d = p.acquire("f", 10, 0)
    assert isinstance(d, Create)
    lost = p.agent_down(d.agent_id)
    assert lost == [d.env_id]
    for _ in range(3):
        n = p.acquire("f", 10, 0)
        assert isinstance(n, Create) and n.agent_id != d.agent_id
    # A release for a forgotten env is a no-op, not a crash.
    assert p.release(d.env_id, 1) == []


def test_eligible_agents_restrict_choice() -> None:
    p = make(agents=4)
    for _ in range(6):
        d = p.acquire("f", 10, 0, eligible_agents=["a1", "a3"])
        assert isinstance(d, Create) and d.agent_id in ("a1", "a3")


def test_discard_frees_concurrency() -> None:
    p = make()
    d = p.acquire("f", 1, 0)
    assert isinstance(d, Create)
    assert isinstance(p.acquire("f", 1, 0), Throttle)
    assert p.discard(d.env_id) == Destroy(d.env_id, d.agent_id)
    assert isinstance(p.acquire("f", 1, 0), Create)


def test_provisioned_pool_is_created_ahead_used_and_not_reaped() -> None:
    p = make(agents=2, idle_ms=100)
    p.set_provisioned("f", 3)
    creates = p.provision(now_ms=0)
    assert len(creates) == 3 and {c.agent_id for c in creates} == {"a0", "a1"}
    assert p.provision(now_ms=0) == []  # already on its way: nothing more
    for c in creates:
        p.prewarmed(c.env_id, 0)
    d = p.acquire("f", 10, now_ms=5)
    assert isinstance(d, Use) and d.env_id in {c.env_id for c in creates}
    p.release(d.env_id, 6)
    assert p.on_tick(10_000) == []  # provisioned environments are never idle-reaped


def test_provisioned_envs_do_not_count_against_concurrency_until_used() -> None:
    p = make()
    p.set_provisioned("f", 2)
    for c in p.provision(0):
        p.prewarmed(c.env_id, 0)
    a = p.acquire("f", 2, 1)
    b = p.acquire("f", 2, 1)
    assert isinstance(a, Use) and isinstance(b, Use)
    assert isinstance(p.acquire("f", 2, 1), Throttle)


def test_lost_provisioned_envs_are_replaced_and_lowering_releases_them() -> None:
    p = make(agents=2, idle_ms=100)
    p.set_provisioned("f", 2)
    creates = p.provision(0)
    for c in creates:
        p.prewarmed(c.env_id, 0)
    p.agent_down(creates[0].agent_id)
    again = p.provision(1)
    assert len(again) == 1 and again[0].agent_id != creates[0].agent_id
    p.prewarmed(again[0].env_id, 1)
    p.set_provisioned("f", 0)
    assert p.provision(2) == []
    assert len(p.on_tick(10_000)) == 2  # now ordinary idle environments, reaped when idle


def test_tasks_share_the_agents_memory_with_functions_and_stay_in_their_shard() -> None:
    p = Placement(env_id_prefix="c1", idle_timeout_ms=1000)
    for a in ("a0", "a1", "a2"):
        p.add_agent(a, 10, memory_mb_max=1024)
    shard = ("a0", "a1")
    placed = [p.place_task(f"t{i}", 512, 256, 4096, shard) for i in range(4)]
    assert sorted(x.agent_id for x in placed if isinstance(x, TaskPlaced)) \
        == ["a0", "a0", "a1", "a1"]  # spread, never on a2 (outside the shard)
    assert p.place_task("t4", 512, 256, 4096, shard) == NoRoom("RESOURCE:MEMORY")
    # a function's environment no longer fits on a full agent either
    p.memory_mb["f"] = 128
    d = p.acquire("f", 10, 0, eligible_agents=shard)
    assert isinstance(d, Throttle)
    p.release_task("t0")
    assert p.place_task("t5", 512, 256, 4096, shard) == TaskPlaced(placed[0].agent_id)  # type: ignore[union-attr]
    assert p.statistics()["agents"]["a0"]["tasks"] == 2  # type: ignore[index]


def test_task_cpu_and_a_down_shard_are_reasons() -> None:
    p = make(agents=2)
    assert p.place_task("t0", 512, 1024, 1024, ["a0"]) == TaskPlaced("a0")
    assert p.place_task("t1", 512, 256, 1024, ["a0"]) == NoRoom("RESOURCE:CPU")
    p.agent_down("a1")
    assert p.place_task("t1", 512, 256, 1024, ["a1"]) == NoRoom("AGENT")
    p.hold_task("t2", "a0", 256, 0)  # a restarted frontend's task, counted where it runs
    assert p.task_agent == {"t0": "a0", "t2": "a0"}
    assert p.agents["a0"].memory_mb == 768
    p.release_task("t2")
    p.release_task("t2")  # twice: nothing more
    assert p.agents["a0"].memory_mb == 512
