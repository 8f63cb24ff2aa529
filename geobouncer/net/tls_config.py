"""TLS contexts from PgBouncer's settings: the ``client_tls_*`` and
``server_tls_*`` keys turned into two ``ssl.SSLContext`` objects (net/tls.py
uses them for the handshakes).

``TlsConfig.from_config`` builds both once, at start and at each RELOAD; a bad
value is a ``ConfigError`` naming the file, line and key, and a failed RELOAD
keeps the old contexts (app.py). New handshakes use the current contexts; a
connection keeps the context it was made with.

How the settings map (README "TLS"):
    *_tls_protocols     minimum_version / maximum_version (+ OP_NO_* for gaps)
    *_tls_ciphers       set_ciphers(); default/normal keep OpenSSL's list
    *_tls13_ciphers     SSL_CTX_set_ciphersuites (net/tls_native.py)
    client_tls_ecdhcurve  set_ecdh_curve(), or SSL_CTX_set1_groups_list for a list
    client_tls_dheparams  SSL_CTX_set_dh_auto; none drops DHE suites
    *_tls_sslmode       verify_mode / check_hostname
"""

from __future__ import annotations

import hashlib
import os
import re
import ssl as _stdlib_ssl
import warnings

from gevent import ssl

from ..config import ConfigError
from . import tls_native

ALPN = "postgresql"

MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_RANK = {mode: i for i, mode in enumerate(MODES)}

_VERSIONS = {
    "tlsv1": _stdlib_ssl.TLSVersion.TLSv1, "tlsv1.0": _stdlib_ssl.TLSVersion.TLSv1,
    "tlsv1.1": _stdlib_ssl.TLSVersion.TLSv1_1, "tlsv1.2": _stdlib_ssl.TLSVersion.TLSv1_2,
    "tlsv1.3": _stdlib_ssl.TLSVersion.TLSv1_3,
}
_ORDER = [_stdlib_ssl.TLSVersion.TLSv1, _stdlib_ssl.TLSVersion.TLSv1_1,
          _stdlib_ssl.TLSVersion.TLSv1_2, _stdlib_ssl.TLSVersion.TLSv1_3]
_GROUPS = {"all": set(_ORDER), "legacy": set(_ORDER),
           "secure": set(_ORDER[2:]), "default": set(_ORDER[2:])}
_NO_FLAG = {_ORDER[0]: "OP_NO_TLSv1", _ORDER[1]: "OP_NO_TLSv1_1",
            _ORDER[2]: "OP_NO_TLSv1_2", _ORDER[3]: "OP_NO_TLSv1_3"}
# PgBouncer's (libusual's) cipher list names, as OpenSSL cipher strings.
_CIPHERS = {
    "default": None, "normal": None,
    "secure": "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL",
    "fast": "ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES:DHE+AESGCM:!aNULL:!eNULL:!SHA1",
    "compat": "HIGH:MEDIUM:!aNULL:!eNULL", "legacy": "ALL:!aNULL:!eNULL", "all": "ALL:!aNULL:!eNULL",
}


def rank(mode: str) -> int:
    return _RANK.get(mode, 0)


def parse_protocols(value: str) -> set:
    """``tlsv1.2,tlsv1.3``, ``secure``, ``all``, ``!tlsv1.0`` ... -> TLS versions."""
    chosen: set = set()
    words = [w for w in re.split(r"[\s,:]+", (value or "").strip().lower()) if w]
    if not words:
        return set(_GROUPS["secure"])
    for word in words:
        negate = word.startswith("!")
        name = word[1:] if negate else word
        versions = _GROUPS.get(name) or ({_VERSIONS[name]} if name in _VERSIONS else None)
        if versions is None:
            raise ValueError(f"unknown protocol {name!r}")
        if negate:
            chosen -= versions
        else:
            chosen |= versions
    if not chosen:
        raise ValueError("no protocol left")
    return chosen


def _apply_protocols(ctx, versions: set) -> None:
    ordered = [v for v in _ORDER if v in versions]
    with warnings.catch_warnings():     # TLS 1.0/1.1 and OP_NO_* are deprecated, and asked for
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ordered[0]
        ctx.maximum_version = ordered[-1]
        for version in _ORDER[_ORDER.index(ordered[0]):_ORDER.index(ordered[-1]) + 1]:
            if version not in versions:
                ctx.options |= getattr(_stdlib_ssl, _NO_FLAG[version])


def _cipher_string(value: str, drop: list[str]) -> str | None:
    key = (value or "default").strip()
    base = _CIPHERS[key.lower()] if key.lower() in _CIPHERS else key
    if not drop:
        return base
    return ":".join([base or "DEFAULT", *drop])


class _Located:
    """Where each [pgbouncer] key was set, for config errors (file, line)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._where: dict[str, tuple[str, int]] | None = None

    def error(self, key: str, msg: str) -> ConfigError:
        if self._where is None:
            self._where = _scan_keys(self.cfg.files or (self.cfg.path,))
        file, line = self._where.get(key, (self.cfg.path, None))
        return ConfigError(msg, file=file, line=line, key=key)


def _scan_keys(files) -> dict[str, tuple[str, int]]:
    where: dict[str, tuple[str, int]] = {}
    section = None
    for path in files:
        try:
            with open(path, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for number, raw in enumerate(lines, start=1):
            text = raw.strip()
            if text.startswith("["):
                section = text.strip("[]").strip().lower()
            elif section == "pgbouncer" and "=" in text and text[0] not in ";#":
                where[text.split("=", 1)[0].strip().lower()] = (path, number)
    return where


class TlsSide:
    """The context and mode for one side; ``identity`` changes when anything
    that shapes a handshake changes (settings or the files' contents)."""

    __slots__ = ("context", "mode", "identity")

    def __init__(self, context, mode: str, identity: tuple):
        self.context = context
        self.mode = mode
        self.identity = identity


class TlsConfig:
    __slots__ = ("client", "server")

    def __init__(self, client: TlsSide, server: TlsSide):
        self.client = client
        self.server = server

    @classmethod
    def from_config(cls, cfg) -> TlsConfig:
        s = cfg.pgbouncer
        where = _Located(cfg)
        return cls(_client_side(s, cfg.resolve_path, where), _server_side(s, cfg.resolve_path, where))


def _files_identity(*paths) -> tuple:
    out = []
    for path in paths:
        if not path:
            out.append(None)
            continue
        try:
            with open(path, "rb") as handle:
                out.append((path, hashlib.sha256(handle.read()).hexdigest()))
        except OSError:
            out.append((path, None))
    return tuple(out)


def _client_side(s, resolve, where: _Located) -> TlsSide:
    mode = s.client_tls_sslmode
    if mode == "disable":
        return TlsSide(None, mode, (mode,))
    key, cert, ca = (resolve(s.client_tls_key_file), resolve(s.client_tls_cert_file),
                     resolve(s.client_tls_ca_file))
    if not key or not cert:
        raise where.error("client_tls_sslmode", "To allow TLS connections from clients, "
                          "client_tls_key_file and client_tls_cert_file must be set.")
    if s.auth_type == "cert":
        if mode != "verify-full":
            raise where.error("auth_type", "auth_type=cert requires client_tls_sslmode=verify-full")
        if not ca:
            raise where.error("auth_type", "auth_type=cert requires client_tls_ca_file")
    elif rank(mode) >= rank("verify-ca") and not ca:
        raise where.error("client_tls_sslmode", f"client_tls_sslmode {mode} requires client_tls_ca_file")
    ctx = ssl.SSLContext(_stdlib_ssl.PROTOCOL_TLS_SERVER)
    _common(ctx, s.client_tls_protocols, s.client_tls_ciphers, s.client_tls13_ciphers, where, "client",
            ecdhcurve=s.client_tls_ecdhcurve, dheparams=s.client_tls_dheparams)
    _load_chain(ctx, cert, key, where, "client")
    if ca:
        _load_ca(ctx, ca, where, "client_tls_ca_file")
        ctx.verify_mode = _stdlib_ssl.CERT_REQUIRED if rank(mode) >= rank("verify-ca") else _stdlib_ssl.CERT_OPTIONAL
    ctx.options |= _stdlib_ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols([ALPN])
    identity = (mode, s.client_tls_protocols, s.client_tls_ciphers, s.client_tls13_ciphers,
                s.client_tls_ecdhcurve, s.client_tls_dheparams, _files_identity(key, cert, ca))
    return TlsSide(ctx, mode, identity)


def _server_side(s, resolve, where: _Located) -> TlsSide:
    mode = s.server_tls_sslmode
    if mode == "disable":
        return TlsSide(None, mode, (mode,))
    key, cert, ca = (resolve(s.server_tls_key_file), resolve(s.server_tls_cert_file),
                     resolve(s.server_tls_ca_file))
    ctx = ssl.SSLContext(_stdlib_ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = _stdlib_ssl.CERT_NONE
    _common(ctx, s.server_tls_protocols, s.server_tls_ciphers, s.server_tls13_ciphers, where, "server")
    if cert or key:
        if not (cert and key):
            raise where.error("server_tls_cert_file" if not cert else "server_tls_key_file",
                              "server_tls_cert_file and server_tls_key_file go together")
        _load_chain(ctx, cert, key, where, "server")
    if rank(mode) >= rank("verify-ca"):
        ctx.verify_mode = _stdlib_ssl.CERT_REQUIRED
        if ca:
            _load_ca(ctx, ca, where, "server_tls_ca_file")
        else:
            ctx.load_default_certs()     # PgBouncer: the system's CA bundle
        ctx.check_hostname = mode == "verify-full"
    identity = (mode, s.server_tls_protocols, s.server_tls_ciphers, s.server_tls13_ciphers,
                _files_identity(key, cert, ca))
    return TlsSide(ctx, mode, identity)


def _common(ctx, protocols: str, ciphers: str, tls13: str | None, where: _Located, side: str,
            ecdhcurve: str = "auto", dheparams: str = "auto") -> None:
    try:
        _apply_protocols(ctx, parse_protocols(protocols))
    except ValueError as exc:
        raise where.error(f"{side}_tls_protocols", f"invalid {side}_tls_protocols: {exc}") from None
    drop = []
    curve = (ecdhcurve or "auto").strip()
    if curve.lower() == "none":
        drop.append("!kECDHE")
    if dheparams == "none":
        drop.append("!kDHE")
    cipher_string = _cipher_string(ciphers, drop)
    if cipher_string is not None:
        try:
            ctx.set_ciphers(cipher_string)
        except _stdlib_ssl.SSLError:
            raise where.error(f"{side}_tls_ciphers", f"invalid {side}_tls_ciphers: {ciphers}") from None
    if tls13:
        try:
            tls_native.set_tls13_ciphers(ctx, tls13.strip())
        except ValueError as exc:
            raise where.error(f"{side}_tls13_ciphers", f"invalid {side}_tls13_ciphers: {exc}") from None
    if side != "client":
        return
    if curve.lower() not in ("auto", "none"):
        try:
            if ":" in curve or "," in curve:
                tls_native.set_groups(ctx, curve.replace(",", ":"))
            else:
                ctx.set_ecdh_curve(curve)
        except ValueError as exc:
            raise where.error("client_tls_ecdhcurve", f"invalid client_tls_ecdhcurve: {exc}") from None
    if dheparams != "none":
        tls_native.set_dh_auto(ctx)


def _load_chain(ctx, cert: str, key: str, where: _Located, side: str) -> None:
    for name, path in ((f"{side}_tls_cert_file", cert), (f"{side}_tls_key_file", key)):
        if not os.access(path, os.R_OK):
            raise where.error(name, f"cannot read {path}")
    try:
        ctx.load_cert_chain(cert, key)
    except _stdlib_ssl.SSLError as exc:
        raise where.error(f"{side}_tls_key_file", f"cannot use {cert} with {key}: {exc.reason or exc}") from None
    except OSError as exc:
        raise where.error(f"{side}_tls_cert_file", f"cannot load {cert}: {exc.strerror or exc}") from None


def _load_ca(ctx, ca: str, where: _Located, key: str) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except (OSError, _stdlib_ssl.SSLError) as exc:
        raise where.error(key, f"cannot load {ca}: {getattr(exc, 'reason', None) or exc}") from None

