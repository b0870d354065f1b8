from cellcloud.core.cellmap import CellEndpoint, CellMap


def make() -> CellMap:
    cells = {f"cell-{i}": CellEndpoint(f"cell-{i}", "127.0.0.1", 1000 + i) for i in range(4)}
    return CellMap(1, cells)


def test_default_placement_is_stable_and_spreads() -> None:
    m = make()
    accounts = [f"{i:012d}" for i in range(400)]
    first = [m.cell_for(a).cell_id for a in accounts]
    assert first == [m.cell_for(a).cell_id for a in accounts]
    counts = {c: first.count(c) for c in m.cells}
    assert all(60 <= n <= 140 for n in counts.values()), counts


def test_assignment_then_override_win() -> None:
    m = make()
    a = "123456789012"
    m.assignments[a] = "cell-2"
    assert m.cell_for(a).cell_id == "cell-2"
    m.overrides[a] = "cell-3"
    assert m.cell_for(a).cell_id == "cell-3"


def test_removing_a_cell_moves_only_its_tenants() -> None:
    m = make()
    accounts = [f"{i:012d}" for i in range(400)]
    before = {a: m.cell_for(a).cell_id for a in accounts}
    del m.cells["cell-1"]
    after = {a: m.cell_for(a).cell_id for a in accounts}
    moved = [a for a in accounts if before[a] != after[a]]
    assert all(before[a] == "cell-1" for a in moved)


def test_wire_round_trip() -> None:
    m = make()
    m.assignments["1"] = "cell-0"
    assert CellMap.from_wire(m.to_wire()) == m
