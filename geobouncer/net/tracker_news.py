"""What the prepared-statement tracker (pool/prepared.py, pool/unanswered.py)
found in a chunk of a server's replies, applied to the connection and its
client. The tracker is pure over bytes and knows neither; net/server.py's
reader calls these after the chunk, when the tracker raised their flag
(``dropped_all``, ``settle``), which is seldom: no call otherwise.

  statements_dropped  a DEALLOCATE ALL / DISCARD ALL ran: the linked client's
                      statement names go (those that existed before it).
  settle              requests PostgreSQL will not answer were dropped: the
                      server owes less, or may wait for a Sync.
"""

from __future__ import annotations


def statements_dropped(server) -> None:
    """DEALLOCATE ALL / DISCARD ALL ran: the client's statement names are gone."""
    tracker = server.tracker
    tracker.dropped_all = False
    names, tracker.dropped_names = tracker.dropped_names, None
    client = server.client
    if client is None:
        return
    if names is None:
        client.statements.clear()
        client.stmt_sets.clear()
        client.stmt_routes.clear()
        client.stmt_class.clear()
        return
    # Only what existed before the drop: names prepared after it in the same
    # batch stay.
    statements = client.statements
    for name, entry in names.items():
        if statements.get(name) is entry:
            del statements[name]
            client.stmt_sets.pop(name, None)
            client.stmt_routes.pop(name, None)
            client.stmt_class.pop(name, None)


def settle(server) -> None:
    """Requests PostgreSQL will not answer were dropped (pool/unanswered.py):
    they owe nothing; after an extended-protocol error with no Sync sent
    yet, the server waits for one. A ``doubtful`` count stays so: the
    fence (net/copy_fence.py) clears it, once the client's requests look
    answered (ClientConnection.on_server_idle)."""
    tracker = server.tracker
    tracker.settle = False
    server.outstanding -= tracker.unanswered
    tracker.unanswered = 0
    if tracker.needs_sync:
        tracker.needs_sync = False
        server.unsynced = True
