"""geobouncer: a PostgreSQL connection pooler and proxy on gevent, PgBouncer-compatible."""

__version__ = "0.1.0"
