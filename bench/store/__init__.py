"""Store benchmarks: ``python -m bench.store`` (see docs/store.md, "Benchmarks")."""
