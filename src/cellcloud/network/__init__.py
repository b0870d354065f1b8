"""Outbound network for execution environments (issue #12): policy core + privileged helper."""
