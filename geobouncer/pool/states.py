"""Client and server states, named as PgBouncer names them (SHOW POOLS exposes them).

A connection's state is the list it lives in, as in PgBouncer; these names are
what SHOW CLIENTS / SHOW SERVERS print in their ``state`` column.
"""

CL_LOGIN = "login"          # authenticating
CL_WAITING = "waiting"      # logged in, waiting for a server
CL_ACTIVE = "active"        # logged in; linked to a server or idle between transactions
CL_ACTIVE_CANCEL = "active_cancel_req"
CL_WAITING_CANCEL = "waiting_cancel_req"

SV_LOGIN = "login"          # connecting / authenticating to PostgreSQL
SV_IDLE = "idle"            # in the pool, ready
SV_ACTIVE = "active"        # linked to a client
SV_USED = "used"            # idle longer than server_check_delay: checked before reuse
SV_TESTED = "tested"        # running server_check_query or server_reset_query
SV_ACTIVE_CANCEL = "active_cancel"
SV_BEING_CANCELED = "being_canceled"

POOL_MODES = ("session", "transaction", "statement")
