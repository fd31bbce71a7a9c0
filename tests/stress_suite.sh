#!/usr/bin/env bash
# Run the test suite several times while the machine's cores are busy, and list every test that
# ever failed: a test that depends on timing fails here long before it fails in CI.
#
#   tests/stress_suite.sh [-n RUNS] [-c HOGS] [-k] [-- DENO_TEST_ARGS...]
#
#   -n RUNS   how many runs (default 5)
#   -c HOGS   CPU hogs beside the suite (default: one per core, `stress-ng --cpu HOGS`; 0 = none)
#   -k        keep each run's log (printed at the end), even when every run passed
#   -- ARGS   instead of `deno task test`, run `deno test ARGS` (e.g. -- -A tests/cli/)
#
# The hogs are `stress-ng --cpu N` (Debian's stress-ng), or, without it, N busy shell loops.
# Prints one line per run (passed, failed, time), then each failing test with the runs it failed
# in, and exits 1 when any run failed. Environment (VSTOR_REQUIRE_QEMU=1 and the like) is passed
# through, so `VSTOR_REQUIRE_QEMU=1 tests/stress_suite.sh` runs the interop tests too.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
runs=5
hogs=$(nproc 2>/dev/null || echo 2)
keep=0
while getopts "n:c:k" opt; do
    case $opt in
        n) runs=$OPTARG ;;
        c) hogs=$OPTARG ;;
        k) keep=1 ;;
        *) sed -n '5,10p' "$0" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift
case $runs in '' | *[!0-9]*) echo "stress_suite: -n needs a number" >&2; exit 2 ;; esac
case $hogs in '' | *[!0-9]*) echo "stress_suite: -c needs a number" >&2; exit 2 ;; esac

logs=$(mktemp -d /tmp/vstor-stress.XXXXXX)
hog_pids=()
stop_hogs() {
    for pid in "${hog_pids[@]}"; do kill "$pid" 2>/dev/null; done
    wait "${hog_pids[@]}" 2>/dev/null
    hog_pids=()
}
trap 'stop_hogs; exit 130' INT TERM
trap stop_hogs EXIT

if [ "$hogs" -gt 0 ]; then
    if command -v stress-ng >/dev/null 2>&1; then
        stress-ng --cpu "$hogs" --quiet &
        hog_pids+=($!)
    else
        for _ in $(seq "$hogs"); do
            bash -c 'while :; do :; done' &
            hog_pids+=($!)
        done
    fi
    echo "stress_suite: $hogs CPU hog(s) running ($(command -v stress-ng >/dev/null && echo stress-ng || echo shell loops)), $(nproc) cores"
fi

cd "$repo" || exit 1
declare -A failed_in
any=0
for i in $(seq "$runs"); do
    log="$logs/run$i.log"
    start=$(date +%s)
    if [ $# -gt 0 ]; then
        deno test "$@" >"$log" 2>&1
    else
        deno task test >"$log" 2>&1
    fi
    code=$?
    secs=$(($(date +%s) - start))
    plain=$(sed 's/\x1b\[[0-9;]*m//g' "$log")
    summary=$(echo "$plain" | grep -E '^(ok|FAILED) \| [0-9]+ passed' | tail -n1)
    passed=$(echo "$summary" | sed -nE 's/.*\| ([0-9]+) passed.*/\1/p')
    failed=$(echo "$summary" | sed -nE 's/.*\| ([0-9]+) failed.*/\1/p')
    echo "run $i: ${passed:-?} passed, ${failed:-?} failed, exit $code, ${secs}s"
    # Deno lists failures after a " FAILURES " line as "NAME => ./FILE:LINE:COL".
    names=$(echo "$plain" | sed -n '/^ FAILURES *$/,/^\(ok\|FAILED\) |/p' | grep ' => ' || true)
    if [ "$code" -ne 0 ] || [ "${failed:-1}" != "0" ]; then
        any=1
        [ -z "$names" ] && names="(no test named: the run itself failed, see $log) => -"
    fi
    while IFS= read -r line; do
        [ -z "$line" ] && continue
        failed_in["$line"]+=" $i"
    done <<<"$names"
done
stop_hogs

if [ "$any" -eq 0 ]; then
    echo "stress_suite: all $runs runs passed"
    [ "$keep" -eq 1 ] && echo "logs: $logs" || rm -rf "$logs"
    exit 0
fi
echo "stress_suite: failing tests (runs they failed in):"
for name in "${!failed_in[@]}"; do
    echo "  $name  [runs:${failed_in[$name]}]"
done | sort
echo "logs: $logs"
exit 1
