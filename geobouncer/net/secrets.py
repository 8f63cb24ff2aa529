"""Where a client's secret comes from: the auth_file, else auth_query run
through auth_user's pool (PgBouncer's order). Owned by the Bouncer (app.py)."""

from __future__ import annotations

from ..proto import messages as m
from .checkout import ClientError, acquire_server
from .server import ServerError

DEFAULT_AUTH_QUERY = ("SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END "
                      "FROM pg_authid WHERE rolname=$1 AND rolcanlogin")


class SecretLookup:
    __slots__ = ("app",)

    def __init__(self, app):
        self.app = app   # the Bouncer: settings, pools, clients, shutdown state

    def auth_method(self, client) -> str:
        method = self.app.settings.auth_type
        if client.unix and method == "peer":
            return "trust"
        return method

    def lookup_secret(self, user: str, db):
        secret = self.app.auth_file.get(user)
        if secret is not None or db is None:
            return secret
        auth_user = db.auth_user or self.app.settings.auth_user
        if auth_user:
            return self._auth_query(db, auth_user, user)
        return None

    def _auth_query(self, db, auth_user: str, user: str):
        dbname = db.auth_dbname or self.app.settings.auth_dbname or db.name
        entry = self.app.database_for(dbname) or db
        pool = self.app.get_pool(entry, auth_user, None, forced_user=auth_user)
        sql = db.auth_query or self.app.settings.auth_query or DEFAULT_AUTH_QUERY
        probe = _Probe()
        try:
            server = acquire_server(self.app, pool, probe)
        except ClientError as exc:
            raise ClientError("08P01", f"auth_query failed: {exc.text}") from None
        try:
            rows = server.run_internal(m.extended_query(sql, [user]), timeout=30).rows
        except ServerError as exc:
            server.close(f"auth_query failed: {exc.text}")
            raise ClientError("08P01", f"auth_query failed: {exc.text}") from None
        self.app.releaser.release_idle(server)
        if not rows:
            return None
        return rows[0][1] if len(rows[0]) > 1 else None


class _Probe:
    """Stands in for a client when the pooler itself needs a server (auth_query)."""

    state = "active"
    pool = None

    def set_waiting(self, waiting: bool) -> None:
        pass
