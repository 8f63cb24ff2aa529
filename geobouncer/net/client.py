"""One greenlet per client: startup, authentication, then the forwarding loop.

The client greenlet reads the client's socket and writes to the linked server;
the server's reader greenlet writes the replies to the client's socket (see
net/server.py). While linked, only that reader writes to the client; while not
linked, only this greenlet does. Requests are counted on the way out (Query,
Sync, FunctionCall each owe one ReadyForQuery) so the reader knows when the
server has answered everything and may go back to the pool.
"""

from __future__ import annotations

import logging
import socket as pysocket
import struct
from time import monotonic

import gevent
from gevent.lock import Semaphore

from ..auth import AuthFailed, authenticate_client
from ..pool import session_state
from ..pool.prepared import FAKE, QUERY, SYNC
from ..routing.classify import BEGIN_READ_ONLY, READ
from ..pool.states import CL_ACTIVE, CL_LOGIN, CL_WAITING
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
from ..routing import RewriteFailed
from . import params as tracked_params
from .checkout import ClientError, acquire_server
from .fastio import receiver, sender
from .server import ServerError

log = logging.getLogger("geobouncer")

_unpack_len = struct.Struct("!I").unpack_from
RECV_SIZE = 65536
_Q, _S, _F, _X = (ord(c) for c in "QSFX")
_EXTENDED = frozenset(ord(c) for c in "PBDECH")
_COPY = frozenset(ord(c) for c in "dcf")
_KNOWN = frozenset(ord(c) for c in "QSFXPBDECHdcfp")
_RENAMED = frozenset(ord(c) for c in "PBDC")
# Query texts worth parsing for session effects: SET, RESET, DEALLOCATE, DISCARD
# (and anything starting with whitespace or a comment, to be safe).
_INSPECT_HEADS = (b"set", b"res", b"dea", b"dis")
_INSPECT_FIRST = frozenset(b" \t\n\r(-/")
_QUERY_ENTRY = (QUERY, False, None)


def _needs_inspection(head: bytes) -> bool:
    return head[:1] and (head[0] in _INSPECT_FIRST or head[:3].lower() in _INSPECT_HEADS)
_P, _B, _D, _E = (ord(c) for c in "PBDE")
_STREAM_ABOVE = 1 << 20      # messages above 1 MiB stream through unless they must be read
_HOLD_LIMIT = 0x3FFFFFFF     # PostgreSQL refuses messages over 1 GB: never hold more
_FAKE, _SYNC, _QUERY = FAKE, SYNC, QUERY
_READ, _BEGIN_READ_ONLY = READ, BEGIN_READ_ONLY
_LOST = m.error_response("08006", "server connection lost (switchover in progress): the transaction "
                         "was rolled back; retry it")


class ClientGone(Exception):
    """The client closed its socket or sent Terminate."""


class ClientConnection:
    def __init__(self, app, sock, addr, unix: bool):
        self.app = app
        self.sock = sock
        self.send = sender(sock)
        self.addr = addr if not unix else ("unix", 0)
        self.unix = unix
        self.id = app.next_id()
        self.state = CL_LOGIN
        self.user = ""
        self.dbname = ""
        self.pool = None
        self.server = None
        self.admin = False
        self.tparams: dict[str, str] = {}
        self.startup: dict[str, str] = {}
        self.cancel_key = (0, 0)
        self.connect_time = monotonic()
        self.request_time = self.connect_time
        self.bytes_out = 0
        self.pending = b""
        self.closing = False
        self.greenlet = None
        self.wait_started = 0.0
        self.pending_error: tuple[str, str] | None = None   # e.g. max_client_conn, sent after startup
        self.statements: dict[bytes, tuple[int, bytes]] = {}  # own name -> (statement id, Parse tail)
        self.session_sets: dict[str, str] = {}   # remembered SETs (pool/session_state.py)
        self.baseline: dict[str, str] = {}       # tracked values as of login (RESET ALL / DISCARD ALL)
        self.stmt_sets: dict[bytes, tuple] = {}  # named statement -> the SET/RESET it runs
        self.unnamed_change = None   # the same for the unnamed statement
        self.portal_change = None    # and for the portal last bound
        self.wlock = Semaphore()   # client writes by the reader vs. locally answered replies
        self.route_pool = None     # where routing_rules sent this client (None: its database)
        self.held: dict = {}       # session pooling with routing: pool -> server kept for later
        self.refused_routes: set[str] = set()
        self.stmt_routes: dict[bytes, str] = {}   # named statement -> where its Parse was routed
        self.stmt_class: dict[bytes, str] = {}    # named statement -> read/write class (split)
        self.rw_split = False      # automatic read/write split for this client's database
        self.lost_tx = False       # a switchover took our transaction: say so at the next request
        self.auth_result = None

    def __repr__(self) -> str:
        return f"C-{self.id:#x}"

    def label(self) -> str:
        host, port = self.addr[0], self.addr[1]
        return f"{self!r}: {self.dbname or '(nodb)'}/{self.user or '(nouser)'}@{host}:{port}"

    # --- life cycle ------------------------------------------------------------
    def run(self) -> None:
        self.greenlet = gevent.getcurrent()
        try:
            login_timeout = self.app.settings.client_login_timeout or None
            with gevent.Timeout(login_timeout, ClientError("08P01", "client_login_timeout")):
                if not self._login():
                    return
            if self.admin:
                self.app.admin.serve(self)
            else:
                self.rw_split = bool(self.pool.db.read_write_split) and self.pool.mode != "session"
                if self.pool.tracking or self.app.hooks.enabled or self.rw_split or self.pool.cluster:
                    self._serve_tracked()
                else:
                    self._serve()
        except ClientError as exc:
            self._fail(exc.sqlstate, exc.text)
        except ProtocolError as exc:
            self._fail("08P01", str(exc))
        except (ClientGone, OSError):
            pass
        except Exception:
            log.exception("%s internal error", self.label())
            self.send_error("XX000", "geobouncer internal error", fatal=True)
            if self.server is not None:
                self.server.dirty = True
        finally:
            self._cleanup()

    def _fail(self, sqlstate: str, text: str) -> None:
        if self.app.settings.log_pooler_errors:
            log.warning("%s pooler error: %s", self.label(), text)
        self.send_error(sqlstate, text, fatal=True)

    def send_error(self, sqlstate: str, text: str, fatal: bool = False) -> None:
        try:
            self.sock.sendall(m.error_response(sqlstate, text, "FATAL" if fatal else "ERROR"))
        except OSError:
            pass

    def _cleanup(self) -> None:
        for held in list(self.held.values()):
            self._drop_server(held)
        self.held.clear()
        server = self.server
        if server is not None:
            self.server = None
            self._drop_server(server)
        self.app.forget_client(self)
        if self.state != CL_LOGIN and self.app.settings.log_disconnections:
            age = monotonic() - self.connect_time
            log.info("%s closing because: client close request (age=%ds)", self.label(), age)
        try:
            self.sock.close()
        except OSError:
            pass

    def _drop_server(self, server) -> None:
        """The client is leaving: a clean server goes back (after the reset in
        session mode), anything else is closed."""
        server.client = None
        if (server.tx_status == b"I" and server.outstanding <= 0 and not server.unsynced
                and not server.in_copy and not server.dirty and not server.closed
                and not (server.tracker and server.tracker.pending)):
            gevent.spawn(self.app.release_after_client, server, server.pool)
        else:
            server.close("client disconnect while server was not ready")

    def shutdown(self, sqlstate: str | None = None, text: str | None = None) -> None:
        """Close this client from another greenlet (janitor, admin KILL, lost server)."""
        if self.closing:
            return
        self.closing = True
        if text:
            if self.app.settings.log_pooler_errors:
                log.warning("%s closing because: %s", self.label(), text)
            self.send_error(sqlstate or "08P01", text, fatal=True)
        try:
            self.sock.shutdown(pysocket.SHUT_RDWR)
        except OSError:
            pass

    # --- startup ---------------------------------------------------------------
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
        db = app.database_for(self.dbname)
        if db is None and self.dbname == "pgbouncer":
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
    def _serve(self) -> None:
        recv = receiver(self.sock, RECV_SIZE)
        skip = 0
        partial = b""
        data = self.pending
        self.pending = b""
        while True:
            if not data:
                data = recv()
                if not data:
                    raise ClientGone()
            self.request_time = monotonic()
            if partial:
                data = partial + data
                partial = b""
            n = len(data)
            if skip >= n:
                skip -= n
                self._send(data, 0, None)
                data = b""
                continue
            pos = skip
            skip = 0
            requests = 0
            synced = None
            terminate = False
            while pos < n:
                if n - pos < 5:
                    partial = data[pos:]
                    break
                mtype = data[pos]
                length = _unpack_len(data, pos + 1)[0]
                if length < 4 or length > self.app.max_packet_size:
                    raise ProtocolError(f"invalid message length {length}")
                end = pos + 1 + length
                if mtype == _Q or mtype == _F:
                    requests += 1
                elif mtype == _S:
                    requests += 1
                    synced = True
                elif mtype in _EXTENDED:
                    synced = False
                elif mtype == _X:
                    terminate = True
                    break
                elif mtype not in _KNOWN:
                    raise ProtocolError(f"unknown message type {chr(mtype)!r}")
                if end > n:
                    skip = end - n
                    pos = n
                    break
                pos = end
            if pos:
                self._send(data[:pos] if pos < n else data, requests, synced)
            if terminate:
                raise ClientGone()
            data = b""

    def _serve_tracked(self) -> None:
        """Transaction/statement pooling: whole messages, translated by the
        server's prepared-statement tracker (pool/prepared.py)."""
        recv = receiver(self.sock, RECV_SIZE)
        buf = bytearray(self.pending)
        self.pending = b""
        scratch: list = []
        plain = not (self.app.hooks.enabled or self.rw_split)
        while True:
            if not buf and plain and not self.lost_tx:
                data = recv()
                if not data:
                    raise ClientGone()
                # Fast path: exactly one complete simple Query that needs no reading.
                if (data[0] == _Q and len(data) == 1 + _unpack_len(data, 1)[0] and len(data) > 5
                        and not _needs_inspection(data[5:8])):
                    self._forward_query(data)
                    continue
                buf += data
            msgs = self._complete_messages(buf)
            if msgs is None:
                if len(buf) >= 5 and self._large_message(buf):
                    self._stream_large(buf, recv, scratch)
                    continue
                data = recv()
                if not data:
                    raise ClientGone()
                buf += data
                continue
            self.request_time = monotonic()
            terminate = msgs and msgs[-1][0] == _X
            if terminate:
                msgs.pop()
            if msgs:
                self._forward_tracked(buf, msgs, scratch)
            if terminate:
                raise ClientGone()

    def _forward_query(self, data: bytes) -> None:
        """One plain simple Query (the common case of transaction pooling)."""
        self.request_time = monotonic()
        server = self.server
        if server is None:
            try:
                server = self._link()
            except ClientError as exc:
                if exc.close:
                    raise
                self.send(m.error_response(exc.sqlstate, exc.text) + m.READY_IDLE)
                return
        if server.tracker is not None:
            server.tracker.pending.append(_QUERY_ENTRY)
        self._send(data, 1, None)

    def _large_message(self, buf: bytearray) -> bool:
        """Is the partial message at the start of ``buf`` one to stream through
        rather than hold? Messages the pooler must read whole (Parse, Bind,
        Describe, Close; queries a hook or the split must see) are held, up to
        PostgreSQL's own 1 GB message limit."""
        length = _unpack_len(buf, 1)[0]
        if length <= _STREAM_ABOVE:
            return False
        mtype = buf[0]
        if mtype in _RENAMED or (mtype == _Q and (self.app.hooks.enabled or self.rw_split)):
            if length > _HOLD_LIMIT:
                raise ProtocolError(f"message of {length} bytes is too large")
            return False
        return True

    def _stream_large(self, buf: bytearray, recv, scratch: list) -> None:
        """Forward one large message (a huge query, big CopyData) as it arrives."""
        mtype = buf[0]
        total = 1 + _unpack_len(buf, 1)[0]
        server = self.server or self._link()
        if server.tracker is not None:
            server.tracker.client_message(mtype, None, self.statements, scratch)
            scratch.clear()
        self.request_time = monotonic()
        first = bytes(buf[:total])
        del buf[:len(first)]
        remaining = total - len(first)
        self._send(first, 1 if mtype in (_Q, _F) else 0, None)
        while remaining > 0:
            data = recv()
            if not data:
                raise ClientGone()
            if len(data) > remaining:
                buf += data[remaining:]
                data = data[:remaining]
            remaining -= len(data)
            self._send(data, 0, None)

    def _complete_messages(self, buf: bytearray):
        """(type, start, end) of the complete messages at the start of ``buf``;
        None when there is none yet. Stops after a Terminate."""
        limit = self.app.max_packet_size
        msgs = []
        pos = 0
        n = len(buf)
        while n - pos >= 5:
            mtype = buf[pos]
            length = _unpack_len(buf, pos + 1)[0]
            if length < 4 or length > limit:
                raise ProtocolError(f"invalid message length {length}")
            end = pos + 1 + length
            if end > n:
                break
            if mtype not in _KNOWN:
                raise ProtocolError(f"unknown message type {chr(mtype)!r}")
            msgs.append((mtype, pos, end))
            pos = end
            if mtype == _X:
                break
        return msgs or None

    def _forward_tracked(self, buf: bytearray, msgs: list, scratch: list) -> None:
        if self.lost_tx:
            self._answer_lost(buf, msgs)
            return
        if self.app.hooks.enabled or self.rw_split:
            msgs = self._route_batch(buf, msgs)
        server = self.server
        if server is None:
            try:
                server = self._link()
            except ClientError as exc:
                if exc.close:
                    raise
                self._refuse_batch(buf, msgs, m.error_response(exc.sqlstate, exc.text))
                return
        tracker = server.tracker
        if tracker is None:   # pool mode changed under a RELOAD: plain forwarding
            last = msgs[-1][2]
            requests = sum(1 for t, _, _ in msgs if t in (_Q, _S, _F))
            self._send(bytes(buf[:last]), requests, None)
            del buf[:last]
            return
        stmts = self.statements
        client_message = tracker.client_message
        parses_before = tracker.parses
        client_parses = binds = 0
        out = None
        run = 0
        requests = 0
        synced = None
        sync_effect = None
        # SETs count only when run outside a transaction: as of this batch's start,
        # and before any other request of the batch.
        outside = server.tx_status == b"I" and not tracker.pending
        for mtype, start, end in msgs:
            effect = None
            if mtype == _Q:
                if _needs_inspection(bytes(buf[start + 5:start + 8])):
                    body = bytes(buf[start + 5:end])
                    if tracker.deallocate_locally(body, stmts):
                        out = [] if out is None else out
                        out.append(buf[run:start])
                        run = end
                        continue
                    effect = self._session_effect(server, self._session_change(body[:-1]), outside)
                    replaced = client_message(mtype, body, stmts, scratch, effect)
                else:
                    replaced = client_message(mtype, None, stmts, scratch)
                requests += 1
                outside = False
            elif mtype in _RENAMED:
                if mtype == _P or mtype == _B or mtype == _D:
                    synced = False
                    if mtype == _P:
                        client_parses += 1
                    elif mtype == _B:
                        binds += 1
                body = bytes(buf[start + 5:end])
                if mtype == _P:
                    name_end = body.find(b"\x00")
                    query_at = name_end + 1
                    change = None
                    if body[query_at:query_at + 1].lower() in (b"s", b"r", b"d"):
                        change = self._session_change(body[query_at:body.find(b"\x00", query_at)])
                    if name_end == 0:
                        self.unnamed_change = change
                    elif body[:name_end] not in stmts:
                        self.stmt_sets[body[:name_end]] = change
                elif mtype == _B:
                    # What the bound statement will do when executed (a SET, maybe).
                    portal_end = body.find(b"\x00")
                    name = body[portal_end + 1:body.find(b"\x00", portal_end + 1)]
                    self.portal_change = self.stmt_sets.get(name) if name else self.unnamed_change
                replaced = client_message(mtype, body, stmts, scratch)
            elif mtype == _S:
                requests += 1
                synced = True
                replaced = client_message(mtype, None, stmts, scratch, sync_effect)
                sync_effect = None
                outside = False
            elif mtype == _E and self.portal_change is not None:
                synced = False
                sync_effect = self._session_effect(server, self.portal_change, outside) or sync_effect
                replaced = client_message(mtype, None, stmts, scratch)
            else:
                if mtype == _F:
                    requests += 1
                elif mtype in _EXTENDED:
                    synced = False
                replaced = client_message(mtype, None, stmts, scratch)
            if replaced:
                out = [] if out is None else out
                out.append(buf[run:start])
                out.extend(scratch)
                scratch.clear()
                run = end
        if client_parses or binds:
            stats = server.pool.stats
            stats.client_parse_count += client_parses
            stats.bind_count += binds
            stats.server_parse_count += tracker.parses - parses_before
        last = msgs[-1][2]
        if out is None:
            chunk = bytes(buf[:last])
        else:
            out.append(buf[run:last])
            chunk = b"".join(out)
        del buf[:last]
        if tracker.pending and tracker.pending[0][0] == _FAKE:
            # Replies answered here with nothing outstanding before them go out
            # now, before the batch reaches the server and its replies can follow.
            with self.wlock:
                fakes = tracker.first_fakes()
                if fakes:
                    self.send(fakes)
        if chunk:
            self._send(chunk, requests, synced)
        else:
            if synced is not None:
                server.unsynced = not synced
            if server.client is self:
                server._maybe_release()

    # --- routing and rewrite hooks (routing/) -------------------------------------
    def _route_batch(self, buf: bytearray, msgs: list) -> list:
        """Run rewrite_query, the read/write split, then routing_rules on every
        Query and Parse of the batch. A route takes effect only at a transaction
        boundary: the first routable message of a batch that starts outside a
        transaction. The routing hook has the last word."""
        hooks = self.app.hooks
        split = self.rw_split
        server = self.server
        in_tx = server is not None and (server.tx_status != b"I" or server.outstanding > 0
                                        or bool(server.tracker and server.tracker.pending))
        target = None
        decided = in_tx
        rewritten: dict[int, bytes] = {}   # message index -> its new bytes
        for index, (mtype, start, end) in enumerate(msgs):
            if mtype == _B and not decided and (self.stmt_routes or split):
                # A Bind of a statement prepared earlier goes where its Parse was
                # routed, or (read/write split) where its class of statement goes.
                portal_end = buf.index(0, start + 5)
                name = bytes(buf[portal_end + 1:buf.index(0, portal_end + 1)])
                if split and name in self.stmt_class:
                    target = self._split_target(self.stmt_class[name])
                else:
                    target = self.stmt_routes.get(name)
                decided = in_tx = True
            if mtype != _Q and mtype != _P:
                continue
            body = bytes(buf[start + 5:end])
            if mtype == _Q:
                q_start, q_end = 0, len(body) - 1
            else:
                q_start = body.index(b"\x00") + 1
                q_end = body.index(b"\x00", q_start)
            text = body[q_start:q_end].decode("utf-8", "surrogateescape")
            if hooks.has_rewrite:
                try:
                    new_text = hooks.rewrite(self.user, text, in_tx)
                except RewriteFailed as exc:
                    raise ClientError("XX000", f"query rewrite failed: {exc}") from None
                if new_text is not None and new_text != text:
                    text = new_text
                    body = body[:q_start] + text.encode("utf-8", "surrogateescape") + body[q_end:]
                    rewritten[index] = m.message(bytes((mtype,)), body)
            if split:
                kind = self.app.classifier.classify(text)
                if mtype == _P and q_start > 1:
                    self.stmt_class[body[:q_start - 1]] = kind
                if not decided:
                    target = self._split_target(kind)
            if hooks.has_routing:
                key = hooks.route(self.user, text, in_tx, self.app.is_database_key)
                if key is not None and not decided:
                    target = key   # the user's hook has the last word
                elif key is not None and key != (target or self._route_key()):
                    self._log_refused_route(key)
                if mtype == _P and q_start > 1:   # a named statement: remember its route
                    self.stmt_routes[body[:q_start - 1]] = target or self._route_key()
            decided = in_tx = True
        if target is not None:
            self._route_to(target)
        if not rewritten:
            return msgs
        # Rebuild the batch with the rewritten messages, and their new offsets.
        parts = [rewritten.get(i) or bytes(buf[start:end]) for i, (_, start, end) in enumerate(msgs)]
        buf[:msgs[-1][2]] = b"".join(parts)
        rebuilt, pos = [], 0
        for (mtype, _, _), raw in zip(msgs, parts):
            rebuilt.append((mtype, pos, pos + len(raw)))
            pos += len(raw)
        return rebuilt

    def _split_target(self, kind: str) -> str:
        """Reads (and BEGIN READ ONLY) to a healthy replica, the rest to the primary."""
        primary = self.pool.db.name
        if kind == _READ or kind == _BEGIN_READ_ONLY:
            return self.app.pick_replica(primary) or primary
        return primary

    def _route_key(self) -> str:
        pool = self.server.pool if self.server is not None else (self.route_pool or self.pool)
        return pool.db.name

    def _route_to(self, key: str) -> None:
        """Send this client's next work to the [databases] entry ``key``."""
        if key == self._route_key():
            return
        entry = self.app.database_for(key)
        pool = self.app.get_pool(entry, self.user, self.auth_result)
        self.route_pool = pool
        server = self.server
        if server is not None:
            # Session pooling: keep one server per pool the client was routed to.
            self.held[server.pool] = server
            self.server = self.held.pop(pool, None)

    def _log_refused_route(self, key: str) -> None:
        if key not in self.refused_routes:
            self.refused_routes.add(key)
            log.warning("%s routing_rules chose %s in the middle of a transaction on %s: ignored",
                        self.label(), key, self._route_key())

    @staticmethod
    def _session_change(text: bytes):
        return session_state.parse(text.decode("utf-8", "replace"))

    def _session_effect(self, server, change, outside: bool):
        """A SET / RESET / DISCARD ALL outside a transaction: once it succeeded,
        remember it (SETs the server does not report) or restore the values
        this client logged in with (what a direct connection resets to)."""
        if change is None or not outside:
            return None
        canonical = self.app.tracked.get(change[1]) if len(change) > 1 else None
        reported = canonical is not None and canonical in server.params
        if reported and change[0] == "set":
            return None   # ParameterStatus keeps this one

        def remember(status: bytes) -> None:
            if status != b"I":
                return
            if change[0] == "reset_all":
                self.session_sets.clear()
                server.session_sets.clear()
                self.tparams.update(self.baseline)
            elif reported:
                self.tparams[canonical] = self.baseline.get(canonical, server.params.get(canonical, ""))
            else:
                session_state.apply(self.session_sets, change)
                session_state.apply(server.session_sets, change)
        return remember

    def _send(self, data, requests: int, synced) -> None:
        server = self.server
        if server is None:
            server = self._link()
        if requests:
            if server.outstanding <= 0:
                server.outstanding = requests
                server.request_started = self.request_time
                if server.tx_status == b"I":
                    server.xact_started = self.request_time
            else:
                server.outstanding += requests
        if synced is not None:
            server.unsynced = not synced
        server.pool.stats.bytes_received += len(data)
        try:
            server.send(data)
        except OSError:
            server.dirty = True
            raise ClientError("08006", "server conn crashed?") from None

    def _link(self):
        pool = self.route_pool or self.pool
        try:
            server = acquire_server(self.app, pool, self)
        except ClientError:
            if not (self.rw_split and pool is not self.pool):
                raise
            # The replica failed (now banned): this read goes to the primary.
            self.route_pool = None
            server = acquire_server(self.app, self.pool, self)
        if server.tparams != self.tparams or server.session_sets != self.session_sets:
            try:
                tracked_params.sync(server, self.tparams, self.session_sets)
            except ServerError as exc:
                server.close(f"parameter sync failed: {exc.text}")
                raise ClientError(exc.sqlstate, exc.text) from None
        server.client = self
        server.linked_at = self.request_time
        server.pool.stats.server_assignment_count += 1
        self.server = server
        return server

    # --- callbacks from the server's reader greenlet ------------------------------
    def on_ready(self, server, status: bytes) -> None:
        stats = server.pool.stats
        now = monotonic()
        stats.query_count += 1
        stats.query_time += int((now - server.request_started) * 1e6)
        server.request_started = now      # the next pipelined request starts here
        if status == b"I":
            stats.xact_count += 1
            stats.xact_time += int((now - server.xact_started) * 1e6)
            server.xact_started = now
        server.last_activity = now

    def on_server_idle(self, server) -> None:
        """The server answered everything; return it unless the mode keeps it."""
        mode = self.pool.mode
        if server.tx_status != b"I":
            if mode == "statement":
                self.server = None
                server.client = None
                server.close("transaction blocks not allowed in statement pooling mode")
                self.shutdown("08P01", "transaction blocks not allowed in statement pooling mode")
            return
        if mode == "session":
            return
        self.server = None
        server.client = None
        self.app.release_active(server, self.request_time)

    def on_server_lost(self, server, reason: str) -> None:
        if self.server is server:
            self.server = None
        else:
            self.held = {p: s for p, s in self.held.items() if s is not server}
        if server.pool.cluster is not None or server.pool.db.name in self.app.extra_entries:
            self._transaction_lost(server)
            return
        self.shutdown("08006", "server conn crashed?")

    def _transaction_lost(self, server) -> None:
        """A switchover (or a lost replica) took the client's server: its
        transaction is gone, but the client stays and may retry. Answer what it
        is waiting for now, or the next thing it sends."""
        owed = server.outstanding if server.outstanding > 0 else 0
        if server.tracker is not None:
            owed = sum(1 for entry in server.tracker.pending if entry[0] in (_SYNC, _QUERY))
        if owed:
            with self.wlock:
                try:
                    self.send(_LOST + m.READY_IDLE * owed)
                except OSError:
                    self.shutdown()
        elif server.tx_status != b"I" or server.unsynced:
            self.lost_tx = True

    def _answer_lost(self, buf: bytearray, msgs: list) -> None:
        """The first batch after a lost transaction gets the error, not a server."""
        if self._refuse_batch(buf, msgs, _LOST):
            self.lost_tx = False

    def _refuse_batch(self, buf: bytearray, msgs: list, error: bytes) -> bool:
        """Answer a batch here with ``error`` and a ReadyForQuery per request it
        holds, without a server; the client stays connected. True if it was
        answered (it held a Query or a Sync)."""
        owed = sum(1 for mtype, _, _ in msgs if mtype == _Q or mtype == _S)
        del buf[:msgs[-1][2]]
        if owed:
            self.send(error + m.READY_IDLE * owed)
        return bool(owed)

    def on_client_write_failed(self) -> None:
        self.shutdown()

    def set_waiting(self, waiting: bool) -> None:
        if waiting:
            self.state = CL_WAITING
            self.wait_started = monotonic()
        else:
            self.state = CL_ACTIVE
            if self.pool is not None:
                self.pool.stats.wait_time += int((monotonic() - self.wait_started) * 1e6)
