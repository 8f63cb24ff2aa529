# shellcheck shell=bash
# scripts/demo --sharded (sourced by scripts/demo): three shards, the databases
# demo_0, demo_1 and demo_2 of one PostgreSQL (servers of their own in
# production: only the [databases] lines change), behind the sharded entry
# demo = shards=demo_0,demo_1,demo_2. users is sharded by id, payments by
# user_id, so a user's payments live on the user's shard. The tables are created
# and the rows written through geobouncer; the tour then asks it.

SHARD_DBS=(demo_0 demo_1 demo_2)
USER_NAMES=(ada grace alan edsger barbara donald frances ken margaret dennis radia john)

# direct_q DB PSQL-ARGS...: as demo, straight to one shard's database, not through geobouncer.
direct_q() {
    local db=$1; shift
    PGPASSWORD=demo psql -X -q -A -t -F ' | ' -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$SHARDS_PORT" -U demo -d "$db" "$@"
}

sharded_setup() {
    local db
    SHARDS_PORT=$(gb_low_free_port $((7000 + RANDOM % 1900)))
    gb_log "PostgreSQL with the shards ${SHARD_DBS[*]} on 127.0.0.1:$SHARDS_PORT"
    demo_server shards "$SHARDS_PORT"
    for db in "${SHARD_DBS[@]}"; do gb_psql "$SHARDS_PORT" postgres "CREATE DATABASE $db OWNER demo"; done
    cat >"$DEMO/state" <<EOF
LISTEN_PORT=$LISTEN_PORT SHARDS_PORT=$SHARDS_PORT
PGROOT=$PGROOT PG_BIN=$PG_BIN
EOF
}

sharded_ini_databases() {
    local db
    echo ";; Three shards: ordinary entries (each may have replicas=, a topology_query ...)."
    for db in "${SHARD_DBS[@]}"; do echo "$db = host=127.0.0.1 port=$SHARDS_PORT dbname=$db"; done
    echo ";; The sharded database: one logical database over them, in shard order."
    echo "demo = shards=$(IFS=,; echo "${SHARD_DBS[*]}")"
}

sharded_ini_rest() {
    cat <<EOF

[sharded_tables]
;; PostgreSQL's PARTITION BY HASH (key) with modulus 3 says which shard a row is on.
users    = database=demo column=id type=bigint
payments = database=demo column=user_id type=bigint
EOF
}

# The rows, written through geobouncer: DDL goes to every shard, a multi-row
# INSERT is split per shard by its keys.
sharded_rows() {
    local i values=()
    for i in "${!USER_NAMES[@]}"; do values+=("($((i + 1)), '${USER_NAMES[$i]}')"); done
    q -c "CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL)" \
      -c "CREATE TABLE payments (id bigint PRIMARY KEY, user_id bigint NOT NULL, amount numeric(10,2) NOT NULL)" \
      -c "INSERT INTO users (id, name) VALUES $(IFS=,; echo "${values[*]}")" >/dev/null
    values=()
    for ((i = 1; i <= PAYMENTS; i++)); do
        values+=("($i, $(((i * 5) % ${#USER_NAMES[@]} + 1)), $(((i * 37) % 90 + 10)).$(((i * 13) % 100)))")
    done
    q -c "INSERT INTO payments (id, user_id, amount) VALUES $(IFS=,; echo "${values[*]}")" >/dev/null
}
PAYMENTS=30

# show_refused LABEL SQL: like show, for a statement geobouncer answers with an error.
show_refused() {
    printf '  %s\n    psql "%s dbname=demo" -c "%s"\n' "$1" "$GB" "$2"
    { q -c "$2" 2>&1 || true; } | sed 's/^psql:[^:]*:[0-9]*: //; s/^/      => /'
}

sharded_tour() {
    local db
    sharded_rows
    cat <<EOF

geobouncer demo: one database, demo, sharded over three PostgreSQL databases.

  shards     ${SHARD_DBS[*]}: databases of one PostgreSQL on 127.0.0.1:$SHARDS_PORT (data in $PGROOT)
  geobouncer 127.0.0.1:$LISTEN_PORT   config ${DEMO#"$GB_ROOT"/}/geobouncer.ini   log ${DEMO#"$GB_ROOT"/}/geobouncer.log

  psql "$GB dbname=demo"
  psql "$GB dbname=pgbouncer"     (the admin console)

1. Written through geobouncer: CREATE TABLE users / payments (DDL: every shard),
   then one INSERT of ${#USER_NAMES[@]} users and one of $PAYMENTS payments, each split by key
   (users.id, payments.user_id). Where the rows are (the user ids, the number of
   payments), asked of each shard directly:
EOF
    local where="select string_agg(id::text, ' ' order by id), (select count(*) from payments) from users"
    for db in "${SHARD_DBS[@]}"; do
        printf '  %s:\n    psql "host=127.0.0.1 port=%s user=demo password=demo dbname=%s" -c "%s"\n' \
            "$db" "$SHARDS_PORT" "$db" "$where"
        direct_q "$db" -c "$where" | sed 's/^/      => /'
    done
    cat <<EOF

2. A keyed lookup goes to the one shard that holds the key; a user's payments are
   on the user's shard (current_database() says which shard answered):
EOF
    show "user 7:" -c "select current_database(), id, name from users where id = 7"
    show "user 7's payments:" -c "select current_database(), count(*), sum(amount) from payments where user_id = 7"
    show "user 8:" -c "select current_database(), id, name from users where id = 8"
    cat <<EOF

3. A query without a key goes to every shard, and geobouncer merges the answers:
   counts summed, ORDER BY merged, LIMIT applied after the merge, GROUP BY
   regrouped. What it cannot merge correctly it refuses rather than answer wrong:
EOF
    show "count across shards:" -c "select count(*) from users"
    show "rows per shard (GROUP BY):" -c "select current_database(), count(*) from users group by 1 order by 1"
    show "ORDER BY ... LIMIT:" -c "select id, name from users order by name limit 4"
    show "totals per user (GROUP BY, ORDER BY):" \
        -c "select user_id, count(*), sum(amount) from payments group by user_id order by user_id limit 3"
    show_refused "refused (string_agg cannot be merged):" "select string_agg(name, ',') from users"
    cat <<EOF

4. The admin console: each shard, its entry and state, and the sharding counters
   (queries, single-shard, multi-shard, two-phase commits, recovered):
EOF
    DB=pgbouncer show "SHOW SHARDS:" -c "SHOW SHARDS"
    cat <<EOF

Ctrl-C stops geobouncer and PostgreSQL and removes ${DEMO#"$GB_ROOT"/}/.
EOF
}
