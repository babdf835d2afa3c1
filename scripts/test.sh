#!/usr/bin/env bash
# Runs the whole test suite: `bash scripts/test.sh` (extra arguments go to
# `cargo test`). The Redis tests start their own throwaway redis-server on
# free ports, so redis-server must be on PATH: this installs it with apt-get
# when it is missing (Debian/Ubuntu), then runs
# `cargo test --workspace --features tm/cli --no-fail-fast` (the feature
# builds the `tm-recover` bin, so its tests run too).
#
# The last line is the verdict over every test binary and doctest:
# `N passed, M failed`. It sums cargo's `test result: ok. X passed; Y failed`
# lines and the `N passed, M failed` lines that `harness = false` tests (the
# crash matrix, the multi-process test) print themselves. The exit status is
# non-zero on any failure, including a build failure or a test binary that
# crashed before it could report (each counted as one failure).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
    echo "--- redis-server is missing: installing it with apt-get" >&2
    as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get install -y --no-install-recommends redis-server >/dev/null \
        || { as_root apt-get update >/dev/null && as_root apt-get install -y --no-install-recommends redis-server >/dev/null; }
fi

log=$(mktemp "${TMPDIR:-/tmp}/tm-test.XXXXXX")
trap 'rm -f "$log"' EXIT

status=0
# pipefail: the pipe's status is cargo's (tee succeeds).
cargo test --workspace --features tm/cli --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?

# passed failed crashed-or-unbuilt targets, from cargo's output.
read -r passed failed broken < <(awk '
    /^test result: / {
        for (i = 1; i <= NF; i++) {
            if ($(i + 1) ~ /^passed;?$/) p += $i
            if ($(i + 1) ~ /^failed;?$/) f += $i
        }
        next
    }
    /^[0-9]+ passed, [0-9]+ failed$/ { p += $1; f += $3; next }
    # One line per test binary that failed without its failures counted
    # above (a crash), and one per build failure.
    /^error: test failed, to rerun pass/ { targets++ }
    /^error: could not compile/ { unbuilt++ }
    END { printf "%d %d %d\n", p, f, targets + unbuilt }
' "$log")

if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
    # cargo failed but no test reported a failure: a build error or a
    # binary that died before its summary. Count each, at least one.
    failed=$(( broken > 0 ? broken : 1 ))
    echo "--- cargo test exited with status $status without a failing test: counted as $failed failure(s)" >&2
fi

echo "$passed passed, $failed failed"
if [ "$failed" -ne 0 ] || [ "$status" -ne 0 ]; then
    exit 1
fi
