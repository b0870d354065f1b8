"""The region's control plane (one per region): sans-IO cores plus thin shells.

- ``state``: the region's truth (cells, agents, tenant → cell table, overrides, migrations) and
  the ``CellMap`` it publishes;
- ``configstore``: where that truth is kept (SQLite, etcd; Physalia next);
- ``push``: the constant-work schedule that pushes the whole map to every router.

See ``docs/control.md``.
"""
