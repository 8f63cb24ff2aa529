"""auth_type = hba: PgBouncer's subset of pg_hba.conf, and pg_ident.conf maps
for the identity-based methods (cert, peer). Sans-IO: callers pass what they
know of the connection.

    local      DATABASE  USER  METHOD [map=NAME]
    host       DATABASE  USER  ADDRESS[/BITS] | ADDRESS MASK | all  METHOD [map=NAME]
    hostssl    (the same, TLS connections only)
    hostnossl  (the same, plaintext connections only)

DATABASE and USER are comma lists of names (double quotes keep a name that
is a keyword), ``all``, ``sameuser`` (database only) or ``@file`` (names read
from a file beside the hba file). METHOD is trust, reject, password, md5,
scram-sha-256, cert or peer. The first line that matches decides, as in
PostgreSQL; no matching line means the connection is refused.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from .client import AuthFailed, AuthResult

METHODS = ("trust", "reject", "password", "md5", "scram-sha-256", "cert", "peer")
TYPES = ("local", "host", "hostssl", "hostnossl")
# PgBouncer's answer to every failed certificate login (the reason goes to the log only).
CERT_FAILED = "certificate authentication failed"
# What each hba method runs as an auth_type (auth/client.py, net/login.py).
AS_AUTH_TYPE = {"password": "plain"}


class HbaError(Exception):
    """A line the loader cannot use; ``str()`` names the file and line."""

    def __init__(self, path: str, line: int | None, msg: str):
        super().__init__(f"{path}:{line}: {msg}" if line else f"{path}: {msg}")
        self.path, self.line, self.msg = path, line, msg


@dataclass(frozen=True)
class HbaRule:
    line: int
    kind: str
    databases: tuple[str, ...]
    users: tuple[str, ...]
    network: object | None      # ipaddress network; None: any address (or local)
    method: str
    map: str | None = None

    def matches(self, local: bool, tls: bool, address: str | None, database: str, user: str) -> bool:
        if self.kind == "local":
            if not local:
                return False
        elif local or (self.kind == "hostssl" and not tls) or (self.kind == "hostnossl" and tls):
            return False
        if not _name_matches(self.databases, database, user):
            return False
        if not _name_matches(self.users, user, user):
            return False
        if self.network is not None and not local:
            try:
                ip = ipaddress.ip_address(address or "")
            except ValueError:
                return False
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None \
                    and self.network.version == 4:
                ip = ip.ipv4_mapped
            if ip.version != self.network.version or ip not in self.network:
                return False
        return True


def _name_matches(names: tuple[str, ...], value: str, user: str) -> bool:
    for name in names:
        if name == "\0all" or name == value or (name == "\0sameuser" and value == user):
            return True
    return False


class HbaRules:
    def __init__(self, rules: list[HbaRule], path: str):
        self.rules = rules
        self.path = path

    def decide(self, local: bool, tls: bool, address: str | None, database: str, user: str) -> HbaRule | None:
        for rule in self.rules:
            if rule.matches(local, tls, address, database, user):
                return rule
        return None


def load_hba(path: str) -> HbaRules:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise HbaError(path, None, f"could not open hba config file: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_hba(text, path)


def parse_hba(text: str, path: str = "pg_hba.conf") -> HbaRules:
    rules = []
    base = os.path.dirname(path)
    for number, raw in enumerate(text.splitlines(), start=1):
        tokens = _tokens(raw)
        if not tokens:
            continue
        try:
            rules.append(_rule(number, tokens, base))
        except ValueError as exc:
            raise HbaError(path, number, str(exc)) from None
    return HbaRules(rules, path)


_TOKEN = re.compile(r'"((?:[^"]|"")*)"|([^\s,"]+)|(,)')


def _tokens(line: str) -> list[list[str]]:
    """Fields of one line; each field a list of its comma-separated items.
    A quoted item keeps its text verbatim (a quoted "all" is a name)."""
    line = _strip_comment(line)
    fields: list[list[str]] = []
    joined = False
    for match in _TOKEN.finditer(line):
        if match.group(3):
            joined = True
            continue
        quoted = match.group(1)
        item = quoted.replace('""', '"') if quoted is not None else _keyword(match.group(2))
        if fields and joined:
            fields[-1].append(item)
        else:
            fields.append([item])
        joined = False
    return fields


def _strip_comment(line: str) -> str:
    quoted = False
    for i, ch in enumerate(line):
        if ch == '"':
            quoted = not quoted
        elif ch == "#" and not quoted:
            return line[:i]
    return line


def _keyword(word: str) -> str:
    return "\0" + word if word in ("all", "sameuser", "samerole", "replication") else word


def _rule(number: int, fields: list[list[str]], base: str) -> HbaRule:
    kind = _single(fields[0], "type")
    if kind not in TYPES:
        raise ValueError(f"unknown type {kind!r}")
    need = 4 if kind == "local" else 5
    if len(fields) < need:
        raise ValueError("missing fields")
    databases = _names(fields[1], base, database=True)
    users = _names(fields[2], base, database=False)
    rest = fields[3:]
    network = None
    if kind != "local":
        address = _single(rest.pop(0), "address").lstrip("\0")
        if address != "all":
            mask = None
            if "/" not in address and rest and _looks_like_ip(rest[0][0]):
                mask = _single(rest.pop(0), "mask")
            network = _network(address, mask)
    if not rest:
        raise ValueError("missing method")
    method = _single(rest.pop(0), "method").lstrip("\0")
    if method not in METHODS:
        raise ValueError(f"unsupported method {method!r}")
    options = {}
    for field in rest:
        option = _single(field, "option")
        name, eq, value = option.partition("=")
        if not eq or name != "map":
            raise ValueError(f"unsupported parameter {option!r}")
        options[name] = value
    if method == "cert" and kind != "hostssl":
        raise ValueError("cert authentication is only supported on hostssl connections")
    if method == "peer" and kind != "local":
        raise ValueError("peer authentication is only supported on local sockets")
    return HbaRule(number, kind, databases, users, network, method, options.get("map"))


def _single(field: list[str], what: str) -> str:
    if len(field) != 1:
        raise ValueError(f"a list is not allowed for the {what}")
    return field[0]


def _names(items: list[str], base: str, database: bool) -> tuple[str, ...]:
    out: list[str] = []
    for item in items:
        if item.startswith("@"):
            out.extend(_names_file(os.path.join(base, item[1:])))
        elif item.startswith("+"):
            raise ValueError("+group is not supported")
        elif item in ("\0samerole", "\0replication") or (item == "\0sameuser" and not database):
            raise ValueError(f"{item[1:]} is not supported")
        else:
            out.append(item)
    return tuple(out)


def _names_file(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    names: list[str] = []
    for line in text.splitlines():
        for field in _tokens(line):
            names.extend(field)
    return names


def _looks_like_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _network(address: str, mask: str | None):
    try:
        if mask is not None:
            ip = ipaddress.ip_address(address)
            bits = ipaddress.ip_network(f"0.0.0.0/{mask}" if ip.version == 4 else f"::/{mask}").prefixlen
            return ipaddress.ip_network(f"{address}/{bits}", strict=False)
        if "/" not in address:
            ip = ipaddress.ip_address(address)
            return ipaddress.ip_network(f"{address}/{ip.max_prefixlen}")
        return ipaddress.ip_network(address, strict=False)
    except ValueError:
        raise ValueError(f"invalid address {address!r}" + (f" / mask {mask!r}" if mask else "")) from None


# --- pg_ident.conf ---------------------------------------------------------------

class IdentMaps:
    """``MAP SYSTEM-USER DATABASE-USER`` lines; a SYSTEM-USER starting with ``/``
    is a regular expression whose first group may appear as ``\\1``."""

    def __init__(self, entries: list[tuple[str, str, str]]):
        self.entries = entries

    def allows(self, map_name: str, identity: str, user: str) -> bool:
        for name, system, wanted in self.entries:
            if name != map_name:
                continue
            if system.startswith("/"):
                match = re.search(system[1:], identity)
                if match is None:
                    continue
                if "\\1" in wanted and match.groups():
                    wanted = wanted.replace("\\1", match.group(1) or "")
            elif system != identity:
                continue
            if wanted == user or wanted == "all":
                return True
        return False


def load_ident(path: str) -> IdentMaps:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise HbaError(path, None, f"could not open ident file: {getattr(exc, 'strerror', None) or exc}") from None
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 2)
        if len(parts) != 3:
            raise HbaError(path, number, "expected MAP SYSTEM-USER DATABASE-USER")
        if parts[1].startswith("/"):
            try:
                re.compile(parts[1][1:])
            except re.error as exc:
                raise HbaError(path, number, f"invalid regular expression: {exc}") from None
        entries.append((parts[0], parts[1], parts[2].strip('"')))
    return IdentMaps(entries)


# --- identity logins -------------------------------------------------------------

def cert_login(user: str, identity: str | None, method: str, maps: tuple | None = None, tls: bool = True):
    """Accept ``user`` on a verified identity: the client certificate's CN
    (cert) or the peer's OS user (peer). ``maps`` is (IdentMaps, map name) when
    the hba line names a map; otherwise the identity must be the user name.

    A cert refusal tells the client only "certificate authentication failed"
    with SQLSTATE 08P01, as PgBouncer does (its login_via_cert ends in a plain
    disconnect_client, which has no code of its own); why (no TLS, no
    certificate, another name) is the ``log_detail``, PgBouncer's wording first."""
    if identity is None:
        if method == "cert":
            reason = "TLS client certificate required" if tls else "TLS connection required"
            raise AuthFailed(CERT_FAILED, "08P01", reason)
        raise AuthFailed(f'Peer authentication failed for user "{user}"', "28000",
                         "could not get the peer's user name")
    if maps is not None and maps[0] is not None and maps[1]:
        ok = maps[0].allows(maps[1], identity, user)
    else:
        ok = identity == user
    if not ok:
        if method == "cert":
            detail = f'TLS certificate name mismatch: certificate CN "{identity}" is not user "{user}"'
            raise AuthFailed(CERT_FAILED, "08P01", detail)
        raise AuthFailed(f'Peer authentication failed for user "{user}"', "28000",
                         f'peer is OS user "{identity}"')
    return AuthResult(method)
