"""scripts/_bench_repeat.sh: the medians and paired ratios of scripts/bench
--repeat, run in bash (the functions are the script's own)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[2] / "scripts" / "_bench_repeat.sh"


def bash(script: str) -> str:
    """Run ``script`` after sourcing the library, with scripts/bench's result arrays declared."""
    prelude = f"set -euo pipefail; declare -A TPS LAT CPU; source {LIB}\n"
    done = subprocess.run(["bash", "-c", prelude + script], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("values, want", [
    ("3 1 2", "2"), ("1 2 3 4", "2.500"), ("10 9.5 100", "10"), ("7", "7"), ("2 10", "6.000")])
def test_median(values, want):
    assert bash(f"median {values}") == want


def test_median_of_nothing_fails():
    done = subprocess.run(["bash", "-c", f"source {LIB}; median"], capture_output=True, text=True)
    assert done.returncode != 0


def test_rounds_alternate_their_order():
    assert bash("repeat_order 1 a b c").split() == ["a", "b", "c"]
    assert bash("repeat_order 2 a b c").split() == ["c", "b", "a"]
    assert bash("repeat_order 3 a b c").split() == ["a", "b", "c"]


def test_fold_takes_medians_and_paired_ratios():
    """Round 2 is a slow phase for both targets: the ratio within each round
    stays near 2, though the median CPU of one over the other's would not be
    computed from the same rounds; a round where a target failed is left out."""
    out = bash("""
        rec() { TPS[$1]=$2 LAT[$1]=$3 CPU[$1]=$4; repeat_keep "$1" "$5"; }
        rec s/10/pgb 1000 1.0 20 1; rec s/10/geo 700 1.4 40 1
        rec s/10/pgb 500 2.0 40 2;  rec s/10/geo 330 3.0 84 2
        rec s/10/pgb 990 1.0 21 3;  rec s/10/geo 710 1.4 40 3
        repeat_keep s/10/geo 4      # round 4: geo failed (run_pgbench left nothing)
        [[ -z ${TPS[s/10/geo]:-} ]] || exit 3   # moved away from the report's keys
        repeat_fold s 10 pgb 4 pgb geo
        echo "${TPS[s/10/geo]} ${LAT[s/10/geo]} ${CPU[s/10/geo]}"
        echo "${RATIO_CPU[s/10/geo]}"
        echo "${RATIO_TPS[s/10/geo]}"
        echo "${RATIO_CPU[s/10/pgb]}"
    """).splitlines()
    assert out[0] == "700 1.4 40.0"
    assert out[1] == "2.00 (1.90-2.10)"
    assert out[2] == "0.70 (0.66-0.72)"
    assert out[3] == "1.00 (1.00-1.00)"
