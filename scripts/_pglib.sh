# shellcheck shell=bash
# Shared by scripts/test, scripts/demo and scripts/bench (sourced, not run):
# installing what is missing, and throw-away PostgreSQL servers on 127.0.0.1.
#
# PostgreSQL refuses to run as root, so as root every server binary runs as the
# `postgres` OS user (gb_as_pg) in directories chowned to it (gb_pg_dir).

GB_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# PYTHON: the interpreter that builds the project's virtual environment (default:
# python3 on PATH, which may be the distribution's externally managed one);
# gb_ensure_python_deps then points PYTHON at the environment's interpreter.
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
# The project's virtual environment: nothing is ever pip-installed elsewhere.
GB_VENV="${GEOBOUNCER_VENV:-$GB_ROOT/.venv}"
GB_MIN_PYTHON=3.11
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
_GB_APT_UPDATED=0

gb_log() { printf '==> %s\n' "$*" >&2; }
gb_die() { printf 'error: %s\n' "$*" >&2; exit 1; }
gb_is_root() { [[ $(id -u) -eq 0 ]]; }

# Run a command as root: directly, or through sudo for a normal user.
gb_privileged() {
    if gb_is_root; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else gb_die "need root (or sudo) to run: $*"
    fi
}

gb_apt_install() {
    command -v apt-get >/dev/null || gb_die "apt-get not found; install manually: $*"
    if [[ $_GB_APT_UPDATED -eq 0 ]]; then
        gb_log "apt-get update"
        gb_privileged env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        _GB_APT_UPDATED=1
    fi
    gb_log "apt-get install $*"
    gb_privileged env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# gb_python_ok PY: PY runs and is at least GB_MIN_PYTHON.
gb_python_ok() {
    [[ -n $1 ]] && "$1" -c 'import sys; sys.exit(sys.version_info < tuple(map(int, sys.argv[1].split("."))))' \
        "$GB_MIN_PYTHON" 2>/dev/null
}

# The interpreter to build .venv with: $PYTHON if it is recent enough, else the
# newest python3.N on PATH that is.
gb_base_python() {
    local candidate
    for candidate in "$PYTHON" python3 python3.14 python3.13 python3.12 python3.11; do
        candidate=$(command -v "$candidate" 2>/dev/null) || continue
        if gb_python_ok "$candidate"; then echo "$candidate"; return 0; fi
    done
    gb_die "Python >= $GB_MIN_PYTHON not found (PYTHON=${PYTHON:-unset}); install python3 (>= $GB_MIN_PYTHON)"
}

# Create $GB_VENV when it is missing or broken (its interpreter gone or too old),
# then point PYTHON at it. Debian's python3 has no ensurepip without the
# python3-venv package: it is installed when `-m venv` fails for that reason.
gb_ensure_venv() {
    if gb_python_ok "$GB_VENV/bin/python" && "$GB_VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        PYTHON="$GB_VENV/bin/python"; export PYTHON; return 0
    fi
    local base version
    base=$(gb_base_python)
    version=$("$base" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    rm -rf "$GB_VENV"
    gb_log "creating ${GB_VENV#"$GB_ROOT"/} with $base (Python $version)"
    if ! "$base" -c 'import ensurepip' 2>/dev/null; then
        # Debian/Ubuntu: no venv with pip until python3-venv (python3.N-venv) is installed.
        gb_log "$base has no ensurepip: installing its venv package"
        gb_apt_install "python$version-venv" 2>/dev/null || gb_apt_install python3-venv
    fi
    if ! "$base" -m venv "$GB_VENV"; then
        rm -rf "$GB_VENV"
        gb_die "$base -m venv $GB_VENV failed"
    fi
    PYTHON="$GB_VENV/bin/python"
    export PYTHON
}

# The project's virtual environment with requirements.txt (pinned: runtime and
# test dependencies) and the package itself in editable mode. Skipped when the
# environment was filled from the same requirements.txt and setup.py and
# `import geobouncer` finds this checkout. GEOBOUNCER_NO_INSTALL=1: use $PYTHON as it is.
gb_ensure_python_deps() {
    if [[ ${GEOBOUNCER_NO_INSTALL:-} == 1 ]]; then
        # The caller vouches for $PYTHON (the test suite running scripts/demo).
        gb_python_ok "$PYTHON" || gb_die "GEOBOUNCER_NO_INSTALL=1 needs PYTHON >= $GB_MIN_PYTHON"
        export PYTHON; return 0
    fi
    gb_ensure_venv
    local stamp="$GB_VENV/.geobouncer-deps" want
    want=$(cat "$GB_ROOT/requirements.txt" "$GB_ROOT/setup.py" | cksum)
    if [[ -f $stamp && $(cat "$stamp") == "$want" ]] \
            && (cd / && "$PYTHON" -c 'import sys, geobouncer; sys.exit(not geobouncer.__file__.startswith(sys.argv[1]))' \
                "$GB_ROOT/") 2>/dev/null; then
        return 0
    fi
    gb_log "pip install -r requirements.txt (into ${GB_VENV#"$GB_ROOT"/})"
    "$PYTHON" -m pip install -q -r "$GB_ROOT/requirements.txt"
    gb_log "pip install -e $GB_ROOT (into ${GB_VENV#"$GB_ROOT"/})"
    "$PYTHON" -m pip install -q --no-deps -e "$GB_ROOT"
    echo "$want" >"$stamp"
}

# The PostgreSQL server bin dir: $GEOBOUNCER_PG_BINDIR, the highest
# /usr/lib/postgresql/*/bin, or `pg_config --bindir`. Fails if none has initdb.
gb_pg_bindir() {
    if [[ -n ${GEOBOUNCER_PG_BINDIR:-} ]]; then echo "$GEOBOUNCER_PG_BINDIR"; return 0; fi
    local found=() dir
    for dir in /usr/lib/postgresql/*/bin; do
        if [[ -x $dir/initdb ]]; then found+=("$dir"); fi
    done
    if ((${#found[@]})); then printf '%s\n' "${found[@]}" | sort -V | tail -n 1; return 0; fi
    if command -v pg_config >/dev/null && [[ -x "$(pg_config --bindir)/initdb" ]]; then
        pg_config --bindir; return 0
    fi
    return 1
}

# Server binaries (initdb, pg_ctl, postgres, pg_basebackup, pgbench), psql, and
# the postgres OS user the servers run as when we are root.
gb_ensure_postgres() {
    if ! gb_pg_bindir >/dev/null; then gb_apt_install postgresql postgresql-client; fi
    if ! command -v psql >/dev/null; then gb_apt_install postgresql-client; fi
    if ! command -v pgbench >/dev/null && [[ ! -x "$(gb_pg_bindir)/pgbench" ]]; then
        gb_apt_install postgresql postgresql-client
    fi
    if gb_is_root && ! id postgres >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/postgresql --shell /bin/sh postgres
    fi
    PG_BIN="$(gb_pg_bindir)" || gb_die "PostgreSQL server binaries not found after install"
    export PG_BIN
}

gb_ensure_pgbouncer() {
    if ! command -v pgbouncer >/dev/null && [[ ! -x /usr/sbin/pgbouncer ]]; then gb_apt_install pgbouncer; fi
    PGBOUNCER_BIN="$(command -v pgbouncer || echo /usr/sbin/pgbouncer)"
    export PGBOUNCER_BIN
}

gb_pgbench() {
    if command -v pgbench >/dev/null; then pgbench "$@"; else "$PG_BIN/pgbench" "$@"; fi
}

# Run a PostgreSQL binary as the postgres OS user when root; from a directory it can enter.
gb_as_pg() {
    if gb_is_root; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

# mkdir -p and hand the directory to the postgres OS user when root.
gb_pg_dir() {
    mkdir -p "$1"
    if gb_is_root; then chown postgres:postgres "$1"; fi
}

# A free TCP port on 127.0.0.1; $1, if given, is preferred when it is free.
gb_free_port() {
    "$PYTHON" - "${1:-0}" <<'PY'
import socket, sys
def free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return None
        return s.getsockname()[1]
print(free(int(sys.argv[1])) or free(0))
PY
}

# gb_low_free_port START: the first free TCP port from START on, below the
# ephemeral range (32768-) that outgoing connections take theirs from.
gb_low_free_port() {
    local port=$1
    while ((port < 32768)); do
        if [[ $(gb_free_port "$port") == "$port" ]]; then echo "$port"; return 0; fi
        port=$((port + 1))
    done
    gb_free_port
}

# gb_pg_init DIR PORT [HBA_LINES]: initdb into DIR/data, server settings for
# throw-away use (no fsync, replication on, TCP on 127.0.0.1 only).
gb_pg_init() {
    local dir=$1 port=$2 hba=${3:-}
    gb_pg_dir "$dir"
    gb_as_pg "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-locale --no-sync >/dev/null
    gb_as_pg tee -a "$dir/data/postgresql.conf" >/dev/null <<EOF

# added by scripts/_pglib.sh
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = ''
max_connections = 200
shared_buffers = 128MB
fsync = off
synchronous_commit = off
full_page_writes = off
wal_level = replica
max_wal_senders = 5
wal_keep_size = '128MB'
hot_standby = on
log_line_prefix = '%m [%p] %q%u@%d '
EOF
    if [[ -n $hba ]]; then printf '%s\n' "$hba" | gb_as_pg tee "$dir/data/pg_hba.conf" >/dev/null; fi
}

# gb_pg_replica PRIMARY_PORT DIR PORT: pg_basebackup -R into DIR/data, on its own port.
gb_pg_replica() {
    local primary_port=$1 dir=$2 port=$3
    gb_pg_dir "$dir"
    gb_as_pg "$PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$primary_port" -U postgres -D "$dir/data" \
        -R -X stream -c fast --no-sync
    printf '\nport = %s\n' "$port" | gb_as_pg tee -a "$dir/data/postgresql.conf" >/dev/null
}

gb_pg_start() {
    local dir=$1
    if ! gb_as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/postgresql.log" -w -t 60 start >/dev/null; then
        tail -n 30 "$dir/postgresql.log" >&2 || true
        gb_die "PostgreSQL in $dir did not start"
    fi
}

# gb_pg_stop DIR [MODE]: stop if running (fast by default); SIGKILL as a last resort.
gb_pg_stop() {
    local dir=$1 mode=${2:-fast} pid
    [[ -f $dir/data/postmaster.pid ]] || return 0
    pid=$(head -n 1 "$dir/data/postmaster.pid" 2>/dev/null || true)
    if ! gb_as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -m "$mode" -w -t 30 stop >/dev/null 2>&1; then
        if [[ -n $pid ]]; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
}

# gb_psql PORT DBNAME SQL: run SQL as postgres over TCP (trust), unaligned output.
gb_psql() {
    psql -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$1" -U postgres -d "$2" -c "$3"
}

# gb_wait_tcp PORT SECONDS [PID]: wait until 127.0.0.1:PORT accepts; fails early if PID exits.
gb_wait_tcp() {
    local port=$1 seconds=$2 pid=${3:-} i
    for ((i = 0; i < seconds * 10; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
        sleep 0.1
    done
    return 1
}

# gb_stop_pid PID [SECONDS]: SIGTERM, then SIGKILL after SECONDS (default 10).
gb_stop_pid() {
    local pid=$1 seconds=${2:-10} i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < seconds * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
