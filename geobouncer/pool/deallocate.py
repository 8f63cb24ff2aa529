"""Statements a client's SQL drops, for the prepared-statement tracker
(pool/prepared.py), without I/O.

A client may drop its protocol-level statements with SQL as well as with
Close. The server knows them under the pooler's names, so:

  DEALLOCATE name      of a statement this client prepared: answered here
                       (``deallocate_locally``), the server keeps it for
                       other clients, as for a Close.
  DEALLOCATE ALL,      the server's statements are gone once it succeeds,
  DISCARD ALL          whichever protocol carried it (a prepared statement
                       can run it too, its text unseen by the client's side):
                       seen in its CommandComplete (``drop_all_done``).

A text that may be one of these (``MAY_DROP_ALL``, net/forward.py asks) is
watched from when it is queued (``watch_drop``): nothing later in the batch
may rely on what the server has, and when the drop comes only what existed
before it goes (the tracker's ``dropped_names``, for the client's names); if
it never comes (``drop_watch_over``) the statements are known again.

Functions over a Tracker, whose state (``drop_watch``, ``dropped_all``,
``dropped_names``) they read and write.
"""

from __future__ import annotations

import re

from ..proto import messages as m
from .unanswered import FAKE

_DEALLOCATE = re.compile(rb"^\s*deallocate\s+(?:prepare\s+)?(all|\"(?:[^\"]|\"\")+\"|[^\s;]+)\s*;?\s*$",
                         re.IGNORECASE | re.DOTALL)
# The reply to a DEALLOCATE answered here (a FAKE entry with no reply of its own,
# Tracker.first_fakes), before its ReadyForQuery.
DEALLOCATED = m.command_complete("DEALLOCATE")
DROP_ALL_TAGS = (b"DEALLOCATE ALL", b"DISCARD ALL")
# A text that may drop every statement when it runs (watch_drop).
MAY_DROP_ALL = re.compile(rb"(?:deallocate\s+(?:prepare\s+)?|discard\s+)all", re.IGNORECASE)


def watch_drop(tracker, client_stmts: dict) -> None:
    """A message just queued may run DEALLOCATE ALL / DISCARD ALL. What the
    server has now may be gone once it runs, so nothing later in the batch
    may rely on it (later Parses are sent again, after a Close); when the
    drop is seen, only what existed before it is forgotten, and if it never
    comes the statements are known again."""
    lru = tracker.prepared.lru
    if tracker.drop_watch is None:
        tracker.drop_watch = (list(lru), dict(client_stmts))
    else:
        tracker.drop_watch[0].extend(lru)
        tracker.drop_watch[1].update(client_stmts)
    lru.clear()
    tracker.exact = True


def drop_all_done(tracker) -> None:
    """A DEALLOCATE ALL / DISCARD ALL completed: whichever protocol carried
    it, the server has no statements left but those prepared after it in
    this batch (watch_drop)."""
    watch = tracker.drop_watch
    if watch is None:
        tracker.prepared.clear()
        tracker.dropped_names = None
    else:
        tracker.drop_watch = None
        tracker.dropped_names = watch[1]
    tracker.dropped_all = True


def drop_watch_over(tracker) -> None:
    """The batch ended and no drop came: what the server had, it still has."""
    sids = tracker.drop_watch[0]
    tracker.drop_watch = None
    prepared = tracker.prepared
    for sid in reversed(sids):
        if sid not in prepared:
            prepared.restore(sid)


def deallocate_locally(tracker, body, client_stmts: dict) -> bool:
    """``DEALLOCATE name`` (simple query) of a protocol-level statement this
    client prepared: the server knows it under another name, so it is
    answered here (CommandComplete + ReadyForQuery, queued in order)."""
    if body[:1].lower() not in (b"d", b" "):
        return False
    match = _DEALLOCATE.match(bytes(body[:-1]))
    if not match or match.group(1).lower() == b"all":
        return False
    target = match.group(1)
    target = target[1:-1].replace(b'""', b'"') if target.startswith(b'"') else target.lower()
    if target not in client_stmts:
        return False
    del client_stmts[target]
    tracker.exact = True
    tracker.pending.append((FAKE, False, None))
    return True
