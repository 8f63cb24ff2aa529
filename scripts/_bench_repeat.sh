# shellcheck shell=bash
# scripts/bench --repeat N (sourced by scripts/bench): every mode x clients
# cell runs its targets N times, in rounds, the order reversed every other
# round, and the table shows medians. On a shared or virtual machine one run
# can be 20-50% off the next (a neighbour's load comes and goes); a single
# run of each target then compares two different machines. Within a round the
# targets run back to back, so the ratio of two targets is taken per round and
# the table shows the median of those paired ratios, with their range.
#
# Results of round R are kept under "KEY#R" (KEY = mode/clients/target); after
# the rounds, repeat_fold writes the medians under KEY, where the report reads.

declare -A RUN_TPS RUN_LAT RUN_CPU RATIO_TPS RATIO_CPU

# median V...: the median of numbers (the mean of the middle two for an even count).
median() {
    (($#)) || return 1
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
        if (NR % 2) printf "%s", v[(NR + 1) / 2]; else printf "%.3f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# repeat_order ROUND TARGET...: the targets in round ROUND's order (reversed in even rounds).
repeat_order() {
    local round=$1 i
    shift
    if ((round % 2)); then printf '%s\n' "$@"
    else for ((i = $#; i >= 1; i--)); do printf '%s\n' "${!i}"; done; fi
}

# repeat_keep KEY ROUND: move one run's results (run_pgbench writes them under KEY) to KEY#ROUND.
repeat_keep() {
    local key=$1 round=$2
    if [[ -n ${TPS[$key]:-} ]]; then
        RUN_TPS[$key#$round]=${TPS[$key]}
        RUN_LAT[$key#$round]=${LAT[$key]:-}
        RUN_CPU[$key#$round]=${CPU[$key]:-}
    fi
    unset "TPS[$key]" "LAT[$key]" "CPU[$key]"
}

# repeat_fold MODE CLIENTS BASE ROUNDS TARGET...: the medians of every target's
# rounds under KEY, and the medians of its per-round ratios to BASE, with
# their range ("1.98 (1.91-2.07)"), for the report.
repeat_fold() {
    local mode=$1 clients=$2 base=$3 rounds=$4 target key b r tps lat cpu rt rc
    shift 4
    for target in "$@"; do
        key="$mode/$clients/$target" b="$mode/$clients/$base"
        tps=() lat=() cpu=() rt=() rc=()
        for ((r = 1; r <= rounds; r++)); do
            [[ -n ${RUN_TPS[$key#$r]:-} ]] || continue
            tps+=("${RUN_TPS[$key#$r]}") lat+=("${RUN_LAT[$key#$r]:-0}")
            if [[ -n ${RUN_CPU[$key#$r]:-} ]]; then cpu+=("${RUN_CPU[$key#$r]}"); fi
            if [[ -n ${RUN_TPS[$b#$r]:-} ]]; then
                rt+=("$(awk -v a="${RUN_TPS[$key#$r]}" -v b="${RUN_TPS[$b#$r]}" 'BEGIN { printf "%.3f", (b > 0 ? a / b : 0) }')")
                if [[ -n ${RUN_CPU[$key#$r]:-} && -n ${RUN_CPU[$b#$r]:-} ]]; then
                    rc+=("$(awk -v a="${RUN_CPU[$key#$r]}" -v b="${RUN_CPU[$b#$r]}" 'BEGIN { printf "%.3f", (b > 0 ? a / b : 0) }')")
                fi
            fi
        done
        ((${#tps[@]})) || continue          # failed in every round: the report says "fails"
        TPS[$key]=$(median "${tps[@]}")
        LAT[$key]=$(median "${lat[@]}")
        if ((${#cpu[@]})); then CPU[$key]=$(printf '%.1f' "$(median "${cpu[@]}")"); fi
        if ((${#rt[@]})); then RATIO_TPS[$key]=$(spread "${rt[@]}"); fi
        if ((${#rc[@]})); then RATIO_CPU[$key]=$(spread "${rc[@]}"); fi
    done
}

# spread V...: "median (min-max)" with two decimals; just the value for one.
spread() {
    local sorted
    if (($# == 1)); then printf '%.2f' "$1"; return; fi
    read -r -a sorted <<<"$(printf '%s\n' "$@" | sort -g | tr '\n' ' ')"
    printf '%.2f (%.2f-%.2f)' "$(median "$@")" "${sorted[0]}" "${sorted[${#sorted[@]} - 1]}"
}
