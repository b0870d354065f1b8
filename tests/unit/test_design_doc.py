"""docs/design.md states facts the code can check; this checks them: the agent's op set, the
frontend's op set, and the limits table (every limit of ``core/limits.py`` and the
transport's, each with its default)."""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import re
from typing import Any

import cellcloud
from cellcloud import transport
from cellcloud.core.limits import DEFAULT_LIMITS, Limits
from cellcloud.frontend import server as frontend_server
from cellcloud.frontend.cell import Cell
from cellcloud.frontend.store import SqliteFunctionStore
from cellcloud.queues.api import QueueApi
from cellcloud.queues.store import QueueStore
from cellcloud.registry.api import RegistryApi
from cellcloud.registry.storage import RegistryStore

ROOT = pathlib.Path(cellcloud.__file__).parent
DOC = (ROOT.parents[1] / "docs" / "design.md").read_text()
NUMBERS = {"four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
           "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17,
           "eighteen": 18, "nineteen": 19, "twenty": 20}
UNITS = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def _section(start: str, end: str) -> str:
    i = DOC.index(start)
    return DOC[i: DOC.index(end, i + len(start))]


def _agent_ops_in_code() -> set[str]:
    """The keys of the agent's ``self.ops = {...}`` table (read from its source: building an
    agent needs a host)."""
    tree = ast.parse((ROOT / "agent" / "server.py").read_text())
    for n in ast.walk(tree):
        if (isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict)
                and any(isinstance(t, ast.Attribute) and t.attr == "ops" for t in n.targets)):
            return {k.value for k in n.value.keys if isinstance(k, ast.Constant)}
    raise AssertionError("agent/server.py has no self.ops table")


def test_agent_ops() -> None:
    m = re.search(r"\*\*Agent \(transport ops, exactly (\w+)\)\.\*\*\n\n((?:\|.*\n)+)", DOC)
    assert m, "design.md has no agent op table"
    listed = re.findall(r"^\| `(\w+)` \|", m.group(2), re.M)
    assert set(listed) == _agent_ops_in_code()
    assert NUMBERS[m.group(1)] == len(listed) == len(set(listed))


def test_frontend_ops(tmp_path: Any) -> None:
    m = re.search(r"\*\*Frontend\.\*\* Its transport ops:(.*?);", DOC, re.S)
    assert m, "design.md does not list the frontend's ops"
    listed = re.findall(r"`(\w+)`", m.group(1))
    cell = Cell("cell-t", SqliteFunctionStore(str(tmp_path / "cell")), {})
    ops = frontend_server.ops(cell, QueueApi(QueueStore(str(tmp_path / "q")), "cc-local-1"),
                              RegistryApi(RegistryStore(str(tmp_path / "registry")),
                                          "cc-local-1", DEFAULT_LIMITS))
    assert sorted(listed) == sorted(ops)


def _limits_table() -> dict[str, int]:
    section = _section("## Limits (`core/limits.py`)", "\n## ")
    rows = re.findall(r"^\| `([\w.]+)` \| ([^|]+) \|", section, re.M)
    assert rows, "design.md has no limits table"
    table: dict[str, int] = {}
    for name, value in rows:
        m = re.fullmatch(r"([\d,]+)(?: (KiB|MiB|GiB))?", value.strip())
        assert m, f"{name}: cannot read {value!r} (a number, optionally KiB/MiB/GiB)"
        assert name not in table, f"{name} is listed twice"
        table[name] = int(m.group(1).replace(",", "")) * UNITS.get(m.group(2) or "", 1)
    return table


def _limits_in_code() -> dict[str, int]:
    code = {f.name: getattr(DEFAULT_LIMITS, f.name) for f in dataclasses.fields(Limits)}
    code["transport.frame_bytes_max"] = transport.frame_bytes_max
    code["transport.calls_in_flight_max"] = transport.calls_in_flight_max
    return code


def test_limits_table_lists_every_limit_with_its_default() -> None:
    table, code = _limits_table(), _limits_in_code()
    assert sorted(set(code) - set(table)) == [], "limits missing from design.md's table"
    assert sorted(set(table) - set(code)) == [], "design.md lists limits the code lacks"
    wrong = {k: (table[k], code[k]) for k in code if table[k] != code[k]}
    assert wrong == {}, "design.md value != code default (doc, code)"


def test_the_table_reader_reads_units() -> None:
    # Negative control: the reader turns units into bytes, and a wrong value would show.
    table = _limits_table()
    assert table["invoke_payload_bytes_max"] == 6 * 1024 * 1024
    assert table["transport.frame_bytes_max"] == 80 * 1024 * 1024
    assert table["envs_per_agent_max"] == 1000
