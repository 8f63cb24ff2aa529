"""The settings table: every ``[pgbouncer]`` key, once.

Each row (a ``Setting``, config/setting.py) declares a key's name, value type,
default, whether RELOAD may change it, and its documentation.  The loader
validates with it, ``Settings`` fills defaults from it, ``diff_configs`` sorts
reload changes with it, and ``render_default_ini`` writes conf/geobouncer.ini
from it, so a key is added to this table (a geobouncer key, to
config/extension_settings.py) and nowhere else.

Keys, defaults and reloadability follow PgBouncer 1.25 (``bouncer_params[]`` in
its main.c); geobouncer's own keys (pgbouncer-rr hooks and
pgbouncer-fast-switchover failover, among others) are rows of their own module,
config/extension_settings.py, appended last.
"""

from __future__ import annotations

from .extension_settings import EXTENSION_SETTINGS
from .setting import (
    AUTH,
    CHECKS,
    CONSOLE,
    DANGEROUS,
    GENERIC,
    LOG,
    NETWORK,
    TLS,
    Setting,
)
from .setting import block as _block
from .setting import row as _s
from .values import (
    BOOL,
    ENUM,
    INT,
    LIST,
    OCTAL,
    OPT_STR,
    STR,
    TIME,
)

POOL_MODES = ("session", "transaction", "statement")
AUTH_TYPES = (
    "cert",
    "md5",
    "scram-sha-256",
    "plain",
    "trust",
    "any",
    "hba",
    "pam",
    "ldap",
)
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
DH_PARAMS = ("none", "auto", "legacy")
DEFAULT_AUTH_QUERY = (
    "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END "
    "FROM pg_authid WHERE rolname=$1 AND rolcanlogin"
)

_COUNT = {"min": 0}  # connection counts and limits: 0 means "no limit" or "off"

# fmt: off
SETTINGS: tuple[Setting, ...] = (
    *_block(
        GENERIC,
        _s("logfile", OPT_STR, None, "File that log lines are appended to, besides stderr "
           "(-q or -d silence stderr). It is reopened on RELOAD or SIGHUP, so rotate it, "
           "then reload.", example="geobouncer.log"),
        _s("pidfile", OPT_STR, None, "File the process id is written to. Daemonizing (-d) "
           "needs it.", reload=False, example="geobouncer.pid"),
        _s("listen_addr", OPT_STR, None, "Comma-separated addresses (IPv4, IPv6 or host "
           "names) that accept TCP connections; * means every address. Unset: only the "
           "Unix socket listens.", reload=False, example="127.0.0.1"),
        _s("listen_port", INT, 6432, "Port to listen on; it also names the Unix socket "
           "(.s.PGSQL.<port>).", reload=False, min=0, max=65535),
        _s("unix_socket_dir", STR, "/tmp", "Directory of the listening Unix socket, also "
           "used for server connections without host. Empty disables Unix sockets; a "
           "leading @ selects the abstract namespace (Linux).", reload=False),
        _s("unix_socket_mode", OCTAL, 0o777, "Octal file mode of the Unix socket.",
           reload=False),
        _s("unix_socket_group", OPT_STR, None, "Group owning the Unix socket.", reload=False),
        _s("user", OPT_STR, None, "Unix user to switch to after start-up; works when "
           "started as root or as that user.", reload=False),
        _s("pool_mode", ENUM, "session", "When a server connection returns to the pool: "
           "session (when the client leaves), transaction (when a transaction ends) or "
           "statement (after each statement; transactions of several statements are "
           "refused). Databases and users can override it.", choices=POOL_MODES),
        _s("max_client_conn", INT, 100, "Most client connections accepted at once. Every "
           "client and server connection uses a file descriptor: raise ulimit -n to "
           "match.", min=1),
        _s("default_pool_size", INT, 20, "Server connections per (database, user) pool, "
           "unless the database or the user sets pool_size.", **_COUNT),
        _s("min_pool_size", INT, 0, "Keep at least this many server connections open per "
           "pool (capped at the pool size) so load after a quiet period does not wait for "
           "logins. Only for pools with a forced user or a connected client. 0 disables.",
           **_COUNT),
        _s("reserve_pool_size", INT, 0, "Extra server connections a pool may open once a "
           "client has waited reserve_pool_timeout. 0 disables.", **_COUNT),
        _s("reserve_pool_timeout", TIME, 5.0, "Seconds a client waits before the reserve "
           "pool is used. 0 disables."),
        _s("max_db_connections", INT, 0, "Most server connections per database, all users "
           "together (the database as clients name it). 0 means no limit. Databases can "
           "override it.", **_COUNT),
        _s("max_db_client_connections", INT, 0, "Most client connections per database. "
           "0 means no limit. Databases can override it.", **_COUNT),
        _s("max_user_connections", INT, 0, "Most server connections per user, all "
           "databases together. 0 means no limit. Users can override it.", **_COUNT),
        _s("max_user_client_connections", INT, 0, "Most client connections per user. "
           "0 means no limit. Users can override it.", **_COUNT),
        _s("server_round_robin", BOOL, False, "Hand out idle server connections in turn "
           "instead of most-recently-used first; better when a load balancer or a host "
           "list sits behind a database."),
        _s("track_extra_parameters", LIST, ("IntervalStyle",), "Parameters to track per "
           "client and restore on whatever server connection it gets, on top of "
           "client_encoding, DateStyle, TimeZone, standard_conforming_strings and "
           "application_name. Only parameters the server reports can be tracked.",
           reload=False),
        _s("ignore_startup_parameters", LIST, (), "Startup parameters that clients may "
           "send and that are dropped (e.g. extra_float_digits, options). Other untracked "
           "startup parameters are refused."),
        _s("peer_id", INT, 0, "Id of this process among peers that pass cancel requests "
           "to each other (see [peers]). 0 disables peering.", min=0, max=16383),
        _s("disable_pqexec", BOOL, False, "Refuse the simple query protocol, which allows "
           "several statements in one message; only the extended protocol remains.",
           reload=False),
        _s("application_name_add_host", BOOL, False, "Append the client's address and "
           "port to application_name when it connects."),
        _s("conffile", OPT_STR, None, "Configuration file read by the next RELOAD; unset "
           "means the file given on the command line."),
        _s("service_name", OPT_STR, None, "Windows service name; alias of job_name.",
           reload=False),
        _s("job_name", STR, "pgbouncer", "Windows service name.", reload=False),
        _s("stats_period", INT, 60, "Seconds between refreshes of the averages shown by "
           "SHOW commands and between statistics log lines.", min=1),
        _s("max_prepared_statements", INT, 200, "In transaction and statement pooling, "
           "track protocol-level named prepared statements and prepare them on demand on "
           "whichever server connection the client gets. The value sizes the per-server "
           "LRU cache of statements; 0 turns tracking off.", **_COUNT),
        _s("scram_iterations", INT, 4096, "Iterations used when computing a SCRAM-SHA-256 "
           "secret.", min=1),
    ),
    *_block(
        AUTH,
        _s("auth_type", ENUM, "md5", "How clients authenticate: cert (TLS client "
           "certificate, user name from its CN), md5 (password; SCRAM is used when the "
           "stored secret is SCRAM), scram-sha-256, plain (clear text, deprecated), trust "
           "(no password, user must be known), any (no check, user name ignored; "
           "databases need a forced user), hba (method from auth_hba_file), pam, ldap.",
           choices=AUTH_TYPES),
        _s("auth_hba_file", OPT_STR, None, "pg_hba.conf-style file, used when auth_type "
           "is hba."),
        _s("auth_ident_file", OPT_STR, None, "pg_ident.conf-style user name maps, used "
           "with auth_type hba."),
        _s("auth_file", OPT_STR, None, "File of users and passwords, one '\"user\" "
           "\"password\"' per line; the password is plain text, md5... or a SCRAM secret. "
           "A relative path is taken from this file's directory.", example="userlist.txt"),
        _s("auth_user", OPT_STR, None, "User that runs auth_query for users missing from "
           "auth_file; its own password comes from auth_file."),
        _s("auth_query", STR, DEFAULT_AUTH_QUERY, "Query run as auth_user to fetch a "
           "user's (name, password hash) for $1; no row or a NULL name means no such "
           "user, a NULL password means no password can match."),
        _s("auth_dbname", OPT_STR, None, "[databases] entry in which auth_query runs, "
           "instead of the client's database. Databases can override it."),
        _s("auth_ldap_options", OPT_STR, None, "LDAP options for auth_type ldap, written "
           "as in pg_hba.conf."),
    ),
    *_block(
        LOG,
        _s("syslog", BOOL, False, "Also log to syslog."),
        _s("syslog_ident", STR, "pgbouncer", "Program name given to syslog."),
        _s("syslog_facility", STR, "daemon", "Syslog facility: auth, authpriv, daemon, "
           "user or local0-7."),
        _s("log_connections", BOOL, True, "Log successful logins."),
        _s("log_disconnections", BOOL, True, "Log disconnections, with their reason."),
        _s("log_pooler_errors", BOOL, True, "Log the errors the pooler sends to clients."),
        _s("log_stats", BOOL, True, "Log aggregated statistics every stats_period."),
        _s("verbose", INT, 0, "Log verbosity, as given by repeated -v (at most 3).", min=0),
    ),
    *_block(
        CONSOLE,
        _s("admin_users", LIST, (), "Users allowed every command of the admin console "
           "(database pgbouncer). With auth_type any, other users get in with the "
           "rights of stats_users."),
        _s("stats_users", LIST, (), "Users allowed the read-only SHOW commands of the "
           "admin console."),
    ),
    *_block(
        CHECKS,
        _s("server_reset_query", STR, "DISCARD ALL", "Sent on a server connection "
           "released by a session-pooled client, to wipe session state. Empty disables."),
        _s("server_reset_query_always", BOOL, False, "Send server_reset_query in every "
           "pool mode, not only session pooling."),
        _s("server_check_delay", TIME, 30.0, "A server connection idle longer than this "
           "is checked with server_check_query before reuse. 0 checks every time."),
        _s("server_check_query", STR, "<empty>", "Query that checks an idle server "
           "connection is alive. The literal <empty> sends an empty query; an empty "
           "value disables the check."),
        _s("server_fast_close", BOOL, False, "In session pooling, close a server "
           "connection marked for reconnect (RECONNECT, RELOAD, DNS change) at the end "
           "of its transaction instead of its session; its client is closed too."),
        _s("server_lifetime", TIME, 3600.0, "Close an unlinked server connection once it "
           "has been open this long; 0 uses each connection once. Databases can override "
           "it."),
        _s("server_idle_timeout", TIME, 600.0, "Close a server connection idle this long. "
           "0 disables."),
        _s("server_connect_timeout", TIME, 15.0, "Give up on a server connection whose "
           "connect and login take longer."),
        _s("server_login_retry", TIME, 15.0, "After a failed server connect or login, "
           "wait this long before trying again; meanwhile that pool's clients get an "
           "error at once."),
        _s("client_login_timeout", TIME, 60.0, "Disconnect a client that has not logged "
           "in within this time."),
        _s("autodb_idle_timeout", TIME, 3600.0, "Free databases made from the '*' entry "
           "once unused this long (their statistics go with them)."),
        _s("pool_idle_timeout", TIME, 0.0, "Free a pool with no client and no server "
           "connection once empty this long (its statistics go with it). 0 disables."),
        _s("dns_max_ttl", TIME, 15.0, "How long a DNS answer is cached, whatever its TTL."),
        _s("dns_nxdomain_ttl", TIME, 15.0, "How long a failed or NXDOMAIN lookup is "
           "cached."),
        _s("dns_zone_check_period", TIME, 0.0, "Period of checks for a changed DNS zone "
           "serial, which triggers fresh lookups. 0 disables."),
        _s("resolv_conf", OPT_STR, None, "resolv.conf to use instead of the system's.",
           reload=False),
        _s("query_wait_notify", TIME, 5.0, "Send a client queued this long a notice that "
           "it is waiting for a server connection. 0 disables."),
        _s("login_notify_message", OPT_STR, None, "Notice sent to every client after it "
           "logs in, e.g. to say it talks to a pooler."),
    ),
    *_block(
        TLS,
        _s("client_tls_sslmode", ENUM, "disable", "TLS towards clients: disable (TLS "
           "requests ignored), allow or prefer (TLS when the client asks), require (plain "
           "connections refused), verify-ca or verify-full (a valid client certificate "
           "is also required). Needs client_tls_key_file and client_tls_cert_file.",
           choices=SSL_MODES),
        _s("client_tls_key_file", OPT_STR, None, "Private key presented to clients."),
        _s("client_tls_cert_file", OPT_STR, None, "Certificate presented to clients."),
        _s("client_tls_ca_file", OPT_STR, None, "CA certificates that validate client "
           "certificates."),
        _s("client_tls_protocols", STR, "secure", "TLS versions allowed with clients: "
           "tlsv1.0, tlsv1.1, tlsv1.2, tlsv1.3, all, or secure (tlsv1.2,tlsv1.3)."),
        _s("client_tls_ciphers", STR, "default", "Ciphers for TLS 1.2 and older with "
           "clients, in OpenSSL syntax, or a PgBouncer name: default and normal keep "
           "OpenSSL's list, secure and fast mean forward-secret AEAD suites, compat and "
           "legacy allow older ones."),
        _s("client_tls13_ciphers", OPT_STR, None, "TLS 1.3 cipher suites with clients "
           "(e.g. TLS_AES_256_GCM_SHA384); unset follows client_tls_ciphers."),
        _s("client_tls_ecdhcurve", STR, "auto", "Curve for ECDH key exchange: none (no "
           "ECDHE suites for TLS 1.2), auto, a curve name, or a list (X25519:P-256)."),
        _s("client_tls_dheparams", ENUM, "auto", "DHE key exchange: none (no DHE suites), "
           "auto (parameters sized to the key, 2048-bit or more) or legacy (accepted; "
           "OpenSSL 3 gives the same as auto).", choices=DH_PARAMS),
        _s("server_tls_sslmode", ENUM, "prefer", "TLS towards servers: disable, allow, "
           "prefer (try TLS, fall back to plain), require (TLS, certificate unchecked), "
           "verify-ca (certificate checked against server_tls_ca_file), verify-full (and "
           "host name checked).", choices=SSL_MODES),
        _s("server_tls_ca_file", OPT_STR, None, "CA certificates that validate server "
           "certificates."),
        _s("server_tls_key_file", OPT_STR, None, "Private key presented to servers."),
        _s("server_tls_cert_file", OPT_STR, None, "Certificate presented to servers."),
        _s("server_tls_protocols", STR, "secure", "TLS versions allowed with servers "
           "(see client_tls_protocols)."),
        _s("server_tls_ciphers", STR, "default", "Ciphers for TLS 1.2 and older with "
           "servers (see client_tls_ciphers)."),
        _s("server_tls13_ciphers", OPT_STR, None, "TLS 1.3 cipher suites with servers; "
           "unset follows server_tls_ciphers."),
    ),
    *_block(
        DANGEROUS,
        _s("query_timeout", TIME, 0.0, "Cancel queries running longer. Keep it slightly "
           "above the server's statement_timeout, to catch network trouble only. "
           "0 disables."),
        _s("query_wait_timeout", TIME, 120.0, "Disconnect a client whose query waited "
           "this long for a server connection. 0 lets clients wait forever."),
        _s("cancel_wait_timeout", TIME, 10.0, "Drop a cancel request not forwarded to a "
           "server within this time. 0 lets it wait forever."),
        _s("client_idle_timeout", TIME, 0.0, "Close client connections idle longer. "
           "0 disables."),
        _s("idle_transaction_timeout", TIME, 0.0, "Disconnect a client idle in a "
           "transaction longer. 0 disables."),
        _s("transaction_timeout", TIME, 0.0, "Disconnect a client whose transaction lasts "
           "longer. 0 disables."),
        _s("suspend_timeout", TIME, 10.0, "How long SUSPEND waits for buffers to drain "
           "before closing the connections that still hold data."),
    ),
    *_block(
        NETWORK,
        _s("pkt_buf", INT, 4096, "Size of the internal packet buffer; messages may be "
           "larger.", reload=False, min=64),
        _s("max_packet_size", INT, 2147483647, "Largest protocol message let through: "
           "one query or one result row.", min=1, max=4294967295),
        _s("listen_backlog", INT, 128, "Backlog of listen(2): unanswered connection "
           "attempts kept queued.", reload=False, min=1),
        _s("sbuf_loopcnt", INT, 5, "How many pkt_buf-sized rounds one connection may "
           "forward before others get a turn. 0 means no limit.", min=0),
        _s("so_reuseport", BOOL, False, "Set SO_REUSEPORT on TCP listeners so several "
           "processes can share a port.", reload=False),
        _s("tcp_defer_accept", BOOL, True, "Set TCP_DEFER_ACCEPT on listeners (Linux); "
           "ignored where the system lacks it."),
        _s("tcp_socket_buffer", INT, 0, "Socket buffer size in bytes; 0 keeps the system "
           "default.", min=0),
        _s("tcp_keepalive", BOOL, True, "Turn on TCP keepalive with the system's timings "
           "unless the keys below set them."),
        _s("tcp_keepcnt", INT, 0, "TCP_KEEPCNT; 0 keeps the system default.", min=0),
        _s("tcp_keepidle", INT, 0, "TCP_KEEPIDLE in seconds; 0 keeps the system default.",
           min=0),
        _s("tcp_keepintvl", INT, 0, "TCP_KEEPINTVL in seconds; 0 keeps the system "
           "default.", min=0),
        _s("tcp_user_timeout", INT, 0, "TCP_USER_TIMEOUT in milliseconds (Linux); 0 keeps "
           "the system default.", min=0),
    ),
    *EXTENSION_SETTINGS,
)
# fmt: on

SETTINGS_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
