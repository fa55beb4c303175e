#!/usr/bin/env bash
# Runs the whole workspace test suite RUNS times while LOAD busy loops compete for the CPU, and
# says which tests failed in which run. A test that fails here is racing the clock or the
# scheduler: find the race (in the test or in the node) rather than adding a sleep or a retry.
#
#   scripts/soak-tests.sh RUNS LOAD [CARGO TEST ARGS...]
#   scripts/soak-tests.sh 20 2                         # the whole suite, 20 times, 2 busy loops
#   scripts/soak-tests.sh 50 2 -p meshnode --test mesh # one test binary
#
# The test binaries are built once, before the load starts. Each run is bounded by
# SOAK_RUN_TIMEOUT seconds (default 900); the busy loops stop when the script ends, however it
# ends (Ctrl-C included). The logs of failed runs are kept in a temporary directory, named at the
# end. Exit status: 0 when every run passed, 1 otherwise, 2 for a usage error.
set -uo pipefail

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
}

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    usage
    exit 0
fi
if [[ $# -lt 2 || ! ${1} =~ ^[1-9][0-9]*$ || ! ${2} =~ ^[0-9]+$ ]]; then
    echo "usage: $0 RUNS LOAD [CARGO TEST ARGS...] (RUNS >= 1, LOAD >= 0 busy loops)" >&2
    exit 2
fi
runs=$1
load=$2
shift 2
if [[ $# -eq 0 ]]; then
    set -- --workspace
fi
run_timeout=${SOAK_RUN_TIMEOUT:-900}
if [[ ! $run_timeout =~ ^[1-9][0-9]*$ ]]; then
    echo "SOAK_RUN_TIMEOUT must be a whole number of seconds, not '$run_timeout'" >&2
    exit 2
fi

cd "$(dirname "$0")/.." || exit 2
export CARGO_TERM_COLOR=never

logs=$(mktemp -d "${TMPDIR:-/tmp}/meshnode-soak.XXXXXX") || exit 2
busy=()
current=

# Ends the run under way, if any: its own process group holds cargo, the test binaries and the
# nodes they started.
stop_run() {
    if [[ -n $current ]]; then
        kill -TERM -- "-$current" 2>/dev/null
        wait "$current" 2>/dev/null
        current=
    fi
}
stop_load() {
    local pid
    for pid in "${busy[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${busy[@]}"; do
        wait "$pid" 2>/dev/null
    done
    busy=()
}
on_signal() {
    echo
    echo "interrupted; the run under way and the busy loops are stopped, logs in $logs" >&2
    stop_run
    stop_load
    exit 130
}
trap stop_load EXIT
trap on_signal INT TERM

echo "== building the test binaries once"
if ! cargo test --locked --no-fail-fast --no-run "$@" >"$logs/build.log" 2>&1; then
    cat "$logs/build.log" >&2
    echo "the build failed; nothing was run" >&2
    exit 1
fi

for ((i = 0; i < load; i++)); do
    (while :; do :; done) &
    busy+=("$!")
done
echo "== $runs runs of: cargo test --locked --no-fail-fast $*"
echo "   with $load busy loops on $(nproc) cores; each run bounded by ${run_timeout}s"

# Reads a cargo test log; prints one line per failed test, as BINARY::TEST.
failed_tests() {
    awk '
        /^ *Running / {
            if ($2 == "unittests") {
                bin = $4; sub(/^\(/, "", bin); sub(/\)$/, "", bin)
                n = split(bin, parts, "/"); bin = parts[n]; sub(/-[0-9a-f]+$/, "", bin)
                bin = bin " (" $3 ")"
            } else {
                n = split($2, parts, "/"); bin = parts[n]; sub(/\.rs$/, "", bin)
            }
        }
        /^test .* \.\.\. FAILED$/ { name = $2; print bin "::" name }
    ' "$1"
}

# Sums the "finished in" times of a cargo test log, in seconds.
test_seconds() {
    awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($i == "in") { t = $(i + 1); sub(/s$/, "", t); s += t } }
         END { printf "%.1f", s }' "$1"
}

passed=0
declare -A failures=()
started=$SECONDS
for ((run = 1; run <= runs; run++)); do
    log="$logs/run-$run.log"
    t0=$SECONDS
    # In a process group of its own (setsid), in the background, so that a signal to this
    # script is handled at once and ends the whole run.
    setsid timeout --kill-after=30 "$run_timeout" \
        cargo test --locked --no-fail-fast "$@" >"$log" 2>&1 &
    current=$!
    wait "$current"
    code=$?
    current=
    took=$((SECONDS - t0))
    names=$(failed_tests "$log")
    if [[ $code -eq 0 ]]; then
        passed=$((passed + 1))
        printf 'run %d/%d: ok (%ds wall, %ss of tests)\n' "$run" "$runs" "$took" "$(test_seconds "$log")"
        rm -f "$log"
        continue
    fi
    if [[ $code -eq 124 || $code -eq 137 ]]; then
        names+=${names:+$'\n'}"(the run hit its ${run_timeout}s bound)"
    elif [[ -z $names ]]; then
        names="(exit $code, no failed test named: a crash or a build error)"
    fi
    printf 'run %d/%d: FAILED (%ds wall), log %s\n' "$run" "$runs" "$took" "$log"
    while IFS= read -r name; do
        printf '    %s\n' "$name"
        failures[$name]=$((${failures[$name]:-0} + 1))
    done <<<"$names"
done
stop_load

echo "== summary: $passed of $runs runs passed, in $((SECONDS - started))s, with $load busy loops"
if [[ ${#failures[@]} -gt 0 ]]; then
    echo "failures (test: runs it failed in):"
    for name in "${!failures[@]}"; do
        printf '    %s: %d\n' "$name" "${failures[$name]}"
    done | sort
    echo "logs of the failed runs: $logs"
    exit 1
fi
rm -rf "$logs"
exit 0
