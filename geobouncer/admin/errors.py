"""The console's refusal: an ErrorResponse, the connection stays usable."""

from __future__ import annotations


class AdminError(Exception):
    """PgBouncer's ``admin_error``: SQLSTATE 08P01 unless said otherwise."""

    def __init__(self, text: str, sqlstate: str = "08P01"):
        super().__init__(text)
        self.text = text
        self.sqlstate = sqlstate
