#!/usr/bin/env bash
# tm versus the Python `transaction` package, same machine, same run.
#
#   bash benches/peers/run.sh
#
# Makes a virtualenv (target/peers-venv) with the `transaction` package, runs
# benches/core.rs (criterion) and python_transaction.py, and prints tm's time,
# the peer's time and the ratio for each scenario.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=target/peers-venv
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "transaction>=5,<6"
fi
echo "--- Python transaction package" >&2
"$VENV/bin/python" benches/peers/python_transaction.py > target/peers-python.json
echo "--- tm (criterion, benches/core.rs)" >&2
cargo bench -p tm-benches --bench core -- --warm-up-time 1 --measurement-time "${MEASURE_SECS:-5}" >&2
python3 benches/peers/compare.py target/peers-python.json "${CRITERION_HOME:-${CARGO_TARGET_DIR:-target}/criterion}"
