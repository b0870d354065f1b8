"""Replicated block volumes: storage servers, the volume client, the failover protocol
(docs/volumes.md)."""
