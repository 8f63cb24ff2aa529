"""The client's way in: the startup packet (SSLRequest answered with the TLS
handshake when client TLS is on, GSSENCRequest refused, cancel requests passed
on, protocol version negotiated), startup parameters, database lookup, limits,
and authentication. Functions over a ClientConnection (net/client.py)."""

from __future__ import annotations

import logging
import pwd
import socket as pysocket
import struct

from ..auth import AuthFailed, authenticate_client
from ..auth.hba import cert_login
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
from . import tls
from .checkout import ClientError, acquire_server
from .fastio import sender
from .tls_config import ALPN, rank

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
    _check_tls_required(client)
    if app.settings.log_connections:
        log.info("%s login attempt: db=%s user=%s tls=%s", client.label(), client.dbname, user,
                 tls.describe(client.sock) or "no")
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
        method = app.secrets.auth_method(client)
        secret = app.secrets.lookup_secret(user, db) if method not in ("cert", "peer", "reject") else None
        _check_trust_rules(client, db, secret, method)
        result = _authenticate(client, secret, method)
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
    if app.settings.login_notify_message:
        out.append(m.notice_response(app.settings.login_notify_message))
    out.append(m.READY_IDLE)
    client.sock.sendall(b"".join(out))
    client.state = CL_ACTIVE
    return True


def _check_tls_required(client) -> None:
    """client_tls_sslmode require and stricter: a TCP client that did not ask
    for TLS is refused (PgBouncer's text); Unix sockets are not encrypted."""
    if rank(client.app.tls.client.mode) >= rank("require") and not client.unix \
            and not tls.is_tls(client.sock):
        raise ClientError("08P01", "SSL required")


def _check_trust_rules(client, db, secret, method) -> None:
    """PgBouncer's rules: trust still needs the user in auth_file (or found by
    auth_query); any ignores the user name, so every database must force one."""
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
    _maybe_direct_tls(client)
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
        if code == SSL_REQUEST_CODE:
            if buf:
                raise ProtocolError("received unencrypted data after SSL request")
            _start_tls(client)
        elif code == GSSENC_REQUEST_CODE:
            if buf:
                raise ProtocolError("data after GSSENCRequest")
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


def _start_tls(client) -> None:
    """Answer an SSLRequest: ``N`` when client TLS is off (or on a Unix
    socket), else ``S`` and the handshake, inside client_login_timeout. A
    failed handshake ends this client quietly (a log line, no traceback)."""
    side = client.app.tls.client
    if tls.is_tls(client.sock):
        raise ProtocolError("SSL req inside SSL")
    if side.context is None or client.unix:
        client.sock.sendall(m.SSL_NO)
        return
    client.sock.sendall(tls.SSL_YES)
    _handshake(client, side)


def _handshake(client, side) -> None:
    """The TLS handshake on the client's socket; a failure costs only this client."""
    try:
        client.sock = tls.client_handshake(client.sock, side)
    except OSError as exc:
        log.warning("%s TLS handshake error: %s", client.label(), tls.reason(exc))
        raise ClientGone() from None
    client.send = sender(client.sock, client.wlock)


def _maybe_direct_tls(client) -> None:
    """PostgreSQL 17's direct TLS (sslnegotiation=direct): the first byte is a
    TLS handshake record instead of a startup packet; the client must name
    ALPN ``postgresql``, as PostgreSQL and PgBouncer 1.25 require."""
    side = client.app.tls.client
    if side.context is None or client.unix:
        return
    first = client.sock.recv(1, pysocket.MSG_PEEK)
    if first != tls.TLS_HANDSHAKE_RECORD:
        return
    _handshake(client, side)
    if client.sock.selected_alpn_protocol() != ALPN:
        log.warning("%s direct TLS connection without ALPN protocol postgresql", client.label())
        raise ClientGone()


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


def _authenticate(client, secret, method):
    if method in ("cert", "peer"):
        return _identity_login(client, method)
    binding = tls.server_end_point(client.sock) if tls.is_tls(client.sock) else None
    gen = authenticate_client(method, client.user, secret, binding, client.app.settings.scram_iterations)
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


def _identity_login(client, method):
    """auth_type cert (the client certificate's CN) or an hba ``peer`` line
    (the Unix user at the other end of the socket); ident maps may apply."""
    encrypted = tls.is_tls(client.sock)
    if method == "cert":
        identity = tls.peer_common_name(client.sock) if encrypted else None
    else:
        identity = peer_user(client.sock) if client.unix else None
    try:
        return cert_login(client.user, identity, method, client.app.secrets.ident_map(client), encrypted)
    except AuthFailed as exc:
        if method == "cert":
            log.error("%s %s", client.label(), exc.log_detail)    # PgBouncer logs the reason as an ERROR
        elif client.app.settings.log_pooler_errors:
            log.warning("%s %s", client.label(), exc.log_detail or exc.message)
        raise ClientError(exc.sqlstate, exc.message) from None


def peer_user(sock) -> str | None:
    """The OS user name of a Unix-socket peer (SO_PEERCRED), or None."""
    try:
        creds = sock.getsockopt(pysocket.SOL_SOCKET, pysocket.SO_PEERCRED, struct.calcsize("3i"))
        uid = struct.unpack("3i", creds)[1]
        return pwd.getpwuid(uid).pw_name
    except (OSError, KeyError, AttributeError, struct.error):
        return None


def _learn_server_defaults(client) -> None:
    """The pool's ParameterStatus defaults, from a first server login (PgBouncer
    does the same); every client's tracked values start from them."""
    pool = client.pool
    if pool.welcome is None and pool.db.shards:
        # A sharded database has no server of its own: its first shard's defaults.
        app = client.app
        first = app.get_pool(app.database_for(pool.db.shards[0]), client.user, client.auth_result)
        if first.welcome is None:
            app.releaser.release_idle(acquire_server(app, first, client))
        pool.welcome = first.welcome
    elif pool.welcome is None:
        server = acquire_server(client.app, pool, client)
        client.app.releaser.release_idle(server)

# --- forwarding ------------------------------------------------------------
