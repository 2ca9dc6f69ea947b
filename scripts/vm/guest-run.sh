#!/bin/bash
# Runs inside the VM guest, as root, from the VM stage (scripts/vm/vm-test.sh): set-up, the
# README's demo, then the tests chosen in scripts/vm/guest-tests.txt.
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
STATUS=0 # the tests run even when the demo failed: the log then shows everything at once
# How close each probe program is to the verifier's 1M-instruction limit on this older kernel,
# in the log; a program the kernel refuses fails the stage here (and the tests that load it)
timed verifier 300 /opt/cmtrace/venv/bin/python scripts/verifier-stats.py || STATUS=1
if /opt/cmtrace/venv/bin/python -c 'import cmtrace.demo' 2>/dev/null; then
    timed demo 300 make demo || STATUS=1
else
    echo "guest: step demo: skipped: cmtrace.demo does not exist in this checkout yet"
fi
# The tests chosen in scripts/vm/guest-tests.txt (one -k expression a line, joined with "or").
# GUEST_PYTEST_ARGS replaces the selection (e.g. "-m vm tests/" for every vm-marked test).
if [ -n "${GUEST_PYTEST_ARGS:-}" ]; then
    read -r -a SELECTION <<<"$GUEST_PYTEST_ARGS"
else
    EXPRESSION=$(grep -v '^#' scripts/vm/guest-tests.txt | grep -v '^ *$' | sed 's/.*/(&)/' |
        paste -sd'|' - | sed 's/|/ or /g')
    SELECTION=(-k "$EXPRESSION" tests/)
fi
echo "guest: tests: pytest ${SELECTION[*]}"
timed tests "$GUEST_TEST_TIMEOUT" /opt/cmtrace/venv/bin/python -m pytest -v -p no:cacheprovider "${SELECTION[@]}" ||
    STATUS=1
[ "$STATUS" = 0 ] || echo "guest: FAILED: see the demo and test lines above"
exit "$STATUS"
