"""tierproxy: a read-through caching reverse proxy (L1 memory, L2 Redis, L3 SQLite, origin)."""

__version__ = "0.1.0"
