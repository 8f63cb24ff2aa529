"""The kinds of the prepared-statement tracker's FIFO entries (pool/prepared.py),
and the requests PostgreSQL never answers, without I/O.

Every Query, FunctionCall and Sync sent counts as owing one ReadyForQuery
(``ServerConnection.outstanding``), and a server goes back to its pool only
when nothing is owed. PostgreSQL answers none of these:

- after an error in an extended-protocol message it skips every message up to
  the next Sync, a Query or FunctionCall included (postgres.c, ignore_till_sync);
- while it reads COPY FROM STDIN data it swallows Syncs and Flushes, for the
  sake of libpq, which sends a Sync with the COPY in the extended protocol and
  another after CopyDone (copyfromparse.c);
- a CopyDone or CopyFail it reads outside COPY it ignores.

Left counted, each keeps the server linked to its client, idle, for ever. So
the tracker drops them from its FIFO and says how many (``Tracker.unanswered``)
for the reader to take off ``outstanding`` (``settle``; ``needs_sync``: the
server waits for a Sync). Only what is certain is dropped: a
count too high holds a server (its own client's); one too low would give the
next client a ReadyForQuery that is not its own. A failed COPY FROM STDIN
may leave the count in doubt (``doubtful``): once the client's requests look
answered, a fence (net/copy_fence.py) finds where the stream stands.

Functions over a Tracker, called by it (pool/prepared.py) when one of these
cases comes up: the common request and reply pay no call here.
"""

from __future__ import annotations

PARSE, BIND, DESCRIBE, EXECUTE, CLOSE, SYNC, QUERY, FAKE, INJECTED, COPY_END, FENCE = range(11)
# INJECTED: a simple Query the pooler sent (a deferred BEGIN, net/defer_begin.py):
# its replies are swallowed (CommandComplete, a warning, ReadyForQuery), an error forwarded.
# COPY_END: a CopyDone or CopyFail sent (where a COPY FROM STDIN stops swallowing Syncs).
# FENCE: the pooler's fence after a doubtful COPY (net/copy_fence.py), first in the queue
# while its replies are awaited: what the client sends meanwhile queues behind it.

# An error in one of these makes PostgreSQL skip to the next Sync. Only known
# for sure while the tracker matches every reply (``exact``): otherwise the
# head of the FIFO may be a message already answered.
EXTENDED = frozenset((PARSE, BIND, DESCRIBE, EXECUTE, CLOSE))
_SYNC_ONLY = frozenset((SYNC,))
_SYNC_OR_QUERY = frozenset((SYNC, QUERY))


def skip_to_sync(tracker, through_queries: bool) -> None:
    """An error: drop the entries PostgreSQL skips, up to the next Sync (or
    Query, when the error was a Query's own or the extended case is not
    certain). Statements those entries would have prepared are not there."""
    pending = tracker.pending
    stops = _SYNC_ONLY if through_queries else _SYNC_OR_QUERY
    skipped = 0
    while pending and pending[0][0] not in stops:
        entry = pending.popleft()
        kind = entry[0]
        if kind == QUERY:
            skipped += 1
        elif kind == PARSE and isinstance(entry[2], int):
            # Refused, or skipped after the error: not prepared there,
            # and the client's name is free again.
            tracker.prepared.discard(entry[2])
            tracker.parsed.discard(entry[2])
            owner = entry[3] if len(entry) > 3 else None
            if owner is not None and owner[0].get(owner[1], (None,))[0] == entry[2]:
                del owner[0][owner[1]]
        elif kind == CLOSE and type(entry[2]) is int:
            tracker.prepared.restore(entry[2])   # the eviction's Close was skipped
    if pending:
        pending[0] = (pending[0][0], False, None)   # the batch failed: no effect
        return _count(tracker, skipped, False)
    tracker.sync_effect = None      # nor for a Sync still to come
    if through_queries:
        # What the client sends next is skipped too, up to its Sync: the
        # ReadyForQuery that comes is that Sync's (ready_irregular).
        tracker.skipping = tracker.irregular = True
    _count(tracker, skipped, through_queries)


def copy_end_sent(tracker) -> None:
    """A CopyDone / CopyFail queued behind something (or during a COPY):
    one sent with nothing queued before it (no COPY under way or to start,
    say idle in a transaction) is ignored by PostgreSQL, and queued it would
    pass for the end of the next COPY (its Syncs then counted owed)."""
    tracker.pending.append((COPY_END, False, None))
    # Every reply matched: once those before it are all answered and no
    # COPY is under way, it was read outside COPY (drop_stale_copy_ends).
    tracker.irregular = tracker.exact = True


def drop_stale_copy_ends(tracker) -> None:
    """CopyDone / CopyFail entries at the head of the queue with no COPY
    under way (every request before them answered, no CopyInResponse
    since): PostgreSQL read them outside COPY and ignored them. Left
    there, the replies after them would be matched against them (the
    pooler's own Close / Parse replies forwarded) and the next COPY would
    take one for its end."""
    pending = tracker.pending
    while pending and pending[0][0] == COPY_END and not tracker.copy_in:
        pending.popleft()


def copy_failed(tracker) -> None:
    """A COPY FROM STDIN failed (an ErrorResponse while ``copy_in``). The
    Syncs PostgreSQL read in COPY mode were swallowed; those it reads after
    the error are answered (the first ends the skip of an extended-protocol
    error). Of the Syncs sent before the first CopyDone / CopyFail, which
    were read before the error is not known: a bad row or a CopyFail comes
    after them (all swallowed), a statement_timeout or a trigger may come
    before. Count them swallowed, the fewest replies PostgreSQL can still
    send (the server looks answered no later than it is), and doubt the
    server (``doubtful``): it goes on serving its client, and when its
    requests look answered a fence (net/copy_fence.py) forwards whatever
    else comes, up to the fence's own replies; only then may it serve
    another client (a ReadyForQuery still to come would reach the next one).
    Left counted, they held the server linked to its idle client for ever."""
    tracker.copy_in = False
    pending = tracker.pending
    kept, swallowed, ended = [], 0, False
    for entry in pending:
        ended = ended or entry[0] == COPY_END
        if not ended and entry[0] == SYNC:
            swallowed += 1
        else:
            kept.append(entry)
    if not swallowed:
        return
    pending.clear()
    pending.extend(kept)
    tracker.doubtful = True
    _count(tracker, swallowed, False)


def _count(tracker, skipped: int, needs_sync: bool) -> None:
    if skipped or needs_sync:
        tracker.unanswered += skipped
        tracker.needs_sync = tracker.needs_sync or needs_sync
        tracker.settle = True


def ready_irregular(tracker) -> None:
    """A ReadyForQuery came while something above applies (``irregular``),
    before the entries it answers are dropped."""
    pending = tracker.pending
    if tracker.skipping:
        tracker.skipping = False
        skip_to_sync(tracker, True)
    if tracker.copy_in:
        # A COPY FROM STDIN ended well (an error clears copy_in): PostgreSQL
        # read every message up to its CopyDone, so the Syncs before that were
        # swallowed (nothing answered before the COPY is still queued).
        tracker.copy_in = False
        at = next((i for i, entry in enumerate(pending) if entry[0] == COPY_END), None)
        if at is not None:
            kept = [entry for entry in list(pending)[:at] if entry[0] != SYNC]
            tracker.unanswered += at - len(kept)
            tracker.settle = True
            for _ in range(at):
                pending.popleft()
            pending.extendleft(reversed(kept))
    # A CopyDone right after the request this ReadyForQuery answers ended a
    # COPY now over (or none: PostgreSQL ignores it outside COPY). Those
    # before it go with it.
    later = False
    for i, entry in enumerate(pending):
        if entry[0] == SYNC or entry[0] == QUERY:
            while len(pending) > i + 1 and pending[i + 1][0] == COPY_END:
                del pending[i + 1]
            later = any(entry[0] == COPY_END for entry in list(pending)[i + 1:])
            break
    tracker.irregular = tracker.copy_in or later
