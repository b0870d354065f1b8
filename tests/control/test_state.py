"""The region state machine: cells, assignment, overrides, migrations, the published map."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cellcloud.control.state import MIGRATION_TRANSITIONS, ControlError, RegionState
from cellcloud.core.cellmap import CellMap


def region(cells: int = 3) -> RegionState:
    s = RegionState()
    for i in range(cells):
        s.add_cell(f"cell-{i}", "127.0.0.1", 9000 + i)
        for a in range(4):
            s.add_agent(f"cell-{i}", f"cell-{i}-agent-{a}", f"zone-{a % 2}")
    return s


def test_assign_least_loaded_and_idempotent() -> None:
    s = region(3)
    got = [s.assign_tenant(f"t{i}") for i in range(9)]
    assert got == ["cell-0", "cell-1", "cell-2"] * 3
    assert s.assign_tenant("t0") == "cell-0"
    s.set_accepting("cell-0", False)
    assert s.assign_tenant("t9") in {"cell-1", "cell-2"}
    for c in s.cells:
        s.set_accepting(c, False)
    with pytest.raises(ControlError, match="no cell accepts"):
        s.assign_tenant("t10")


def test_map_wire_doc_and_version() -> None:
    s = region(2)
    v0 = s.version
    s.assign_tenant("acct-1")
    s.set_override("acct-2", "cell-1", "quarantine")
    assert s.version == v0 + 2
    wire = s.cell_map().to_wire()
    assert wire == {
        "version": v0 + 2,
        "cells": {"cell-0": ["127.0.0.1", 9000], "cell-1": ["127.0.0.1", 9001]},
        "assignments": {"acct-1": "cell-0"},
        "overrides": {"acct-2": "cell-1"},
    }
    m = CellMap.from_wire(wire)
    assert m.cell_for("acct-2").cell_id == "cell-1" and m.cell_for("acct-1").cell_id == "cell-0"
    s.set_override("acct-2", "cell-1", "quarantine")  # no change, no new version
    s.add_agent("cell-0", "extra")  # agents are not in the map
    assert s.version == v0 + 2
    s.set_endpoint("cell-0", "127.0.0.1", 9100)
    assert s.version == v0 + 3


def test_errors() -> None:
    s = region(1)
    with pytest.raises(ControlError, match="already exists"):
        s.add_cell("cell-0", "h", 1)
    with pytest.raises(ControlError, match="unknown cell"):
        s.set_override("t", "nope", "testing")
    with pytest.raises(ControlError, match="reason"):
        s.set_override("t", "cell-0", "vip")  # type: ignore[arg-type]
    with pytest.raises(ControlError, match="already belongs"):
        s.add_cell("cell-1", "h", 2)
        s.add_agent("cell-1", "cell-0-agent-0")


def test_migration_happy_path() -> None:
    s = region(2)
    assert s.assign_tenant("t") == "cell-0"
    m = s.begin_migration("t", "cell-1")
    assert m.state == "cloning" and s.cell_map().cell_for("t").cell_id == "cell-0"
    assert s.loads()["cell-1"] == 1  # the target counts the tenant being cloned
    v = s.version
    m = s.migration_cloned("t")
    assert m.state == "flipped" and m.flip_version == v + 1 == s.version
    assert s.cell_map().cell_for("t").cell_id == "cell-1"
    with pytest.raises(ControlError, match="routers are at version"):
        s.migration_routers_caught_up("t", v)
    assert s.migration_routers_caught_up("t", v + 1).state == "draining"
    with pytest.raises(ControlError, match="not done"):
        s.forget_migration("t")
    assert s.migration_drained("t").state == "done"
    assert s.forget_migration("t").source == "cell-0"
    assert "t" not in s.migrations


def test_migration_rules() -> None:
    s = region(2)
    s.assign_tenant("t")
    with pytest.raises(ControlError, match="no 'drained' from state 'cloning'"):
        s.begin_migration("t", "cell-1") and s.migration_drained("t")
    with pytest.raises(ControlError, match="already being migrated"):
        s.begin_migration("t", "cell-1")
    with pytest.raises(ControlError, match="being migrated"):
        s.set_override("t", "cell-1", "heavy")
    s.abort_migration("t")
    assert s.cell_of("t") == "cell-0"
    with pytest.raises(ControlError, match="already in cell"):
        s.begin_migration("t", "cell-0")
    s.set_override("t", "cell-1", "testing")
    with pytest.raises(ControlError, match="override"):
        s.begin_migration("t", "cell-1")
    with pytest.raises(ControlError, match="no cell to migrate"):
        s.begin_migration("ghost", "cell-1")
    s.clear_override("t")
    s.begin_migration("t", "cell-1")
    s.migration_cloned("t")
    with pytest.raises(ControlError, match="only a migration still cloning"):
        s.abort_migration("t")


def test_round_trip_json() -> None:
    s = region(2)
    s.assign_tenant("a")
    s.assign_tenant("b")
    s.set_override("c", "cell-1", "heavy")
    s.begin_migration("a", "cell-1")
    s.migration_cloned("a")
    t = RegionState.from_json(s.to_json())
    assert t.to_doc() == s.to_doc() and t.to_json() == s.to_json()
    assert t.cell_map().to_wire() == s.cell_map().to_wire()


class RegionMachine(RuleBasedStateMachine):
    """Random operations: the version never goes down, and changes whenever the map does."""

    def __init__(self) -> None:
        super().__init__()
        self.s = region(3)
        self.last_wire = self.s.cell_map().to_wire()

    tenants = st.sampled_from([f"t{i}" for i in range(6)])
    cells = st.sampled_from(["cell-0", "cell-1", "cell-2"])

    def _try(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        try:
            fn(*args)
        except ControlError:
            pass

    @rule(t=tenants)
    def assign(self, t: str) -> None:
        self._try(self.s.assign_tenant, t)

    @rule(t=tenants, c=cells, r=st.sampled_from(["testing", "quarantine", "heavy"]))
    def override(self, t: str, c: str, r: str) -> None:
        self._try(self.s.set_override, t, c, r)

    @rule(t=tenants)
    def clear(self, t: str) -> None:
        self.s.clear_override(t)

    @rule(t=tenants, c=cells)
    def begin(self, t: str, c: str) -> None:
        self._try(self.s.begin_migration, t, c)

    @rule(t=tenants, ev=st.sampled_from(["cloned", "caught_up", "drained", "forget", "abort"]))
    def advance(self, t: str, ev: str) -> None:
        fn = {"cloned": self.s.migration_cloned, "drained": self.s.migration_drained,
              "forget": self.s.forget_migration, "abort": self.s.abort_migration,
              "caught_up": lambda x: self.s.migration_routers_caught_up(x, self.s.version)}[ev]
        self._try(fn, t)

    @invariant()
    def versioned(self) -> None:
        wire = self.s.cell_map().to_wire()
        assert wire["version"] >= self.last_wire["version"]
        if {k: v for k, v in wire.items() if k != "version"} != {
                k: v for k, v in self.last_wire.items() if k != "version"}:
            assert wire["version"] > self.last_wire["version"]
        self.last_wire = wire
        for m in self.s.migrations.values():
            assert m.state in {s for (s, _) in MIGRATION_TRANSITIONS} | {"done"}
            if m.state != "cloning":
                assert self.s.assignments[m.tenant] == m.target
        assert RegionState.from_json(self.s.to_json()).to_doc() == self.s.to_doc()


TestRegionMachine = RegionMachine.TestCase
TestRegionMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
