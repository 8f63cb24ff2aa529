# shellcheck shell=bash
# scripts/bench --sharded (sourced by scripts/bench, after _pglib.sh): a keyed
# lookup on users(id) through a sharded entry, app = shards=app_0,app_1,app_2
# (three databases of the bench cluster), against the same lookup through a
# plain entry on an unsharded copy of the table (database plain). The rows go
# into the shards through the sharded entry (COPY, split per shard by the
# pooler), into plain directly; sharded_check then compares where each row
# landed with PostgreSQL's own PARTITION BY HASH (id) with modulus 3.

SHARD_DBS=(app_0 app_1 app_2)
USERS_DDL="CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, balance int NOT NULL)"

# bench_sql DB SQL: run SQL as bench straight on the cluster, unaligned output.
bench_sql() {
    PGPASSWORD=bench psql -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U bench -d "$1" -c "$2"
}

# users_rows: ROWS rows of users as COPY text, ids 1..ROWS.
users_rows() {
    awk -v n="$ROWS" 'BEGIN { for (i = 1; i <= n; i++) printf "%d\tuser %d\t%d\n", i, i, (i * 7919) % 10000 }'
}

# The [databases] entries of the sharded bench.
sharded_ini_databases() {
    local db
    for db in "${SHARD_DBS[@]}" plain; do echo "$db = host=127.0.0.1 port=$PG_PORT dbname=$db"; done
    echo "app = shards=$(IFS=,; echo "${SHARD_DBS[*]}")"
}

sharded_ini_tables() {
    printf '\n[sharded_tables]\nusers = database=app column=id type=bigint\n'
}

# bench_db TARGET: the database pgbench runs on, through TARGET or directly.
bench_db() {
    if [[ $SHARDED != 1 ]]; then echo bench
    elif [[ $1 == sharded ]]; then echo app
    else echo plain; fi
}

# The pgbench script: one keyed lookup per transaction.
sharded_script() {
    printf '\\set id random(1, %d)\nSELECT id, name, balance FROM users WHERE id = :id;\n' "$ROWS" >"$WORK/keyed-lookup.sql"
    echo "$WORK/keyed-lookup.sql"
}

# sharded_setup: the databases and tables; plain loaded directly, the shards
# through a geobouncer started for the purpose.
sharded_setup() {
    local db dir="$WORK/load" port pid
    for db in "${SHARD_DBS[@]}" plain; do
        gb_psql "$PG_PORT" postgres "CREATE DATABASE $db OWNER bench"
        bench_sql "$db" "$USERS_DDL"
    done
    gb_log "users: $ROWS rows into plain (directly) and into app_0..2 (COPY through the sharded entry)"
    users_rows | PGPASSWORD=bench psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U bench -d plain \
        -c "COPY users FROM STDIN" >/dev/null
    # shellcheck disable=SC2119
    port=$(gb_free_port)
    write_ini "$dir" "$port"
    (cd "$GB_ROOT" && exec "$PYTHON" -m geobouncer -c "$dir/bouncer.ini") >"$dir/stdout.log" 2>&1 &
    pid=$!
    POOLER_PIDS=("$pid")
    gb_wait_tcp "$port" 15 "$pid" || { tail -n 20 "$dir/stdout.log" >&2; gb_die "geobouncer (loading) did not start"; }
    users_rows | PGPASSWORD=bench psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U bench -d app \
        -c "COPY users FROM STDIN" >/dev/null || { tail -n 20 "$dir/bouncer.log" >&2; gb_die "COPY through the sharded entry failed"; }
    gb_stop_pid "$pid" 10
    POOLER_PIDS=()
    sharded_check
    bench_sql plain "ANALYZE users"
    for db in "${SHARD_DBS[@]}"; do bench_sql "$db" "ANALYZE users"; done
}

# sharded_check: each shard holds exactly the rows PARTITION BY HASH puts in its
# remainder (count and sum of ids per shard), and no more.
sharded_check() {
    local r want got
    bench_sql plain "CREATE TABLE users_part (id bigint) PARTITION BY HASH (id)"
    for r in 0 1 2; do
        bench_sql plain "CREATE TABLE users_part_$r PARTITION OF users_part FOR VALUES WITH (MODULUS 3, REMAINDER $r)"
    done
    bench_sql plain "INSERT INTO users_part SELECT id FROM users"
    for r in 0 1 2; do
        want=$(bench_sql plain "SELECT count(*) || ' rows, sum ' || coalesce(sum(id), 0) FROM users_part_$r")
        got=$(bench_sql "${SHARD_DBS[$r]}" "SELECT count(*) || ' rows, sum ' || coalesce(sum(id), 0) FROM users")
        [[ $want == "$got" ]] || gb_die "${SHARD_DBS[$r]} holds $got; PARTITION BY HASH remainder $r: $want"
        gb_log "${SHARD_DBS[$r]}: $got (as PARTITION BY HASH (id) remainder $r)"
    done
    bench_sql plain "DROP TABLE users_part"
}
