"""COPY ... FROM STDIN on a sharded database: every row to its shard.

The COPY goes to every shard the table may be on; the client gets one
CopyInResponse, then its rows (text or CSV; binary is refused) are split at
row boundaries — a CopyData message may end anywhere, a CSV field may hold a
newline — and each shard receives only its own rows (a header line, when
there is one, goes to all). The CommandComplete counts are summed. A table
without a sharding rule gets every row on every shard.
"""

from __future__ import annotations

import csv
import io

from ..proto import messages as m
from ..sharding.rules import ShardingError

_G, _Z, _E, _C = (ord(c) for c in "GZEC")
_DATA, _DONE, _FAIL = ord("d"), ord("c"), ord("f")
_FLUSH_AT = 1 << 16
MAX_ROW = 1 << 26          # bytes of one COPY row held until its end (and its key) is seen
csv.field_size_limit(MAX_ROW + 1)   # the csv module's default (128 kB) refuses larger fields
_TEXT_ESCAPES = {ord("b"): "\b", ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t",
                 ord("v"): "\v", ord("\\"): "\\"}


def run(session, plan, text: str, targets):
    spec = plan.copy
    if spec.format == "binary":
        raise ShardingError("0A000", "COPY in binary format is not supported on a sharded database")
    rule = spec.key_rule
    candidates = spec.key_candidates or ()
    sharded = rule is not None or bool(candidates)
    targets = sorted(range(len(session.sdb.shards)) if sharded else targets)
    links = session.take(targets)
    try:
        key_index = None
        if sharded:
            columns = spec.columns if spec.columns is not None else _columns(session, links[0], spec)
            if rule is None:       # table=* rules: the first whose column the table has
                rule = next((r for r in candidates if r.column in columns), None)
            if rule is not None:
                if rule.column not in columns:
                    raise ShardingError("0A000", f'COPY into a sharded table must include its key '
                                                 f'column "{rule.column}"')
                key_index = list(columns).index(rule.column)
        return _copy(session, links, text, spec, rule, key_index)
    finally:
        session.give_back(links)


def _columns(session, shard_link, spec) -> list:
    """The table's own column order, from a shard's catalog."""
    table = f'"{spec.schema}"."{spec.table}"' if spec.schema else f'"{spec.table}"'
    sql = ("SELECT attname FROM pg_attribute WHERE attrelid = " + _literal(table) + "::regclass "
           "AND attnum > 0 AND NOT attisdropped ORDER BY attnum")
    shard_link.send_request(m.query(sql), 1, session.client.request_time)
    columns, error = [], None
    for mtype, body in shard_link.messages():
        if mtype == ord("D"):
            size = int.from_bytes(body[2:6], "big", signed=True)
            columns.append(body[6:6 + size].decode())
        elif mtype == _E:
            error = m.parse_error_fields(body)
    if error is not None:
        raise ShardingError(error.get("C", "42P01"), error.get("M", "no such table"))
    return columns


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _copy(session, links, text: str, spec, rule, key_index):
    now = session.client.request_time
    for shard_link in links:
        shard_link.send_request(m.query(text), 1, now)
    first = None
    errors = []
    done = set()                                 # shards whose reply has ended already
    for shard_link in links:                     # every shard in COPY mode, or an error
        for mtype, body in shard_link.messages():
            if mtype == _G:
                first = first or body
                break
            if mtype == _E:
                errors.append(body)
            if mtype == _Z:
                done.add(shard_link.shard)
    if errors:
        for shard_link in links:
            if shard_link.shard not in done:
                shard_link.send_request(m.message(b"f", b"another shard refused the COPY\x00"), 0, now)
        return _finish(session, [lk for lk in links if lk.shard not in done], errors)
    session.client.send(m.message(b"G", first))
    splitter = RowSplitter(spec, rule, key_index, len(session.sdb.shards))
    by_shard = {lk.shard: lk for lk in links}
    failed = None
    while True:
        mtype, body = session.next_message()
        if mtype == _DATA:
            if failed is None:
                try:
                    for shard, rows in splitter.feed(body).items():
                        _send_rows(by_shard, shard, rows)
                except ShardingError as exc:
                    failed = exc
        elif mtype == _DONE:
            if failed is None:
                try:
                    for shard, rows in splitter.finish().items():
                        _send_rows(by_shard, shard, rows)
                except ShardingError as exc:
                    failed = exc
            break
        elif mtype == _FAIL:
            failed = failed or ShardingError("57014", "COPY from stdin failed: " + body[:-1].decode(
                "utf-8", "replace"))
            break
        elif mtype in (ord("H"), ord("S")):
            continue
        else:
            failed = ShardingError("08P01", f"unexpected message type 0x{mtype:02X} during COPY from stdin")
            break
    for shard_link in links:
        if failed is None:
            shard_link.send_request(m.message(b"c"), 0, now)
        else:
            shard_link.send_request(m.message(b"f", failed.text.encode() + b"\x00"), 0, now)
    out = _finish(session, links, [])
    if failed is not None:
        return m.error_response(failed.sqlstate, failed.text)
    return out


def _send_rows(by_shard, shard: int, rows: list) -> None:
    shard_link = by_shard[shard]
    shard_link.send_request(m.message(b"d", b"".join(rows)), 0, 0.0)


def _finish(session, links, errors: list) -> bytes:
    total = 0
    for shard_link in links:
        for mtype, body in shard_link.messages():
            if mtype == _E:
                errors.append(body)
            elif mtype == _C and body.startswith(b"COPY "):
                total += int(body[5:-1] or 0)
    if errors:
        fields = m.parse_error_fields(errors[0])
        return session_error(session, fields)
    return m.command_complete(f"COPY {total}")


def session_error(session, fields) -> bytes:
    from .sharded import error_reply
    return error_reply(session, fields.get("C", "XX000"), fields.get("M", "COPY failed"))


class RowSplitter:
    """Cuts a COPY stream into rows and tells each row's shard."""

    __slots__ = ("spec", "rule", "key_index", "parts", "held", "inside", "pending", "header", "rows",
                 "csv", "delimiter", "quote", "null", "ended", "_nshards")

    def __init__(self, spec, rule, key_index, nshards: int):
        self.spec = spec
        self.rule = rule
        self.key_index = key_index
        self.parts: list[bytes] = []      # the row not ended yet
        self.held = 0                     # its length
        self.inside = False               # CSV: inside a quoted field at the end of parts
        self.pending: dict[int, list] = {}
        self.header = bool(spec.header)
        self.rows = 0
        self.csv = spec.format == "csv"
        self.delimiter = (spec.delimiter or (b"," if self.csv else b"\t"))
        if isinstance(self.delimiter, str):
            self.delimiter = self.delimiter.encode()
        quote = spec.quote or '"'
        self.quote = quote.encode() if isinstance(quote, str) else quote
        null = spec.null if spec.null is not None else ("" if self.csv else "\\N")
        self.null = null.encode() if isinstance(null, str) else null
        self.ended = False
        self._nshards = nshards

    def feed(self, data: bytes) -> dict[int, list]:
        """The complete rows in ``data`` (with what came before), by shard. Each
        byte is scanned once: a row not ended yet is kept as pieces, at most
        MAX_ROW bytes (a CSV quote that never closes must not grow without bound)."""
        out = self.pending = {}
        start = 0
        for end in self._row_ends(data):
            line = data[start:end + 1]
            if self.parts:
                line = b"".join(self.parts) + line
                self.parts, self.held = [], 0
            self._row(line, out)
            start = end + 1
        if start < len(data):
            self.parts.append(data[start:])
            self.held += len(data) - start
            if self.held > MAX_ROW:
                raise ShardingError("54000", f"a COPY row longer than {MAX_ROW} bytes on a sharded "
                                             "database (a CSV quote never closed?)")
        return out

    def finish(self) -> dict[int, list]:
        out = self.pending = {}
        if self.parts:
            self._row(b"".join(self.parts) + b"\n", out)
            self.parts, self.held = [], 0
        return out

    def _row_ends(self, data: bytes):
        """Offsets of the newlines that end rows; a CSV quote state carries over."""
        if not self.csv:
            pos = data.find(b"\n")
            while pos >= 0:
                yield pos
                pos = data.find(b"\n", pos + 1)
            return
        quote, pos, inside, next_quote = self.quote, 0, self.inside, -2
        while True:                           # a quoted field may hold newlines
            if inside:
                pos = data.find(quote, pos)
                if pos < 0:
                    break
                inside, pos = False, pos + 1
                continue
            if next_quote != -1 and next_quote < pos:     # -1: no quote further on
                next_quote = data.find(quote, pos)
            newline = data.find(b"\n", pos)
            if next_quote >= 0 and (newline < 0 or next_quote < newline):
                inside, pos = True, next_quote + 1
            elif newline >= 0:
                yield newline
                pos = newline + 1
            else:
                break
        self.inside = inside

    def _row(self, line: bytes, out: dict) -> None:
        if self.ended:
            return
        if self.header:
            self.header = False
            for shard in range(self._nshards):
                out.setdefault(shard, []).append(line)
            return
        if line.rstrip(b"\r\n") == b"\\.":
            self.ended = True
            return
        if self.rule is None:
            shard_list = range(self._nshards)
        else:
            shard_list = (self.rule.shard_for_text(self._key(line)),)
        self.rows += 1
        for shard in shard_list:
            out.setdefault(shard, []).append(line)

    def _key(self, line: bytes) -> str:
        body = line.rstrip(b"\n").rstrip(b"\r") if self.csv else line.rstrip(b"\n")
        if self.csv:
            try:
                fields = next(csv.reader(io.StringIO(body.decode("utf-8", "surrogateescape")),
                                         delimiter=self.delimiter.decode(), quotechar=self.quote.decode()))
            except (csv.Error, StopIteration) as exc:     # a NUL, an empty line...
                raise ShardingError("22P04", f"bad CSV row in COPY from stdin: {exc or 'empty line'}") from None
            raw = fields[self.key_index] if self.key_index < len(fields) else None
            if raw is None or (raw == self.null.decode() and not _quoted(body, self.key_index, self)):
                raise ShardingError("23502", "the sharding key of a COPY row is missing or null")
            return raw
        fields = _split_text(body, self.delimiter)
        if self.key_index >= len(fields) or fields[self.key_index] == self.null:
            raise ShardingError("23502", "the sharding key of a COPY row is missing or null")
        return _unescape(fields[self.key_index])


def _quoted(body: bytes, index: int, splitter) -> bool:
    # An empty quoted CSV field ("") is an empty string, not NULL.
    return splitter.quote * 2 in body


def _split_text(body: bytes, delimiter: bytes) -> list[bytes]:
    """Fields of a text-format row: a backslash escapes the next byte."""
    fields, start, pos, n = [], 0, 0, len(body)
    delim = delimiter[0]
    while pos < n:
        byte = body[pos]
        if byte == 92:
            pos += 2
            continue
        if byte == delim:
            fields.append(body[start:pos])
            start = pos + 1
        pos += 1
    fields.append(body[start:])
    return fields


def _unescape(raw: bytes) -> str:
    if b"\\" not in raw:
        return raw.decode("utf-8", "surrogateescape")
    out, pos = [], 0
    text = raw.decode("utf-8", "surrogateescape")
    while pos < len(text):
        ch = text[pos]
        if ch == "\\" and pos + 1 < len(text):
            nxt = text[pos + 1]
            out.append(_TEXT_ESCAPES.get(ord(nxt), nxt))
            pos += 2
        else:
            out.append(ch)
            pos += 1
    return "".join(out)
