#!/bin/bash
# Runs inside the VM guest, as root, from the VM stage (scripts/vm/vm-test.sh): set-up, the
# README's demo, then the tests marked `vm`.
# Prints the guest kernel and one timing line per step.
set -uo pipefail
cd "$(dirname "$0")/../.."
export CMTRACE_IN_VM=1
GUEST_TEST_TIMEOUT=${GUEST_TEST_TIMEOUT:-900}

timed() { # timed NAME TIMEOUT CMD...: run, print its duration, return its status
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout --kill-after=20 "$limit" "$@"
    rc=$?
    echo "guest: step $name: $(($(date +%s) - start)) s, exit $rc"
    return $rc
}

echo "guest: kernel $(uname -r), $(/usr/bin/python3 -V), $(nproc) cpus"
timed setup 600 scripts/setup.sh || exit 1
/opt/cmtrace/venv/bin/cmtrace doctor --no-load-test || true # for the log; tests check it
if /opt/cmtrace/venv/bin/python -c 'import cmtrace.demo' 2>/dev/null; then
    timed demo 300 make demo || exit 1
else
    echo "guest: step demo: skipped: cmtrace.demo does not exist in this checkout yet"
fi
# The tests marked `vm` (pytest.mark.vm): the core real-eBPF ones. Files that do not exist yet
# simply contribute nothing. GUEST_PYTEST_ARGS replaces the selection (e.g. "-k doctor tests/").
read -r -a SELECTION <<<"${GUEST_PYTEST_ARGS:--m vm tests/}"
echo "guest: tests: pytest ${SELECTION[*]}"
timed tests "$GUEST_TEST_TIMEOUT" /opt/cmtrace/venv/bin/python -m pytest -v -p no:cacheprovider "${SELECTION[@]}"
