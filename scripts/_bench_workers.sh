# shellcheck shell=bash
# scripts/bench's pooler processes (sourced by scripts/bench, after _pglib.sh):
# which pid is the pooler, the CPU its processes use, and the --workers mode.
#
# --workers N: geobouncer with `workers = 1` (one process) and `workers = N` (a
# supervisor and N worker processes on the supervisor's listening sockets, each
# with default_pool_size / N) beside PgBouncer, targets geobouncer-w1 and
# geobouncer-wN. A geobouncer-wN run starts measuring once every worker answers
# SHOW WORKER on its private socket (a worker importing Python would otherwise
# count), and ends with each worker's SHOW STATS total_xact_count: the proof
# that all of them served, printed under the table.

# proc_ticks PID: utime+stime+cutime+cstime of PID, in clock ticks: its own
# CPU and that of the children it has reaped (a worker that exited during the
# run is in its supervisor's cutime). Field 2 (comm) is in parentheses and may
# itself hold spaces or ")", so cut up to the last ") " before splitting; what
# is left starts at field 3 (state), which puts utime (field 14) at index 11.
proc_ticks() {
    local stat fields
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1 # gone: no figure
    stat=${stat##*) }
    read -r -a fields <<<"$stat"
    echo $((fields[11] + fields[12] + fields[13] + fields[14]))
}

# cpu_ticks PID: the CPU of the pooler PID and of every process under it, in
# clock ticks. One process for PgBouncer and for geobouncer with workers = 1;
# with workers = N the supervisor and its workers (found by parent pid), so that
# the difference of two readings is what all of them used in between, a worker
# that exited (reaped: in the supervisor's cutime) or was started again included.
cpu_ticks() {
    local total child ticks
    total=$(proc_ticks "$1") || return 1
    for child in $(pgrep -P "$1"); do
        if ticks=$(cpu_ticks "$child"); then total=$((total + ticks)); fi
    done
    echo "$total"
}

# pooler_pid LAUNCHED DIR NAME: the pid of the process that does the pooling.
# What we launched is not always it: PgBouncer started through runuser (root)
# is runuser's child. Prefer the pidfile the pooler writes itself (geobouncer's
# supervisor writes it with workers = N), then the launched pid if it already
# is NAME, then a child of it named NAME.
pooler_pid() {
    local launched=$1 dir=$2 name=$3 pid
    if [[ -s $dir/bouncer.pid ]]; then
        pid=$(tr -dc 0-9 <"$dir/bouncer.pid")
        if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; return 0; fi
    fi
    if [[ $(cat "/proc/$launched/comm" 2>/dev/null) == "$name" ]]; then echo "$launched"; return 0; fi
    pgrep -P "$launched" -x "$name" | head -n 1 | grep . # fails when there is none
}

# workers_of TARGET: N for geobouncer-wN, nothing for any other target.
workers_of() { if [[ $1 =~ ^geobouncer-w([0-9]+)$ ]]; then echo "${BASH_REMATCH[1]}"; fi; }

# workers_ini TARGET: the ini line a geobouncer-wN target adds.
workers_ini() { local n; n=$(workers_of "$1"); if [[ -n $n ]]; then echo "workers = $n"; fi; }

# worker_admin DIR PORT INDEX SQL: SQL on worker INDEX's own admin console, over
# its private unix socket (DIR/geobouncer-workers-*/w<INDEX>, made by the
# supervisor), as the pooler's OS user logging in as pgbouncer.
worker_admin() {
    local sock
    for sock in "$1"/geobouncer-workers-*/"w$3"; do
        psql -X -q -A -F ' ' -h "$sock" -p "$2" -U pgbouncer -d pgbouncer -c "$4" 2>/dev/null
        return
    done
}

# workers_ready TARGET DIR PORT: wait (up to 30 s) until every worker of a
# geobouncer-wN target answers on its console; no-op for other targets.
workers_ready() {
    local n i tries
    n=$(workers_of "$1")
    [[ -n $n && $n -gt 1 ]] || return 0
    for ((i = 1; i <= n; i++)); do
        for ((tries = 0; tries < 300; tries++)); do
            if worker_admin "$2" "$3" "$i" "SHOW WORKER" >/dev/null; then break; fi
            sleep 0.1
        done
        ((tries < 300)) || { echo "--- $1: worker $i did not answer within 30 s ---" >&2; return 1; }
    done
}

# Per-run "worker i: N xacts (P%), ..." of geobouncer-wN targets, keyed as TPS.
declare -A SPLIT

# workers_split KEY TARGET DIR PORT: after a run, how many transactions each
# worker served (its SHOW STATS total_xact_count on bench), into SPLIT[KEY].
workers_split() {
    local key=$1 n i xacts all=() sum=0 line=""
    n=$(workers_of "$2")
    [[ -n $n && $n -gt 1 ]] || return 0
    for ((i = 1; i <= n; i++)); do
        xacts=$(worker_admin "$3" "$4" "$i" "SHOW STATS" | awk '
            NR == 1 { for (c = 1; c <= NF; c++) if ($c == "total_xact_count") col = c; next }
            $1 == "bench" && col { print $col; exit }')
        all+=("${xacts:-0}")
        sum=$((sum + ${xacts:-0}))
    done
    for ((i = 1; i <= n; i++)); do
        line+="${line:+, }worker $i: ${all[i - 1]} xacts ($(awk -v a="${all[i - 1]}" -v s="$sum" \
            'BEGIN { printf "%.0f", (s > 0 ? 100 * a / s : 0) }')%)"
        if ((all[i - 1] == 0)); then line+=" (SERVED NOTHING)"; fi
    done
    # pgbench's count beside it: the workers' sum is 2 more, pgbench's own
    # look-ups of the scale and the partitioning of pgbench_accounts at start.
    SPLIT[$key]="$line; sum $sum, pgbench $(awk -F': *' '/^number of transactions actually processed/ {
        print $2; exit }' "$WORK/${key//\//-}.out")"
}

# workers_report: under the table, for every geobouncer-w* run, how many cores
# the pooler kept busy (tps x CPU/tx: below 1 with workers = 1 means one process
# was not the limit) and the SPLIT line.
workers_report() {
    local key busy
    for key in "${!TPS[@]}"; do
        [[ $key == */geobouncer-w* ]] || continue
        busy=$(awk -v t="${TPS[$key]}" -v c="${CPU[$key]:-0}" 'BEGIN { printf "%.2f", t * c / 1e6 }')
        echo "workers: $key: pooler busy ~$busy cores${SPLIT[$key]:+; ${SPLIT[$key]}}"
    done | sort | sed '1s/^/\n/'
}
