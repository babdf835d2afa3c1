#!/usr/bin/env bash
# Runs the whole test suite: `bash scripts/test.sh` (extra arguments go to
# `cargo test`). The Redis tests start their own throwaway redis-server on
# free ports, so redis-server must be on PATH: this installs it with apt-get
# when it is missing (Debian/Ubuntu), then runs `cargo test --workspace`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
    echo "--- redis-server is missing: installing it with apt-get" >&2
    as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get install -y --no-install-recommends redis-server >/dev/null \
        || { as_root apt-get update >/dev/null && as_root apt-get install -y --no-install-recommends redis-server >/dev/null; }
fi

exec cargo test --workspace "$@"
