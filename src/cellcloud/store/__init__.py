"""cellcloud's configuration store: a Physalia-style colony of tiny Paxos cells.

See docs/store.md. The protocol core is ``cellcloud.core.paxos`` (sans-IO); this package holds
the shells: simulator, linearizability checker, SQLite durability, node processes, the async
client and the CLI.
"""
