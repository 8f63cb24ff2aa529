"""Tracked session parameters: which startup parameters a client may send, the
values each client expects, and the SET that brings a server in line; and
what a client's own SET / RESET / DISCARD ALL changes in what is remembered,
with which query texts must be read to know it (net/forward.py asks).

PgBouncer tracks client_encoding, DateStyle, TimeZone, standard_conforming_strings
and application_name, plus track_extra_parameters (IntervalStyle by default).
"""

from __future__ import annotations

from ..pool import session_multi, session_state
from ..proto.framing import ProtocolError

ALWAYS_TRACKED = ("client_encoding", "DateStyle", "TimeZone",
                  "standard_conforming_strings", "application_name")


def tracked_names(settings) -> dict[str, str]:
    """lower-case name -> canonical name (as ParameterStatus spells it)."""
    names = {n.lower(): n for n in ALWAYS_TRACKED}
    for extra in settings.track_extra_parameters:
        canonical = "IntervalStyle" if extra.lower() == "intervalstyle" else extra
        names[extra.lower()] = canonical
    return names


def validate_startup(params: dict[str, str], settings) -> None:
    """Refuse startup parameters PgBouncer would refuse; fold ``options -c``."""
    ignored = {p.lower() for p in settings.ignore_startup_parameters}
    tracked = tracked_names(settings)
    for key in list(params):
        low = key.lower()
        if key in ("user", "database") or low in tracked or key.startswith("_pq_."):
            continue
        if low in ignored:
            del params[key]
            continue
        if low == "options":
            _fold_options(params, tracked, ignored)
            continue
        if low == "replication":
            raise ProtocolError("replication connections are not supported")
        raise ProtocolError(f"unsupported startup parameter: {key}")


def _fold_options(params: dict[str, str], tracked: dict[str, str], ignored: set[str]) -> None:
    """PgBouncer accepts ``options=-c name=value`` for tracked parameters only."""
    words = params.pop("options").split()
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            setting = words[i + 1]
            i += 2
        elif word.startswith(("-c", "--")):
            setting = word[2:]
            i += 1
        else:
            raise ProtocolError(f"unsupported options startup parameter: {word}")
        name, sep, value = setting.partition("=")
        if sep and name.lower().replace("-", "_") in ignored:
            continue
        if not sep or name.lower().replace("-", "_") not in tracked:
            raise ProtocolError(f"unsupported options startup parameter: parameter {name} is not tracked")
        params[name.replace("-", "_")] = value


def client_params(pool, startup: dict[str, str], tracked: dict[str, str],
                  add_host: str | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """The tracked values this client expects: the pool's defaults overridden by
    what the client asked for at startup. ``add_host`` ("host:port") is appended
    to application_name when application_name_add_host is on.

    Returns (reported, sets): parameters the server reports with ParameterStatus
    are compared by value; tracked ones it does not report (search_path before
    PostgreSQL 18) go to the remembered-SET map, replayed like a client's SET."""
    welcome = pool.welcome or {}
    wanted = {name: welcome[name] for name in pool.tracked if name in welcome}
    sets: dict[str, str] = {}
    for key, value in startup.items():
        canonical = tracked.get(key.lower())
        if canonical is None:
            continue
        if canonical in welcome:
            wanted[canonical] = value
        else:
            sets[canonical.lower()] = session_state.raw_value(value)
    if add_host:
        name = wanted.get("application_name", "")
        wanted["application_name"] = f"{name} - {add_host}" if name else add_host
    return wanted, sets


def quote_literal(value: str) -> str:
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def sync(server, wanted: dict[str, str], sets: dict[str, str] | None = None) -> None:
    """Bring the server's tracked parameters to ``wanted``, and its remembered
    SETs to ``sets``, with one round trip."""
    changes = {k: v for k, v in wanted.items() if server.tparams.get(k) != v}
    parts = [f"SET {name}={quote_literal(value)}" for name, value in changes.items()]
    if sets is not None and sets != server.session_sets:
        parts.append(session_state.sync_sql(sets, server.session_sets))
    if not parts:
        return
    server.query(";".join(p for p in parts if p))
    if sets is not None:
        server.session_sets = dict(sets)
    for name, value in changes.items():
        reported = server.params.get(name)
        final = reported if reported is not None and reported.lower() == value.lower() else value
        server.tparams[name] = final
        wanted[name] = final


# --- SETs a client runs through the pooler (net/forward.py) -------------------

# Query texts worth parsing for session effects: SET, RESET, DEALLOCATE, DISCARD
# (and anything starting with whitespace or a comment, to be safe).
_INSPECT_HEADS = (b"set", b"res", b"dea", b"dis")
INSPECT_FIRST = frozenset(b" \t\n\r(-/")
# Every case spelling of the heads, so the hot path needs no .lower().
INSPECT_SPELLINGS = frozenset(
    bytes(c - 32 if bit & (1 << i) else c for i, c in enumerate(head))   # a-z -> A-Z
    for head in _INSPECT_HEADS for bit in range(8))


#: A SET (or a comment) after a semicolon ("SELECT 1; SET ..."): the head alone does not tell.
MAY_SET_LATER = session_multi.MAY_SET_LATER


def needs_inspection(head: bytes) -> bool:
    """Whether a query text starting with ``head`` (its first three bytes)
    may be a SET / RESET / DEALLOCATE / DISCARD, so must be read."""
    return bool(head[:1]) and (head[0] in INSPECT_FIRST or head[:3] in INSPECT_SPELLINGS)


_UTF8 = ("UTF8", "utf8", "UTF-8", "utf-8", "UNICODE", "unicode")


def query_change(text: bytes, client=None):
    """What a Query's (or Parse's) text does to the remembered state: one SET /
    RESET / DISCARD ALL (pool/session_state.py), or when the text may hold
    several statements or comments, their Script (pool/session_multi.py).
    Nothing from a text not in ASCII when ``client`` does not send UTF-8: its
    bytes would be read, and replayed, as the wrong characters."""
    if client is not None and not text.isascii() \
            and client.tparams.get("client_encoding", "UTF8") not in _UTF8:
        return None
    decoded = text.decode("utf-8", "replace")
    change = session_state.parse(decoded)
    if change is None and session_multi.candidate(text):
        return session_multi.parse(decoded)
    return change


def session_effect(client, server, change, outside: bool):
    """A SET / RESET / DISCARD ALL outside a transaction: once it succeeded,
    remember it (SETs the server does not report) or restore the values
    this client logged in with (what a direct connection resets to)."""
    if change is None or not outside:
        return None
    if type(change) is session_multi.Script:
        return _script_effect(client, server, change)
    canonical = client.app.tracked.get(change[1]) if len(change) > 1 else None
    reported = canonical is not None and canonical in server.params
    if reported and change[0] == "set":
        return None   # ParameterStatus keeps this one

    def remember(status: bytes) -> None:
        if status != b"I":
            return
        if change[0] == "reset_all":
            client.session_sets.clear()
            server.session_sets.clear()
            client.tparams.update(client.baseline)
        elif reported:
            client.tparams[canonical] = client.baseline.get(canonical, server.params.get(canonical, ""))
        else:
            session_state.apply(client.session_sets, change)
            session_state.apply(server.session_sets, change)
    return remember


def _script_effect(client, server, script):
    """Several statements' changes, applied in order once the text ended in the
    status it must end in without error. A reported parameter the text SET
    after a RESET ALL keeps the value its ParameterStatus gave."""
    if script.status is None:               # session_multi.UNKNOWN: whatever the reply
        def taint(status: bytes) -> None:
            _taint(server)
        taint.on_error = lambda: _taint(server)
        return taint
    steps = [session_effect(client, server, change, True) for change in script.changes]
    reported = [client.app.tracked[c[1]] for c in script.changes
                if c[0] == "set" and client.app.tracked.get(c[1]) in server.params]
    expected = script.status

    def remember(status: bytes) -> None:
        if status != expected:
            return
        for step in steps:
            if step is not None:
                step(b"I")
        for canonical in reported:
            if canonical in server.tparams:
                client.tparams[canonical] = server.tparams[canonical]
    if script.uncertain:
        remember.on_error = lambda: _taint(server)     # called by the tracker (pool/prepared.py)
    return remember


def _taint(server) -> None:
    """What a text left in this server's session is not known: no other client
    may get it (it is closed when released); this client's next requests may
    use it until then, as on a direct connection."""
    server.dirty = True
    server.close_reason = "session settings unknown after a multi-statement text"


def both(first, second):
    """Two session effects for one ReadyForQuery, ``first`` first (either may be None)."""
    if first is None or second is None:
        return first or second
    combined = lambda status: (first(status), second(status))    # noqa: E731
    failed = [f.on_error for f in (first, second) if getattr(f, "on_error", None) is not None]
    if failed:
        combined.on_error = lambda: [f() for f in failed]
    return combined
