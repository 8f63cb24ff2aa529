"""Where a client's secret comes from: the auth_file, else auth_query run
through auth_user's pool (PgBouncer's order). Owned by the Bouncer (app.py)."""

from __future__ import annotations

import logging

from ..auth.hba import AS_AUTH_TYPE, HbaError, load_hba, load_ident
from ..config import ConfigError
from ..proto import messages as m
from . import tls
from .checkout import ClientError, acquire_server
from .server import ServerError

log = logging.getLogger("geobouncer")

DEFAULT_AUTH_QUERY = ("SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END "
                      "FROM pg_authid WHERE rolname=$1 AND rolcanlogin")


def load_auth_rules(cfg):
    """(HbaRules or None, IdentMaps or None) from auth_hba_file and
    auth_ident_file; a ConfigError naming the file and line otherwise."""
    s = cfg.pgbouncer
    hba = ident = None
    key = "auth_hba_file"
    try:
        if s.auth_type == "hba":
            path = cfg.resolve_path(s.auth_hba_file)
            if not path:
                raise ConfigError("auth_type=hba requires auth_hba_file", file=cfg.path, key="auth_type")
            hba = load_hba(path)
        key = "auth_ident_file"
        if s.auth_ident_file:
            ident = load_ident(cfg.resolve_path(s.auth_ident_file))
    except HbaError as exc:
        raise ConfigError(exc.msg, file=exc.path, line=exc.line, key=key) from None
    return hba, ident


class SecretLookup:
    __slots__ = ("app",)

    def __init__(self, app):
        self.app = app   # the Bouncer: settings, pools, clients, shutdown state

    def auth_method(self, client) -> str:
        """The method for this client: auth_type, or with auth_type = hba the
        first matching line of auth_hba_file. No line, or a reject line, is
        refused as PgBouncer does: "login rejected", SQLSTATE 08P01 (hba_eval
        finds no method, and finish_set_pool's plain disconnect_client has no
        code of its own). Which of the two, and for whom, goes to the log in
        PostgreSQL's words."""
        method = self.app.settings.auth_type
        if method == "hba":
            rule = self._hba_rule(client)
            encrypted = tls.is_tls(client.sock)
            where = (f'host "{client.addr[0]}", user "{client.user}", database "{client.dbname}", '
                     f'{"SSL encryption" if encrypted else "no encryption"}')
            if rule is None or rule.method == "reject":
                why = "no pg_hba.conf entry for" if rule is None else "pg_hba.conf rejects connection for"
                log.warning("%s %s %s", client.label(), why, where)
                raise ClientError("08P01", "login rejected")
            return AS_AUTH_TYPE.get(rule.method, rule.method)
        if client.unix and method == "peer":
            return "trust"
        return method

    def ident_map(self, client):
        """(IdentMaps, map name) for the client's hba line, or None."""
        if self.app.settings.auth_type != "hba":
            return None
        rule = self._hba_rule(client)
        if rule is None or not rule.map:
            return None
        return (self.app.ident_maps, rule.map)

    def _hba_rule(self, client):
        hba = self.app.hba
        if hba is None:
            return None
        return hba.decide(client.unix, tls.is_tls(client.sock), client.addr[0], client.dbname, client.user)

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
        sql = db.auth_query
        if getattr(entry, "shards", None):
            # A sharded database has no server of its own: its first shard answers
            # (as it gives the welcome parameters), with that shard's auth_query.
            entry = self.app.database_for(entry.shards[0]) or entry
            sql = sql or entry.auth_query
        pool = self.app.get_pool(entry, auth_user, None, forced_user=auth_user)
        sql = sql or self.app.settings.auth_query or DEFAULT_AUTH_QUERY
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
