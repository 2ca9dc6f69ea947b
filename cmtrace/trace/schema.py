"""The trace dataset's contract: table schemas and the vocabularies of their columns.

Everything that writes or reads a trace directory imports its column names from here, so the
recorder (cmtrace.record, through writer.py), the reader (reader.py, under cmtrace.analysis) and
outside readers (pandas, DuckDB) agree on one layout.

A trace directory holds::

    meta.json                 the recording's facts (writer.py's TraceWriter), see the end of this file
    events/part-*.parquet     EVENTS: one row per kernel event, in time order within a part
    stacks/part-*.parquet     STACK_FRAMES: symbolized frames of each interned stack id
    sources/part-*.parquet    SOURCES: source lines and per-function facts captured at record time
    preexisting.parquet       PREEXISTING: fds already open when the tracer attached
    calls/part-*.parquet      CALLS: __enter__/__exit__ entries and returns (`--calls` only)
    counters/part-*.parquet   COUNTERS: per-pair close counts of fds never shipped (`--aggregate`)

The recorder is deliberately dumb: it records what the kernel saw. Implicit deaths (exec closing
CLOEXEC fds, process exit, dup2 onto a live fd) and fork inheritance are derived from the event
stream by the analysis layer (cmtrace.analysis: pairing, processes, lifetimes), the one place
that models fd tables.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

# The dataset's version, written as meta.json's "schema". Readers conform older parts (missing
# columns become nulls) and refuse a newer major: bump it when a column changes meaning or type,
# not when one is added.
SCHEMA_VERSION = 1

# --- events ---------------------------------------------------------------------------------
# op: what happened.
OP_BIRTH = "birth"  # fd (and fd2 for pipe/socketpair peers) created by `syscall`; path/kind set
OP_CLOSE = "close"  # close(fd) entered (close releases the fd even when it returns an error)
OP_CLOSE_RANGE = "close_range"  # close_range(fd, arg=last, flags); CLOSE_RANGE_CLOEXEC only marks
OP_FAIL = "fail"  # a birth syscall failed: errno set, no fd
OP_CLOEXEC = "cloexec"  # CLOEXEC bit of fd set (cloexec=True) or cleared: fcntl F_SETFD, ioctl
OP_ADDR = "addr"  # connect/bind on socket fd: path = "127.0.0.1:5432", "/run/x.sock", "[::1]:80"
OP_FORK = "fork"  # pid forked a new process: arg = child pid (children inherit pid's fd table)
OP_EXEC = "exec"  # pid exec'd path: CLOEXEC fds die (death "exec")
OP_EXIT = "exit"  # process pid exited: every fd still open dies (death "process-exit")
OP_LOST = "lost"  # arg = number of records the kernel could not reserve since the previous one
OPS = (OP_BIRTH, OP_CLOSE, OP_CLOSE_RANGE, OP_FAIL, OP_CLOEXEC, OP_ADDR, OP_FORK, OP_EXEC, OP_EXIT)

# kind: what an fd refers to, decided from the creating syscall. Events of the dup family (and
# fds received with SCM_RIGHTS) say "unknown": the analysis copies the source fd's kind into the
# lifetime (cmtrace.analysis.lifetimes), which is what reports show.
KINDS = (
    "file", "socket", "pipe", "eventfd", "epoll", "memfd", "signalfd", "timerfd", "inotify",
    "fanotify", "pidfd", "userfaultfd", "perf_event", "unknown",
)  # fmt: skip

EVENTS = pa.schema(
    [
        ("t_ns", pa.int64()),  # ns since trace start (monotonic clock)
        ("pid", pa.int32()),  # host tgid
        ("tid", pa.int32()),  # host tid
        ("op", pa.dictionary(pa.int8(), pa.string())),
        ("syscall", pa.dictionary(pa.int16(), pa.string())),
        ("fd", pa.int32()),  # -1 when not applicable
        ("src_fd", pa.int32()),  # dup source; pipe/socketpair peer; -1 otherwise
        ("errno", pa.int32()),  # 0 on success
        ("kind", pa.dictionary(pa.int8(), pa.string())),
        ("path", pa.string()),  # file path, socket address, exec'd program; null if unknown
        ("flags", pa.int64()),  # the syscall's flags argument as given (open flags, socket type...)
        ("cloexec", pa.bool_()),  # CLOEXEC state of fd after this event
        ("arg", pa.int64()),  # op-specific: close_range last fd, fork child pid, lost count, domain
        ("stack_id", pa.int64()),  # 0 = no Python stack captured (see meta degraded counts)
        ("stack_flags", pa.int32()),  # STACK_* bits below
        ("finalizing", pa.bool_()),  # interpreter was finalizing at this death (births: false)
        # births only: the generator / coroutine frames of the opening stack, innermost first,
        # each `frame index (depth) << 48 | the generator object's address`; null: none, or
        # not recorded (--aggregate, older traces). generators.json says what became of them.
        ("generators", pa.list_(pa.int64())),
    ]
)

GENERATOR_INDEX_SHIFT = 48  # a `generators` word: frame index << 48 | the generator's address

STACK_TRUNCATED = 1  # more frames than the walker's limit
STACK_NO_PYTHON = 2  # the thread had no Python frames (or the process is not CPython)
STACK_ERROR = 4  # the walk met something that is not a frame; frames dropped
STACK_FINALIZING = 8  # the runtime was finalizing (kernel side; the `finalizing` column in events)

# --- stacks ---------------------------------------------------------------------------------
CODE_GENERATOR = 0x20  # CO_GENERATOR
CODE_COROUTINE = 0x80  # CO_COROUTINE
CODE_ITERABLE_COROUTINE = 0x100  # CO_ITERABLE_COROUTINE
CODE_ASYNC_GENERATOR = 0x200  # CO_ASYNC_GENERATOR

STACK_FRAMES = pa.schema(
    [
        ("stack_id", pa.int64()),
        ("pid", pa.int32()),
        ("depth", pa.int16()),  # 0 = innermost
        ("function", pa.string()),  # co_name
        ("qualname", pa.string()),  # co_qualname (3.11+), else co_name
        ("file", pa.string()),  # co_filename as the target saw it
        ("line", pa.int32()),  # line being executed in this frame (-1 unknown)
        ("firstlineno", pa.int32()),  # co_firstlineno
        ("code_flags", pa.int32()),  # co_flags (CODE_* bits tell generator/coroutine frames)
        ("lasti", pa.int32()),  # instruction offset in code units (-1 unknown)
    ]
)

SOURCES = pa.schema(
    [
        ("file", pa.string()),
        ("line", pa.int32()),
        ("text", pa.string()),  # the source line, rstripped
        ("function", pa.string()),  # enclosing function's qualname, if known
        ("facts", pa.string()),  # JSON: per-function facts the causes need (see analysis)
    ]
)

PREEXISTING = pa.schema(
    [
        ("pid", pa.int32()),
        ("fd", pa.int32()),
        ("kind", pa.string()),
        ("path", pa.string()),  # readlink of /proc/PID/fd/N
        ("cloexec", pa.bool_()),
        ("t_ns", pa.int64()),  # when the snapshot was taken (ns since trace start)
    ]
)

# --- calls (`--calls`: USDT python:function__entry/return, where the interpreter fires them) -
CALL_ENTRY = "entry"
CALL_RETURN = "return"
CALL_FUNCTIONS = ("__enter__", "__exit__", "__aenter__", "__aexit__")  # codes 1..4 in the probe

CALLS = pa.schema(
    [
        ("t_ns", pa.int64()),
        ("pid", pa.int32()),
        ("tid", pa.int32()),
        ("event", pa.dictionary(pa.int8(), pa.string())),  # CALL_ENTRY / CALL_RETURN
        ("function", pa.dictionary(pa.int8(), pa.string())),  # one of CALL_FUNCTIONS
        ("file", pa.string()),  # co_filename of the function, from the probe's arguments
        ("line", pa.int32()),  # first line at entry, the line it left from at return
        ("raised", pa.bool_()),  # return only: the function raised; null when not known
        ("stack_id", pa.int64()),  # Python stack at the probe (innermost = the function itself)
        ("stack_flags", pa.int32()),
    ]
)

# --- counters (`--aggregate`: meta.json "aggregate" says so, with min_age_s and map sizes) ------
# The kernel counts the closes of fds it never shipped (born and closed within --min-age, of an
# (open stack, close stack) pair whose first close was shipped as events). A row holds the
# counts since the previous row of the same (pid, stack_id, close_stack, death): deltas, read
# about once a second, stamped with the read's time (the closes happened in the second before).
LIFETIME_HIST_BUCKETS = 32  # lifetime_hist[b]: lives in [2^(b+10), 2^(b+11)) ns (b=0: shorter too)
LIFETIME_HIST_MIN_SHIFT = 10

COUNTERS = pa.schema(
    [
        ("t_ns", pa.int64()),  # when the kernel's counters were read (ns since trace start)
        ("pid", pa.int32()),
        ("stack_id", pa.int64()),  # the opening stack (an id of the stacks table)
        ("close_stack", pa.int64()),  # the closing stack: the analysis refines the death from it
        ("death", pa.string()),  # the syscall that ended them: "close"
        ("opened", pa.int64()),  # fds counted (each was opened and closed: opened == closed)
        ("closed", pa.int64()),
        ("lifetime_hist", pa.list_(pa.int64())),  # LIFETIME_HIST_BUCKETS log2 buckets
    ]
)

# --- meta.json keys -------------------------------------------------------------------------
# status: "recording" while a tracer writes, "complete" when it finished; a reader that finds
# "recording" while that tracer (tracer_pid on boot_id) is gone reports "interrupted".
STATUS_RECORDING = "recording"
STATUS_COMPLETE = "complete"
STATUS_INTERRUPTED = "interrupted"


def boot_id() -> str:
    """This boot's id, as meta.json's boot_id records it ("" when the kernel does not say)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
