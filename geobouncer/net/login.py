"""The client's way in: the startup packet (SSL/GSSENC refused, cancel requests
passed on, protocol version negotiated), startup parameters, database lookup,
limits, and authentication. A mixin of ClientConnection (net/client.py)."""

from __future__ import annotations

import logging
import struct

from ..auth import AuthFailed, authenticate_client
from ..pool.states import CL_ACTIVE
from ..proto import messages as m
from ..proto.framing import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    SSL_REQUEST_CODE,
    ProtocolError,
    message_at,
    parse_startup_params,
    startup_packet_at,
)
from . import params as tracked_params
from .checkout import ClientError, acquire_server

log = logging.getLogger("geobouncer")

RECV_SIZE = 65536


class ClientGone(Exception):
    """The client closed its socket or sent Terminate."""


class ClientLogin:
    __slots__ = ()

    def _login(self) -> bool:
        params = self._read_startup()
        if params is None:
            return False
        if self.pending_error:
            raise ClientError(*self.pending_error)
        user = params.pop("user", "")
        if not user:
            raise ClientError("08P01", "no username supplied")
        self.user = user
        self.dbname = params.pop("database", "") or user
        self.startup = params
        app = self.app
        if app.settings.log_connections:
            log.info("%s login attempt: db=%s user=%s tls=no", self.label(), self.dbname, user)
        # The console is a database of its own: a `*` entry must not hide it.
        console = self.dbname == "pgbouncer" and "pgbouncer" not in app.cfg.databases
        db = None if console else app.database_for(self.dbname)
        if console:
            self.admin = True
            app.admin.authorize(self)
        elif db is None:
            raise ClientError("3D000", f"no such database: {self.dbname}")
        elif db.name in app.disabled:
            raise ClientError("08P01", f'database "{db.name}" does not allow connections')
        self._check_client_limits(db)
        secret = app.lookup_secret(user, db)
        self._check_trust_rules(db, secret)
        result = self._authenticate(secret)
        self.auth_result = result
        if self.admin:
            welcome = app.admin.welcome_params()
        else:
            self.pool = app.get_pool(db, user, result, secret=secret)
            self._learn_server_defaults()
            add_host = f"{self.addr[0]}:{self.addr[1]}" if app.settings.application_name_add_host else None
            self.tparams, self.session_sets = tracked_params.client_params(
                self.pool, params, app.tracked, add_host)
            self.baseline = dict(self.tparams)
            welcome = dict(self.pool.welcome or {})
            welcome.update(self.tparams)
        self.cancel_key = app.register_client(self)
        out = [m.AUTH_OK]
        out.extend(m.parameter_status(k, v) for k, v in welcome.items())
        out.append(m.backend_key_data(*self.cancel_key))
        out.append(m.READY_IDLE)
        self.sock.sendall(b"".join(out))
        self.state = CL_ACTIVE
        return True

    def _check_trust_rules(self, db, secret) -> None:
        """PgBouncer's rules: trust still needs the user in auth_file (or found by
        auth_query); any ignores the user name, so every database must force one."""
        method = self.app.auth_method(self)
        if method == "trust" and secret is None:
            raise ClientError("28000", '"trust" authentication failed')
        if method == "any" and db is not None and not db.user:
            raise ClientError("08P01", "bouncer config error")

    def _check_client_limits(self, db) -> None:
        app = self.app
        if db is not None:
            limit = db.max_db_client_connections or app.settings.max_db_client_connections
            if limit and app.client_count_for_db(db.name) >= limit:
                raise ClientError("53300", "no more connections allowed (max_db_client_connections)")
        user_entry = app.cfg.users.get(self.user)
        limit = (user_entry and user_entry.max_user_client_connections) or app.settings.max_user_client_connections
        if limit and app.client_count_for_user(self.user) >= limit:
            raise ClientError("53300", "no more connections allowed (max_user_client_connections)")

    def _read_startup(self):
        buf = bytearray()
        while True:
            found = startup_packet_at(buf)
            if found is None:
                data = self.sock.recv(RECV_SIZE)
                if not data:
                    raise ClientGone()
                buf += data
                continue
            code, end = found
            body = bytes(buf[8:end])
            del buf[:end]
            if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
                if buf:
                    raise ProtocolError("data after SSLRequest")
                self.sock.sendall(m.SSL_NO)
            elif code == CANCEL_REQUEST_CODE:
                if len(body) >= 8:
                    pid, key = struct.unpack_from("!II", body)
                    self.app.forward_cancel(pid, key)
                return None
            elif code >> 16 == 3:
                self.pending = bytes(buf)
                params = parse_startup_params(body)
                tracked_params.validate_startup(params, self.app.settings)
                if code & 0xFFFF:
                    self._negotiate(code & 0xFFFF, params)
                return params
            else:
                raise ClientError("08P01", f"unsupported protocol version: {code >> 16}.{code & 0xFFFF}")

    def _negotiate(self, minor: int, params) -> None:
        unknown = [k for k in params if k.startswith("_pq_.")]
        for k in unknown:
            del params[k]
        body = struct.pack("!II", 196608, len(unknown)) + b"".join(m.cstr(k) for k in unknown)
        self.sock.sendall(m.message(b"v", body))

    def _read_message(self) -> tuple[int, bytes]:
        buf = bytearray(self.pending)
        self.pending = b""
        while True:
            found = message_at(buf, 0, 1 << 20)
            if found is not None:
                mtype, start, end = found
                self.pending = bytes(buf[end:])
                return mtype, bytes(buf[start:end])
            data = self.sock.recv(RECV_SIZE)
            if not data:
                raise ClientGone()
            buf += data

    def _authenticate(self, secret):
        method = self.app.auth_method(self)
        gen = authenticate_client(method, self.user, secret)
        try:
            out = next(gen)
            while True:
                self.sock.sendall(out)
                if out[0] == ord("R") and struct.unpack_from("!I", out, 5)[0] == m.AUTH_SASL_FINAL:
                    out = gen.send(None)
                    continue
                mtype, body = self._read_message()
                if mtype != ord("p"):
                    raise ClientError("08P01", "expected password response")
                out = gen.send(body)
        except StopIteration as done:
            return done.value
        except AuthFailed as exc:
            if self.app.settings.log_pooler_errors:
                log.warning("%s %s", self.label(), exc.message)
            raise ClientError(exc.sqlstate, exc.message) from None

    def _learn_server_defaults(self) -> None:
        """The pool's ParameterStatus defaults, from a first server login (PgBouncer
        does the same); every client's tracked values start from them."""
        pool = self.pool
        if pool.welcome is None:
            server = acquire_server(self.app, pool, self)
            self.app.release_idle(server)

    # --- forwarding ------------------------------------------------------------
