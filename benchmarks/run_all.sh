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
# --calls needs an interpreter whose USDT probes fire: Debian's 3.9 from `make interpreters`.
PY39=${CMTRACE_PYTHONS:-/opt/cmtrace/pythons}/bin/python3.9
if [ -x "$PY39" ]; then
    echo "=== benchmarks/bench_overhead.py --calls on $PY39"
    "$PYTHON" benchmarks/bench_overhead.py --python "$PY39" --modes bare,cmtrace,cmtrace-calls \
        --workloads open@3,calls@3 --bpf-stats || { echo "=== --calls benchmark failed" >&2; rc=1; }
else
    echo "=== --calls benchmark skipped: $PY39 missing (run make interpreters)"
fi
# The ptrace backend's targets (issue 11): strace and the ptrace backend side by side on the
# raw open loop and the fd-free call loop, the whole tool pinned to CPU 0 and unpinned. The
# ptrace modes say "not built yet" until `cmtrace run` offers --backend ptrace.
echo "=== benchmarks/bench_overhead.py: ptrace backend vs strace"
"$PYTHON" benchmarks/bench_overhead.py --pin both --rounds 5 --workloads raw@3,calls@3 \
    --strace-iterations 200000 \
    --modes bare,strace-f,strace-seccomp,strace,ptrace-run,ptrace-attach ||
    { echo "=== ptrace benchmark failed" >&2; rc=1; }
exit $rc
