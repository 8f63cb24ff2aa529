"""SHOW FDS, SOCKETS, ACTIVE_SOCKETS, MEM, DNS_HOSTS, DNS_ZONES, PEERS and
PEER_POOLS, with PgBouncer 1.25's columns.

geobouncer has no slab allocator, no DNS cache (each connect resolves afresh)
and no online restart: SHOW MEM reports its per-connection objects the way
PgBouncer reports its slabs, SHOW DNS_* are empty, and SHOW FDS lists the real
descriptors without passing them (PgBouncer passes them only to a rebooting
process over the unix socket).
"""

from __future__ import annotations

import sys
from time import monotonic

from .show import CONN_COLS, _cols, client_row, server_row, server_state

_DEBUG_COLS = CONN_COLS + " recv_pos:i pkt_pos:i pkt_remain:i send_pos:i send_remain:i pkt_avail:i send_avail:i"


def _fd(sock) -> int:
    try:
        return sock.fileno()
    except (OSError, AttributeError):
        return -1


def show_fds(app):
    cols = _cols("fd:i task:t user:t database:t addr:t port:i cancel:i link:i client_encoding:t "
                 "std_strings:t datestyle:t timezone:t password:t scram_client_key:t scram_server_key:t")
    rows = []
    for server in list(app.listeners.servers):
        sock = server.socket
        name = sock.getsockname()
        addr, port = (name[0], name[1]) if isinstance(name, tuple) else ("unix", app.settings.listen_port)
        rows.append([_fd(sock), "pooler", None, None, addr, port, 0, 0] + [None] * 7)
    for c in list(app.clients):
        if c.admin or c.pool is None:
            continue
        pid, key = c.cancel_key
        p = c.tparams
        link = _fd(c.server.sock) if c.server is not None else 0
        rows.append([_fd(c.sock), "client", c.user, c.dbname, c.addr[0], c.addr[1] if not c.unix else 0,
                     (pid << 32) | key, link, p.get("client_encoding"),
                     p.get("standard_conforming_strings"), p.get("DateStyle"), p.get("TimeZone"),
                     None, None, None])
    for pool in list(app.pools.values()):
        for s in list(pool.active) + list(pool.idle):
            p = s.params
            link = _fd(s.client.sock) if s.client is not None else 0
            rows.append([_fd(s.sock), "server", pool.user, pool.db.name, s.host, s.port,
                         (s.pid << 32) | s.key, link, p.get("client_encoding"),
                         p.get("standard_conforming_strings"), p.get("DateStyle"), p.get("TimeZone"),
                         None, None, None])
    return cols, rows


def _debug(c_or_s) -> list:
    pending = len(getattr(c_or_s, "pending", b"") or b"")
    return [pending, 0, 0, 0, 0, pending, 0]


def _socket_rows(app, only_busy: bool) -> list:
    now = monotonic()
    rows = []
    for pool in list(app.pools.values()):
        for c in list(pool.clients):
            if not only_busy or _debug(c)[0]:
                state = "cl_waiting" if c.state == "waiting" else "cl_active"
                rows.append(client_row(app, c, state, now) + _debug(c))
        for s in list(pool.active) + list(pool.idle):
            busy = s.outstanding > 0
            if not only_busy or busy:
                state = "sv_" + server_state(app, s, now)
                rows.append(server_row(app, s, state) + [0, 0, 0, 0, 0, 0, 0])
    for c in list(app.clients):
        if c.admin and not only_busy:
            rows.append(client_row(app, c, "cl_active", now) + _debug(c))
        elif c.state == "login" and (not only_busy or _debug(c)[0]):
            rows.append(client_row(app, c, "cl_login", now) + _debug(c))
    return rows


def show_sockets(app):
    return _cols(_DEBUG_COLS), _socket_rows(app, only_busy=False)


def show_active_sockets(app):
    """Sockets with data buffered in the pooler (PgBouncer: a non-empty sbuf)."""
    return _cols(_DEBUG_COLS), _socket_rows(app, only_busy=True)


def show_mem(app):
    """PgBouncer's slab caches, as geobouncer's live objects of each kind."""
    clients = list(app.clients)
    servers = [s for p in list(app.pools.values()) for s in list(p.active) + list(p.idle)]
    caches = (("user_cache", list(app.cfg.users.values()) or list(app.auth_file.items())),
              ("db_cache", list(app.cfg.databases.values())),
              ("pool_cache", list(app.pools.values())),
              ("server_cache", servers), ("client_cache", clients))
    rows = []
    for name, objects in caches:
        size = _size(objects[0]) if objects else 0
        rows.append([name, size, len(objects), 0, size * len(objects)])
    return _cols("name:t size:i used:i free:i memtotal:i"), rows


def _size(obj) -> int:
    size = sys.getsizeof(obj)
    for slot in getattr(type(obj), "__slots__", ()):
        value = getattr(obj, slot, None)
        if isinstance(value, (dict, set, list, bytes, bytearray, str)):
            size += sys.getsizeof(value)
    return size


def show_dns_hosts(app):
    return _cols("hostname:t ttl:i addrs:t"), []


def show_dns_zones(app):
    return _cols("zonename:t serial:i count:i"), []


def show_peers(app):
    s = app.settings
    rows = [[peer_id, peer.host, peer.port, peer.pool_size if peer.pool_size is not None
             else s.default_pool_size] for peer_id, peer in sorted(app.cfg.peers.items())]
    return _cols("peer_id:i host:t port:i pool_size:i"), rows


def show_peer_pools(app):
    """Cancel requests passed to peers; geobouncer forwards each one at once."""
    rows = [[peer_id, 0, 0, 0, 0] for peer_id in sorted(app.cfg.peers)]
    return _cols("peer_id:i cl_active_cancel_req:i cl_waiting_cancel_req:i sv_active_cancel:i "
                 "sv_login:i"), rows


BUILDERS = {"fds": show_fds, "sockets": show_sockets, "active_sockets": show_active_sockets,
            "mem": show_mem, "dns_hosts": show_dns_hosts, "dns_zones": show_dns_zones,
            "peers": show_peers, "peer_pools": show_peer_pools}
