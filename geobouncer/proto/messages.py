"""Builders and decoders for the messages the pooler itself reads or writes.

Everything else is forwarded as opaque bytes. Constant messages are built
once at import.
"""

from __future__ import annotations

import struct

from .framing import CANCEL_REQUEST_CODE, PROTOCOL_3_0, ProtocolError

_I32 = struct.Struct("!I")
_i32 = struct.Struct("!i")
_HDR = struct.Struct("!cI")


def message(mtype: bytes, body: bytes = b"") -> bytes:
    return _HDR.pack(mtype, len(body) + 4) + body


def cstr(text: str) -> bytes:
    # surrogateescape: a client's non-UTF-8 bytes, decoded that way to be read
    # as text, go back out as they came (the server is the one to refuse them).
    return text.encode("utf-8", "surrogateescape") + b"\x00"


# --- backend messages -------------------------------------------------------

def authentication(code: int, data: bytes = b"") -> bytes:
    return message(b"R", _I32.pack(code) + data)


AUTH_OK = authentication(0)
AUTH_CLEARTEXT = authentication(3)
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


def auth_md5_request(salt: bytes) -> bytes:
    return authentication(AUTH_MD5, salt)


def auth_sasl(mechanisms: list[str]) -> bytes:
    return authentication(AUTH_SASL, b"".join(cstr(m) for m in mechanisms) + b"\x00")


def auth_sasl_continue(data: bytes) -> bytes:
    return authentication(AUTH_SASL_CONTINUE, data)


def auth_sasl_final(data: bytes) -> bytes:
    return authentication(AUTH_SASL_FINAL, data)


def is_sasl_final(msg: bytes) -> bool:
    """Is this built message an AuthenticationSASLFinal (no reply expected)?"""
    return msg[:1] == b"R" and len(msg) >= 9 and _I32.unpack_from(msg, 5)[0] == AUTH_SASL_FINAL


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def backend_key_data(pid: int, key: int) -> bytes:
    return message(b"K", _I32.pack(pid) + _I32.pack(key))


READY_IDLE = message(b"Z", b"I")
READY_IN_TX = message(b"Z", b"T")
READY_FAILED = message(b"Z", b"E")
EMPTY_QUERY = message(b"I")
SSL_NO = b"N"


def ready_for_query(status: bytes) -> bytes:
    return message(b"Z", status)


def _fields(severity: str, sqlstate: str, text: str, detail: str | None, hint: str | None) -> bytes:
    body = b"S" + cstr(severity) + b"V" + cstr(severity) + b"C" + cstr(sqlstate) + b"M" + cstr(text)
    if detail:
        body += b"D" + cstr(detail)
    if hint:
        body += b"H" + cstr(hint)
    return body + b"\x00"


def error_response(sqlstate: str, text: str, severity: str = "ERROR",
                   detail: str | None = None, hint: str | None = None) -> bytes:
    return message(b"E", _fields(severity, sqlstate, text, detail, hint))


def notice_response(text: str, sqlstate: str = "00000", severity: str = "NOTICE") -> bytes:
    return message(b"N", _fields(severity, sqlstate, text, None, None))


def row_description(columns: list[tuple[str, int]]) -> bytes:
    """columns: (name, type_oid). Text format, no table info."""
    parts = [struct.pack("!H", len(columns))]
    for name, oid in columns:
        size = {20: 8, 23: 4, 16: 1}.get(oid, -1)
        parts.append(cstr(name) + struct.pack("!IhIhih", 0, 0, oid, size, -1, 0))
    return message(b"T", b"".join(parts))


def data_row(values: list) -> bytes:
    parts = [struct.pack("!H", len(values))]
    for v in values:
        if v is None:
            parts.append(_i32.pack(-1))
        else:
            if isinstance(v, bool):
                v = "t" if v else "f"
            raw = v if isinstance(v, bytes) else str(v).encode()
            parts.append(_i32.pack(len(raw)) + raw)
    return message(b"D", b"".join(parts))


def command_complete(tag: str) -> bytes:
    return message(b"C", cstr(tag))


# --- frontend messages ------------------------------------------------------

TERMINATE = message(b"X")
SYNC = message(b"S")
FLUSH = message(b"H")


def startup_message(params: dict[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_3_0) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\x00"
    return _I32.pack(len(body) + 4) + body


def cancel_request(pid: int, key: int) -> bytes:
    return struct.pack("!IIII", 16, CANCEL_REQUEST_CODE, pid, key)


def query(sql: str) -> bytes:
    return message(b"Q", cstr(sql))


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstr(mechanism) + _i32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return message(b"p", data)


# --- decoders ---------------------------------------------------------------

def read_cstr(body, pos: int = 0) -> tuple[str, int]:
    end = bytes(body).find(b"\x00", pos) if not isinstance(body, bytes) else body.find(b"\x00", pos)
    if end < 0:
        raise ProtocolError("unterminated string")
    return bytes(body[pos:end]).decode(errors="replace"), end + 1


def parse_error_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse body -> {field code: value}, e.g. {'C': '57P01'}."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        value, pos = read_cstr(body, pos + 1)
        fields[code] = value
    return fields


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    name, pos = read_cstr(body)
    value, _ = read_cstr(body, pos)
    return name, value


def parse_authentication(body: bytes) -> tuple[int, bytes]:
    if len(body) < 4:
        raise ProtocolError("short authentication message")
    return _I32.unpack_from(body)[0], bytes(body[4:])


def parse_backend_key_data(body: bytes) -> tuple[int, int]:
    return struct.unpack("!II", body[:8])


def parse_sasl_mechanisms(data: bytes) -> list[str]:
    return [m.decode() for m in data.split(b"\x00") if m]


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    mech, pos = read_cstr(body)
    if len(body) < pos + 4:
        raise ProtocolError("short SASLInitialResponse")
    n = _i32.unpack_from(body, pos)[0]
    data = bytes(body[pos + 4:pos + 4 + n]) if n >= 0 else b""
    return mech, data


def parse_query(body) -> str:
    return bytes(body[:-1] if body[-1:] == b"\x00" else body).decode(errors="replace")


def parse_message(sql: str, name: str = "") -> bytes:
    return message(b"P", cstr(name) + cstr(sql) + b"\x00\x00")


def bind_text(params: list[str | None], portal: str = "", statement: str = "") -> bytes:
    body = cstr(portal) + cstr(statement) + b"\x00\x00" + struct.pack("!H", len(params))
    for p in params:
        if p is None:
            body += _i32.pack(-1)
        else:
            raw = p.encode()
            body += _i32.pack(len(raw)) + raw
    return message(b"B", body + b"\x00\x00")


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return message(b"E", cstr(portal) + _I32.pack(max_rows))


def extended_query(sql: str, params: list[str | None]) -> bytes:
    """Parse/Bind/Execute/Sync of an unnamed statement with text parameters."""
    return parse_message(sql) + bind_text(params) + execute() + SYNC
