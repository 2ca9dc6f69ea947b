#!/bin/bash
# Run every benchmarks/bench_*.py in turn, with its defaults, under the project's interpreter.
# Exits non-zero if any benchmark failed, after running them all.
set -u
cd "$(dirname "$0")/.."
PYTHON=${CMTRACE_PYTHON:-/opt/cmtrace/venv/bin/python}
[ "$(id -u)" = 0 ] || { echo "run_all.sh: the tracer benchmarks attach BPF programs: run as root" >&2; exit 2; }
rc=0
for bench in benchmarks/bench_*.py; do
    echo "=== $bench"
    "$PYTHON" "$bench" || { status=$?; echo "=== $bench failed ($status)" >&2; rc=1; }
done
exit $rc
