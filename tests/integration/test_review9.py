

def _psycopg3_bad_copy(dsn: str, i: int) -> str:
    import psycopg
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            with conn.cursor() as cur, cur.copy("COPY r9_nth (id, t) FROM STDIN") as copy:
                for n in range(1, 200):
                    copy.write_row((n, f"c{i}"))     # row 3 is refused by the trigger
        except psycopg.errors.RaiseException as exc:
            assert "row three" in str(exc)
        else:
            raise AssertionError("the COPY did not fail")
        with conn.cursor() as cur:
            cur.execute("SELECT %s::int", (i,))
            assert cur.fetchone() == (i,)
        with conn.transaction():     # BEGIN ... COPY fails ... ROLLBACK
            try:
                with conn.transaction(), conn.cursor() as cur, cur.copy("COPY r9_copy FROM STDIN") as copy:
                    copy.write(b"1\tok\nnot a number\tx\n" + b"2\tok\n" * 5000)
            except psycopg.errors.InvalidTextRepresentation:
                pass
            else:
                raise AssertionError("the COPY did not fail")
        with conn.cursor() as cur:
            cur.execute("SELECT %s::text", (f"after{i}",))
            assert cur.fetchone() == (f"after{i}",)
    return "ok"


def _psycopg2_bad_copy(b, i: int) -> str:
    import io

    import psycopg2
    conn = b.connect(autocommit=True)
    try:
        with conn.cursor() as cur:
            try:
                cur.copy_expert("COPY r9_copy FROM STDIN", io.StringIO("1\tok\n" * 3000 + "bad\trow\n" + "2\tx\n" * 3000))
            except psycopg2.errors.InvalidTextRepresentation:
                pass
            else:
                raise AssertionError("the COPY did not fail")
            cur.execute("SELECT %s", (f"p2-{i}",))
            assert cur.fetchone() == (f"p2-{i}",)
        conn.autocommit = False
        with conn.cursor() as cur:
            try:
                cur.copy_expert("COPY r9_nth FROM STDIN", io.StringIO("".join(f"{n}\tx\n" for n in range(1, 50))))
            except psycopg2.errors.RaiseException:
                conn.rollback()
            else:
                raise AssertionError("the COPY did not fail")
            cur.execute("SELECT %s", (f"p2tx-{i}",))
            assert cur.fetchone() == (f"p2tx-{i}",)
            conn.commit()
    finally:
        conn.close()
    return "ok"


def _good_client(b, i: int, rounds: int) -> str:
    import io
    conn = b.connect(autocommit=True)
    try:
        with conn.cursor() as cur:
            for n in range(rounds):
                token = f"g{i}-{n}"
                cur.execute("SELECT %s, generate_series(1, 3)", (token,))
                assert cur.fetchall() == [(token, 1), (token, 2), (token, 3)]
                if n % 3 == 0:
                    conn.autocommit = False
                    cur.copy_expert("COPY r9_copy (id, t) FROM STDIN", io.StringIO(f"{n}\t{token}\n" * 10))
                    cur.execute("SELECT count(*) FROM r9_copy WHERE t = %s", (token,))
                    assert cur.fetchone() == (10,)
                    conn.rollback()
                    conn.autocommit = True
    finally:
        conn.close()
    return "ok"


@pytest.mark.timeout(150)
@pytest.mark.parametrize("pool_size", [1, 2])
def test_failing_copies_of_drivers_alongside_good_clients(pg, bouncer, pool_size):
    """psycopg 3 and psycopg2 COPYs failing (a trigger on the third row, a bad
    row in the middle of the data, autocommit and in a transaction) while
    other clients run queries and good COPYs: each gets its own errors and
    rows, and the pool ends with no server held or left over."""
    _setup_copy_tables(pg)
    b = bouncer(pgbouncer={"pool_mode": "transaction", "auth_type": "md5", "default_pool_size": pool_size,
                           "query_wait_timeout": 60})
    from _util_pool import run_in_thread
    jobs = []
    for i in range(3):
        jobs.append(run_in_thread(_psycopg3_bad_copy, b.dsn(), i))
        jobs.append(run_in_thread(_psycopg2_bad_copy, b, i))
    jobs += [run_in_thread(_good_client, b, i, 12) for i in range(3)]
    for job in jobs:
        assert job.get(120) == "ok"
    time.sleep(0.3)
    assert another_client_gets(b, "SELECT 'served', txid_current_if_assigned()") == ("served", None)
    _servers_match_backends(pg, b)
    servers = [r for r in b.admin("SHOW SERVERS") if r.database == "app"]
    assert all(r.state == "idle" for r in servers), servers
    finish(b)
