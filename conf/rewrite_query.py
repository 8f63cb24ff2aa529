"""Example rewrite hook: pgbouncer-rr's star-schema rewrite, for Python 3.

A fact table ``sales`` has two dimensions, ``store`` and ``product``.  Two reports
join sales with one of them and aggregate; both are served much faster from
tables that the ETL keeps pre-joined and pre-aggregated — ``store_sales`` and
``product_sales`` — without the reports knowing those tables exist:

    SELECT storename, SUM(total) FROM sales JOIN store USING (storeid)
      GROUP BY storename ORDER BY storename
    -> SELECT storename, SUM(total) FROM store_sales
      GROUP BY storename ORDER BY storename

    SELECT prodname, SUM(total) FROM sales JOIN product USING (productid)
      GROUP BY prodname ORDER BY prodname
    -> SELECT prodname, SUM(total) FROM product_sales
      GROUP BY prodname ORDER BY prodname

Any other query is returned unchanged.  The match ignores letter case, spacing
and line breaks, and a trailing semicolon; anything else (another column, a
WHERE clause) is a different query and is left alone.

Enable it in the [pgbouncer] section:

    rewrite_query_py_module_file = rewrite_query.py

geobouncer calls ``rewrite_query(username, query)``; a function taking a third
argument gets ``in_transaction`` as well.
"""

import re


def _statement(text):
    """A regex matching ``text`` whatever its spacing, case and trailing ``;``."""
    tokens = re.findall(r"\w+|[^\w\s]", text)
    pattern = ""
    for before, token in zip([None, *tokens], tokens):
        if before is not None:
            both_words = before[-1].isalnum() and token[0].isalnum()
            pattern += r"\s+" if both_words else r"\s*"
        pattern += re.escape(token)
    return re.compile(rf"\s*{pattern}\s*;?\s*\Z", re.IGNORECASE)


STORE_REPORT = (
    "SELECT storename, SUM(total) FROM sales JOIN store USING (storeid) "
    "GROUP BY storename ORDER BY storename"
)
STORE_REPORT_FAST = (
    "SELECT storename, SUM(total) FROM store_sales "
    "GROUP BY storename ORDER BY storename"
)
PRODUCT_REPORT = (
    "SELECT prodname, SUM(total) FROM sales JOIN product USING (productid) "
    "GROUP BY prodname ORDER BY prodname"
)
PRODUCT_REPORT_FAST = (
    "SELECT prodname, SUM(total) FROM product_sales GROUP BY prodname ORDER BY prodname"
)

# (query the clients send, query to run instead)
REWRITES = (
    (STORE_REPORT, STORE_REPORT_FAST),
    (PRODUCT_REPORT, PRODUCT_REPORT_FAST),
)

_RULES = tuple((_statement(original), better) for original, better in REWRITES)


def rewrite_query(username, query):
    """The query to send instead of ``query``: a pre-aggregated table when one fits."""
    for pattern, better in _RULES:
        if pattern.match(query):
            return better
    return query


if __name__ == "__main__":
    for original, _ in REWRITES:
        print(f"{original}\n  -> {rewrite_query('report', original)}")
