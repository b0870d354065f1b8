"""The router's cell map: partition key (a tenant's account id) -> cell.

Lookup order: the override table (testing, quarantine, heavy tenants), the explicit assignment
table, then rendezvous hashing over the cells that accept new tenants, so a tenant the control
plane has not placed yet still lands on a stable cell. Pure data: the router holds it in memory
and keeps serving from it when the control plane is gone (static stability).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CellEndpoint:
    cell_id: str
    host: str
    port: int


@dataclass
class CellMap:
    version: int
    cells: dict[str, CellEndpoint]
    assignments: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)

    def cell_for(self, account_id: str) -> CellEndpoint:
        cell_id = self.overrides.get(account_id) or self.assignments.get(account_id)
        if cell_id is not None and cell_id in self.cells:
            return self.cells[cell_id]
        if not self.cells:
            raise LookupError("the cell map has no cells")
        return self.cells[max(self.cells, key=lambda c: _weight(c, account_id))]

    def to_wire(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "cells": {c.cell_id: [c.host, c.port] for c in self.cells.values()},
            "assignments": dict(self.assignments),
            "overrides": dict(self.overrides),
        }

    @classmethod
    def from_wire(cls, doc: dict[str, Any]) -> CellMap:
        cells = {cid: CellEndpoint(cid, hp[0], int(hp[1])) for cid, hp in doc["cells"].items()}
        return cls(int(doc["version"]), cells, dict(doc.get("assignments", {})),
                   dict(doc.get("overrides", {})))


def _weight(cell_id: str, key: str) -> bytes:
    return hashlib.blake2b(f"{cell_id}\x00{key}".encode(), digest_size=8).digest()
