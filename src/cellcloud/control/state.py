"""The region's truth, as a pure state machine: cells and their agents, which cell serves each
tenant (an explicit table plus an override table), and tenant migrations between cells.

No I/O. The control plane's shell persists :meth:`RegionState.to_json` in the region's
configuration store (``control/configstore.py``) with a compare-and-set, and pushes
:meth:`RegionState.cell_map` (the router's ``CellMap`` wire document) to every router.

``version`` is the map's version: it grows by one with every change that changes the map
(cells, endpoints, assignments, overrides) and never goes down (it is persisted with the rest).

A migration moves a tenant without losing a sync or an accepted async invocation:

    cloning ──cloned──> flipped ──routers_caught_up(v ≥ flip_version)──> draining ──drained──> done
    cloning ──abort──> (gone)

- *cloning*: the shell copies the tenant's functions to the target cell; the map still points
  at the source.
- *cloned* → *flipped*: the assignment now names the target; the map version at that moment is
  ``flip_version``.
- *routers_caught_up*: every router has acknowledged a map of version ≥ ``flip_version``, so
  no new request reaches the source → *draining*: the source finishes in-flight sync invokes
  and empties the tenant's async queue.
- *drained* → *done*: the shell forgets the tenant on the source, then calls
  :meth:`RegionState.forget_migration`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from cellcloud.core.cellmap import CellEndpoint, CellMap

OverrideReason = Literal["testing", "quarantine", "heavy"]
MigrationState = Literal["cloning", "flipped", "draining", "done"]
MigrationEvent = Literal["cloned", "routers_caught_up", "drained"]

cells_max = 1_000
agents_per_cell_max = 4_096
tenants_max = 1_000_000
migrations_in_flight_max = 64
state_format = 1

# Every move of a migration, in one table (h11-style): (state, event) -> next state.
MIGRATION_TRANSITIONS: dict[tuple[MigrationState, MigrationEvent], MigrationState] = {
    ("cloning", "cloned"): "flipped",
    ("flipped", "routers_caught_up"): "draining",
    ("draining", "drained"): "done",
}


class ControlError(Exception):
    """A control-plane operation that cannot be done (unknown cell, bad transition, a limit)."""


@dataclass
class Cell:
    cell_id: str
    host: str
    port: int
    accepting: bool = True  # takes new tenants
    agents: dict[str, str | None] = field(default_factory=dict)  # agent id -> zone label


@dataclass(frozen=True)
class Override:
    cell_id: str
    reason: OverrideReason


@dataclass
class Migration:
    tenant: str
    source: str
    target: str
    state: MigrationState = "cloning"
    flip_version: int | None = None


class RegionState:
    def __init__(self) -> None:
        self.version = 0
        self.cells: dict[str, Cell] = {}
        self.assignments: dict[str, str] = {}
        self.overrides: dict[str, Override] = {}
        self.migrations: dict[str, Migration] = {}

    def _changed(self) -> None:
        self.version += 1

    def _cell(self, cell_id: str) -> Cell:
        cell = self.cells.get(cell_id)
        if cell is None:
            raise ControlError(f"unknown cell {cell_id!r}")
        return cell

    # -- cells and agents ---------------------------------------------------------------------
    def add_cell(self, cell_id: str, host: str, port: int, *, accepting: bool = True) -> None:
        if cell_id in self.cells:
            raise ControlError(f"cell {cell_id!r} already exists")
        if len(self.cells) >= cells_max:
            raise ControlError(f"a region holds at most cells_max={cells_max} cells")
        if not 0 < port < 65536:
            raise ControlError(f"bad port {port}")
        self.cells[cell_id] = Cell(cell_id, host, port, accepting)
        self._changed()

    def set_endpoint(self, cell_id: str, host: str, port: int) -> None:
        cell = self._cell(cell_id)
        if (cell.host, cell.port) != (host, port):
            cell.host, cell.port = host, port
            self._changed()

    def set_accepting(self, cell_id: str, accepting: bool) -> None:
        self._cell(cell_id).accepting = accepting  # not in the map: no version change

    def add_agent(self, cell_id: str, agent_id: str, zone: str | None = None) -> None:
        cell = self._cell(cell_id)
        if agent_id not in cell.agents and len(cell.agents) >= agents_per_cell_max:
            raise ControlError(f"a cell holds at most agents_per_cell_max={agents_per_cell_max}")
        for other in self.cells.values():
            if other is not cell and agent_id in other.agents:
                raise ControlError(f"agent {agent_id!r} already belongs to cell {other.cell_id!r}")
        cell.agents[agent_id] = zone

    def remove_agent(self, cell_id: str, agent_id: str) -> None:
        if self._cell(cell_id).agents.pop(agent_id, ...) is ...:
            raise ControlError(f"cell {cell_id!r} has no agent {agent_id!r}")

    # -- tenants ------------------------------------------------------------------------------
    def cell_of(self, tenant: str) -> str | None:
        """The cell that serves the tenant now: its override, else its assignment."""
        o = self.overrides.get(tenant)
        return o.cell_id if o is not None else self.assignments.get(tenant)

    def loads(self) -> dict[str, int]:
        """Per cell: the tenants it serves now (override, else assignment), plus the tenants
        being cloned into it."""
        out = {c: 0 for c in self.cells}
        for t in self.assignments.keys() | self.overrides.keys():
            c = self.cell_of(t)
            if c in out:
                out[c] += 1
        for m in self.migrations.values():
            if m.state == "cloning" and m.target in out:
                out[m.target] += 1
        return out

    def assign_tenant(self, tenant: str) -> str:
        """The tenant's cell; a new tenant goes to the least-loaded accepting cell (ties: the
        smallest cell id)."""
        existing = self.assignments.get(tenant)
        if existing is not None:
            return existing
        if len(self.assignments) >= tenants_max:
            raise ControlError(f"a region holds at most tenants_max={tenants_max} tenants")
        accepting = [c for c in sorted(self.cells) if self.cells[c].accepting]
        if not accepting:
            raise ControlError("no cell accepts new tenants")
        loads = self.loads()
        cell_id = min(accepting, key=lambda c: (loads[c], c))
        self.assignments[tenant] = cell_id
        self._changed()
        return cell_id

    def set_override(self, tenant: str, cell_id: str, reason: OverrideReason) -> None:
        self._cell(cell_id)
        if reason not in get_args(OverrideReason):
            raise ControlError(f"override reason must be one of {get_args(OverrideReason)}")
        if tenant in self.migrations:
            raise ControlError(f"tenant {tenant!r} is being migrated")
        new = Override(cell_id, reason)
        if self.overrides.get(tenant) != new:
            self.overrides[tenant] = new
            self._changed()

    def clear_override(self, tenant: str) -> None:
        if self.overrides.pop(tenant, None) is not None:
            self._changed()

    # -- migrations ---------------------------------------------------------------------------
    def begin_migration(self, tenant: str, target: str) -> Migration:
        self._cell(target)
        source = self.assignments.get(tenant)
        if source is None:
            raise ControlError(f"tenant {tenant!r} has no cell to migrate from")
        if tenant in self.overrides:
            raise ControlError(f"tenant {tenant!r} has an override ({self.overrides[tenant].reason});"
                               " clear it first")
        if tenant in self.migrations:
            raise ControlError(f"tenant {tenant!r} is already being migrated")
        if source == target:
            raise ControlError(f"tenant {tenant!r} is already in cell {target!r}")
        active = sum(1 for m in self.migrations.values() if m.state != "done")
        if active >= migrations_in_flight_max:
            raise ControlError(f"at most migrations_in_flight_max={migrations_in_flight_max}")
        m = self.migrations[tenant] = Migration(tenant, source, target)
        return m

    def _advance(self, tenant: str, event: MigrationEvent) -> Migration:
        m = self.migrations.get(tenant)
        if m is None:
            raise ControlError(f"tenant {tenant!r} is not being migrated")
        nxt = MIGRATION_TRANSITIONS.get((m.state, event))
        if nxt is None:
            raise ControlError(f"migration of {tenant!r}: no {event!r} from state {m.state!r}")
        m.state = nxt
        return m

    def migration_cloned(self, tenant: str) -> Migration:
        """The functions are on the target: flip the map to it."""
        m = self._advance(tenant, "cloned")
        self.assignments[tenant] = m.target
        self._changed()
        m.flip_version = self.version
        return m

    def migration_routers_caught_up(self, tenant: str, min_acked_version: int) -> Migration:
        """Every router acknowledged a map of version ``min_acked_version``."""
        m = self.migrations.get(tenant)
        if m is not None and m.flip_version is not None and min_acked_version < m.flip_version:
            raise ControlError(f"routers are at version {min_acked_version}, the flip of "
                               f"{tenant!r} is version {m.flip_version}")
        return self._advance(tenant, "routers_caught_up")

    def migration_drained(self, tenant: str) -> Migration:
        return self._advance(tenant, "drained")

    def abort_migration(self, tenant: str) -> None:
        m = self.migrations.get(tenant)
        if m is None or m.state != "cloning":
            raise ControlError(f"only a migration still cloning can be aborted ({tenant!r}: "
                               f"{m.state if m else 'none'})")
        del self.migrations[tenant]

    def forget_migration(self, tenant: str) -> Migration:
        m = self.migrations.get(tenant)
        if m is None or m.state != "done":
            raise ControlError(f"migration of {tenant!r} is not done")
        return self.migrations.pop(tenant)

    # -- outputs ------------------------------------------------------------------------------
    def cell_map(self) -> CellMap:
        return CellMap(
            self.version,
            {c.cell_id: CellEndpoint(c.cell_id, c.host, c.port) for c in self.cells.values()},
            dict(self.assignments),
            {t: o.cell_id for t, o in self.overrides.items()},
        )

    def to_doc(self) -> dict[str, Any]:
        return {
            "format": state_format,
            "version": self.version,
            "cells": {c.cell_id: {"host": c.host, "port": c.port, "accepting": c.accepting,
                                  "agents": dict(c.agents)} for c in self.cells.values()},
            "assignments": dict(self.assignments),
            "overrides": {t: [o.cell_id, o.reason] for t, o in self.overrides.items()},
            "migrations": {t: {"source": m.source, "target": m.target, "state": m.state,
                               "flip_version": m.flip_version}
                           for t, m in self.migrations.items()},
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_doc(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> RegionState:
        if doc.get("format") != state_format:
            raise ControlError(f"unknown region state format {doc.get('format')!r}")
        s = cls()
        s.version = int(doc["version"])
        for cid, c in doc["cells"].items():
            s.cells[cid] = Cell(cid, c["host"], int(c["port"]), bool(c["accepting"]),
                                dict(c["agents"]))
        s.assignments = dict(doc["assignments"])
        s.overrides = {t: Override(v[0], v[1]) for t, v in doc["overrides"].items()}
        s.migrations = {t: Migration(t, m["source"], m["target"], m["state"], m["flip_version"])
                        for t, m in doc["migrations"].items()}
        return s

    @classmethod
    def from_json(cls, data: bytes) -> RegionState:
        return cls.from_doc(json.loads(data))
