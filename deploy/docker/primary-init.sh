#!/bin/sh
# Run once by the postgres image's entrypoint when the primary's data directory
# is created: a role the replica streams with, and pg_hba.conf letting it in.
set -e
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD '$REPLICATION_PASSWORD';
SQL
echo "host replication replicator all scram-sha-256" >>"$PGDATA/pg_hba.conf"
