"""The client's way in: the startup packet (SSL/GSSENC refused, cancel requests
passed on, protocol version negotiated), startup parameters, database lookup,
limits, and authentication. Functions over a ClientConnection (net/client.py)."""

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


def login(client) -> bool:
    params = _read_startup(client)
    if params is None:
        return False
    if client.pending_error:
        raise ClientError(*client.pending_error)
    user = params.pop("user", "")
    if not user:
        raise ClientError("08P01", "no username supplied")
    client.user = user
    client.dbname = params.pop("database", "") or user
    client.startup = params
    app = client.app
    if app.settings.log_connections:
        log.info("%s login attempt: db=%s user=%s tls=no", client.label(), client.dbname, user)
    # The console is a database of its own: a `*` entry must not hide it.
    console = client.dbname == "pgbouncer" and "pgbouncer" not in app.cfg.databases
    db = None if console else app.database_for(client.dbname)
    peer = False   # the console's own OS user over the unix socket: no password
    if console:
        client.admin = True
        peer = app.admin.authorize(client)
    elif db is None:
        raise ClientError("3D000", f"no such database: {client.dbname}")
    elif db.name in app.disabled:
        raise ClientError("08P01", f'database "{db.name}" is disabled')
    _check_client_limits(client, db)
    if peer:
        secret = result = None
    else:
        secret = app.secrets.lookup_secret(user, db)
        _check_trust_rules(client, db, secret)
        result = _authenticate(client, secret)
    client.auth_result = result
    if client.admin:
        welcome = app.admin.welcome_params()
    else:
        client.pool = app.get_pool(db, user, result, secret=secret)
        _learn_server_defaults(client)
        add_host = f"{client.addr[0]}:{client.addr[1]}" if app.settings.application_name_add_host else None
        client.tparams, client.session_sets = tracked_params.client_params(
            client.pool, params, app.tracked, add_host)
        client.baseline = dict(client.tparams)
        welcome = dict(client.pool.welcome or {})
        welcome.update(client.tparams)
    client.cancel_key = app.register_client(client)
    out = [m.AUTH_OK]
    out.extend(m.parameter_status(k, v) for k, v in welcome.items())
    out.append(m.backend_key_data(*client.cancel_key))
    out.append(m.READY_IDLE)
    client.sock.sendall(b"".join(out))
    client.state = CL_ACTIVE
    return True


def _check_trust_rules(client, db, secret) -> None:
    """PgBouncer's rules: trust still needs the user in auth_file (or found by
    auth_query); any ignores the user name, so every database must force one."""
    method = client.app.secrets.auth_method(client)
    if method == "trust" and secret is None:
        raise ClientError("28000", '"trust" authentication failed')
    if method == "any" and db is not None and not db.user:
        raise ClientError("08P01", "bouncer config error")


def _check_client_limits(client, db) -> None:
    app = client.app
    if db is not None:
        limit = db.max_db_client_connections or app.settings.max_db_client_connections
        if limit and app.client_count_for_db(db.name) >= limit:
            raise ClientError("53300", "no more connections allowed (max_db_client_connections)")
    user_entry = app.cfg.users.get(client.user)
    limit = (user_entry and user_entry.max_user_client_connections) or app.settings.max_user_client_connections
    if limit and app.client_count_for_user(client.user) >= limit:
        raise ClientError("53300", "no more connections allowed (max_user_client_connections)")


def _read_startup(client):
    buf = bytearray()
    while True:
        found = startup_packet_at(buf)
        if found is None:
            data = client.sock.recv(RECV_SIZE)
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
            client.sock.sendall(m.SSL_NO)
        elif code == CANCEL_REQUEST_CODE:
            if len(body) >= 8:
                pid, key = struct.unpack_from("!II", body)
                client.app.forward_cancel(pid, key)
            return None
        elif code >> 16 == 3:
            client.pending = bytes(buf)
            params = parse_startup_params(body)
            tracked_params.validate_startup(params, client.app.settings)
            if code & 0xFFFF:
                _negotiate(client, code & 0xFFFF, params)
            return params
        else:
            raise ClientError("08P01", f"unsupported protocol version: {code >> 16}.{code & 0xFFFF}")


def _negotiate(client, minor: int, params) -> None:
    unknown = [k for k in params if k.startswith("_pq_.")]
    for k in unknown:
        del params[k]
    body = struct.pack("!II", 196608, len(unknown)) + b"".join(m.cstr(k) for k in unknown)
    client.sock.sendall(m.message(b"v", body))


def read_message(client) -> tuple[int, bytes]:
    buf = bytearray(client.pending)
    client.pending = b""
    while True:
        found = message_at(buf, 0, 1 << 20)
        if found is not None:
            mtype, start, end = found
            client.pending = bytes(buf[end:])
            return mtype, bytes(buf[start:end])
        data = client.sock.recv(RECV_SIZE)
        if not data:
            raise ClientGone()
        buf += data


def _authenticate(client, secret):
    method = client.app.secrets.auth_method(client)
    gen = authenticate_client(method, client.user, secret)
    try:
        out = next(gen)
        while True:
            client.sock.sendall(out)
            if m.is_sasl_final(out):
                out = gen.send(None)
                continue
            mtype, body = read_message(client)
            if mtype != ord("p"):
                raise ClientError("08P01", "expected password response")
            out = gen.send(body)
    except StopIteration as done:
        return done.value
    except AuthFailed as exc:
        if client.app.settings.log_pooler_errors:
            log.warning("%s %s", client.label(), exc.message)
        raise ClientError(exc.sqlstate, exc.message) from None


def _learn_server_defaults(client) -> None:
    """The pool's ParameterStatus defaults, from a first server login (PgBouncer
    does the same); every client's tracked values start from them."""
    pool = client.pool
    if pool.welcome is None:
        server = acquire_server(client.app, pool, client)
        client.app.releaser.release_idle(server)

# --- forwarding ------------------------------------------------------------
