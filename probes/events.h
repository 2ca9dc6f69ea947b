// cmtrace: the record layouts every recording backend writes, and the constants they share.
//
// Types only (no maps, no helpers, no code), so that each C build includes it as it is:
//   - probes/fdtrace.bpf.c and probes/pystack.h (BPF, compiled by bcc: -I points here);
//   - cmtrace/record/ptrace/engine.c (the ptrace backend's engine, gcc, user space), which writes
//     the same records to a pipe instead of the ring buffer;
//   - tests/unit/test_c_mirrors.py, which compiles a small program against this file and checks
//     every Python mirror of it (record structs, kinds, read sizes, syscall numbers).
// Python mirrors: cmtrace/record/bpf/collect.py (RECORD_HEADER, EV_*), symbolize.py (REC_*,
// record heads, _READ_LIMITS), cmtrace/record/syscalls.py (numbers), cmtrace/trace/schema.py
// (STACK_* flags), cmtrace/record/bpf/usdt.py (ARG_*), cmtrace/record/ptrace/wire.py.

#ifndef CMTRACE_EVENTS_H
#define CMTRACE_EVENTS_H

#ifndef __KERNEL__
// User-space builds: the kernel's short type names, which the BPF side gets from its headers.
#include <stdint.h>
typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int32_t s32;
typedef int64_t s64;
#endif

#define DATA_LEN 256      // bytes of path / address / comm after a struct fd_event
#define SOCKADDR_MAX 128  // bytes of a sockaddr copied

// fd records (struct fd_event.type); Python records (struct py_*_rec) use type >= PY_REC_MIN.
enum event_type {
    EV_BIRTH = 1,
    EV_CLOSE = 2,
    EV_CLOSE_RANGE = 3,
    EV_FAIL = 4,
    EV_CLOEXEC = 5,
    EV_ADDR = 6,
    EV_FORK = 7,
    EV_EXEC = 8,
    EV_EXIT = 9,
    EV_CALL = 10,  // --calls: an __enter__/__exit__ entry or return
};

// x86_64 syscall numbers (cmtrace/record/syscalls.py holds the same table for user space).
enum sysnr {
    NR_ioctl = 16, NR_pipe = 22, NR_dup = 32, NR_dup2 = 33, NR_socket = 41, NR_connect = 42,
    NR_accept = 43, NR_recvmsg = 47, NR_bind = 49, NR_socketpair = 53, NR_clone = 56,
    NR_fork = 57, NR_vfork = 58, NR_fcntl = 72, NR_creat = 85, NR_open = 2, NR_close = 3,
    NR_epoll_create = 213, NR_inotify_init = 253, NR_openat = 257, NR_signalfd = 282,
    NR_timerfd_create = 283, NR_eventfd = 284, NR_accept4 = 288, NR_signalfd4 = 289,
    NR_eventfd2 = 290, NR_epoll_create1 = 291, NR_dup3 = 292, NR_pipe2 = 293,
    NR_inotify_init1 = 294, NR_perf_event_open = 298, NR_fanotify_init = 300,
    NR_memfd_create = 319, NR_userfaultfd = 323, NR_pidfd_open = 434, NR_clone3 = 435,
    NR_close_range = 436, NR_openat2 = 437, NR_pidfd_getfd = 438,
    NR_execve = 59, NR_exit = 60,  // the nr of EV_EXEC / EV_EXIT records
};

// Argument values the probes decide on (the kernel's, renamed so no header is needed).
#define F_DUPFD_ 0
#define F_SETFD_ 2
#define F_DUPFD_CLOEXEC_ 1030
#define FIONCLEX_ 0x5450
#define FIOCLEX_ 0x5451
#define CLONE_THREAD_ 0x00010000
#define CLONE_VM_VFORK_ 0x00004100

// Common header of every fd record (Python records from pystack.h use type >= 100).
struct fd_event {
    u64 ts;
    u32 pid;
    u32 tid;
    u16 type;
    u16 nr;
    s32 fd;
    s32 fd2;
    s32 err;
    u64 flags;
    u64 arg;
    u64 stack_id;
    u32 stack_flags;
    u32 datalen;
};

struct fd_event_data {
    struct fd_event e;
    char data[DATA_LEN];
};

// --aggregate (probes/fdtrace.bpf.c under CMTRACE_AGGREGATE; mirror: cmtrace/record/bpf/aggregate.py).
// A live fd's birth waits in the kernel map `agg_live`; a close of one that was never shipped
// adds to the (pid, death, open stack, close stack) counters of `agg_pairs` instead of a record.
#define AGG_FROM_LIVE 0x100       // struct fd_event.stack_flags: a birth shipped out of agg_live
#define AGG_HIST_BUCKETS 32       // log2 lifetime histogram: bucket b counts [2^(b+10), 2^(b+11)) ns
#define AGG_HIST_MIN_SHIFT 10     // (bucket 0 also holds shorter lives, the last one longer)
enum agg_pair_state {
    AGG_PAIR_NEW = 0,    // first close seen: shipped, until user space has seen its close stack
    AGG_PAIR_COUNT = 1,  // an ordinary close: count it, ship nothing
    AGG_PAIR_SHIP = 2,   // a close that may make a leak (atexit, loop shutdown): always ship
};
enum agg_full_index {
    AGG_FULL_LIVE = 0,   // births shipped at once because agg_live was full
    AGG_FULL_PAIRS = 1,  // closes shipped because agg_pairs was full
    AGG_FULL_COUNT = 2,
};

// Slots of the BPF `settings` array (user space writes them; see collect.py).
enum settings_index {
    SETTING_FOLLOW = 0,        // follow children
    SETTING_HOLD_PID = 1,      // pid to stop at each exec
    SETTING_HOLD_PYTHON = 2,   // also stop followed processes that exec a python* image
    SETTINGS_COUNT = 3,
};

// --calls: where a USDT probe's argument is (struct call_arg.kind; usdt.py ARG_*).
enum call_arg_kind {
    CALL_ARG_REG = 0,
    CALL_ARG_MEM = 1,
    CALL_ARG_CONST = 2,
};

// ---- Python stacks (probes/pystack.h writes them; cmtrace/record/bpf/symbolize.py reads) ----

#define PY_REC_STACK 100
#define PY_REC_CODE 101
#define PY_REC_GENS 102          // generator frames of the birth that follows (struct py_gens_rec)
#define PY_REC_MIN PY_REC_STACK  // lowest type of a Python record

// struct fd_event.stack_flags / struct py_stack_rec.flags (schema.STACK_*)
#define PY_STACK_TRUNCATED 1
#define PY_STACK_NO_PYTHON 2
#define PY_STACK_ERROR 4
#define PY_STACK_FINALIZING 8

#define PY_FRAMES_HEAP 1
#define PY_FRAMES_INTERP 2
#define PY_NO_OFFSET 0xffff

#define PY_MAX_FRAMES 136  // frames kept per stack (>= 128 required; verifier cost ~ this)
// Generator / coroutine frames kept per birth (issue 13's liveness check): in the FastAPI /
// asyncpg incident the route coroutine sits under asyncpg's and ~15 starlette frames.
#define PY_MAX_GENS 16
#define PY_GEN_INDEX_SHIFT 48  // py_gens_rec.gens[i] = frame index << 48 | generator address

// Bytes the walker reads of each object at once. A configured offset names an 8-byte field
// read from this buffer, so the largest usable offset is the read size minus 8 (symbolize.py
// _READ_LIMITS is exactly that; the unit test derives one from the other).
#define PY_FRAME_READ 112   // one frame header
#define PY_TSTATE_READ 320  // one PyThreadState
#define PY_CODE_READ 160    // one PyCodeObject header
#define PY_STR_HEAD 40      // one str header
#define PY_NAME_MAX 256
#define PY_FILE_MAX 1024
#define PY_LINETABLE_MAX 4096

// Per-process walker configuration: user space fills it from cmtrace/interp/layouts.py
// (symbolize.py _fill_config for BPF, the same values for the ptrace engine).
struct py_config {
    u64 interp_head_addr;   // &_PyRuntime.interpreters.head
    u64 finalizing_addr;    // &_PyRuntime._finalizing
    u64 code_type;          // &PyCode_Type
    u64 none_addr;          // &_Py_NoneStruct (3.13 entry frames execute None)
    u64 pidns_dev;
    u64 pidns_ino;
    u64 code_tag_mask;      // tag bits of a _PyStackRef f_executable (3.14+)
    u32 generation;         // bumped at every install (exec): old code records stop counting
    u8 frames;              // PY_FRAMES_*
    u8 match_native_tid;    // 1: native_thread_id == ns tid; 0: thread_id == fsbase
    u8 owner_not_python;    // frame owners >= this are not Python frames
    u8 owner_generator;     // the frame owner of a generator's embedded frame (3.11+)
    u16 interp_next, interp_threads_head;
    u16 ts_next, ts_thread_id, ts_native_thread_id, ts_frame, cframe_current_frame;
    u16 ts_chunk, ts_top, chunk_data;
    u16 fr_code, fr_previous, fr_instr, fr_owner, fr_globals;
    u16 co_flags, co_firstlineno, co_argcount, co_filename, co_name, co_qualname, co_linetable;
    u16 ob_type, bytes_size, bytes_data, str_length, str_state, str_ascii, str_compact;
    u16 ts_exception;       // the exception being raised (curexc_type / current_exception)
    u16 fr_gen;             // PyFrameObject.f_gen (<= 3.10; PY_NO_OFFSET on 3.11+)
    u16 gen_iframe;         // offset of the generator's embedded frame (3.11+; else PY_NO_OFFSET)
};

struct py_frame {
    u64 code;
    u64 instr;   // f_lasti (heap frames) or the instruction pointer (3.11+)
};

struct py_stack_rec {
    u64 ts;
    u32 pid;
    u32 tid;
    u16 type;
    u16 nframes;
    u32 flags;
    u64 stack_id;
    u32 generation;
    u32 pad;
    struct py_frame frames[PY_MAX_FRAMES];
};

struct py_code_rec {
    u64 ts;
    u32 pid;
    u32 tid;
    u16 type;
    u16 name_len;      // bytes copied
    u16 qualname_len;
    u16 file_len;
    u64 code;
    u32 generation;
    u32 checksum;
    s32 firstlineno;
    u32 flags;
    u32 argcount;
    u32 name_state;    // PyASCIIObject.state: kind tells how to decode the bytes
    u32 qualname_state;
    u32 file_state;
    u32 linetable_len;
    u32 linetable_total;
    u8 name[PY_NAME_MAX];
    u8 qualname[PY_NAME_MAX];
    u8 file[PY_FILE_MAX];
    u8 linetable[PY_LINETABLE_MAX];
};

// The generator, coroutine and async generator frames of a birth's stack (innermost first, at
// most PY_MAX_GENS), sent just before that birth and only when there is one: the same stack id
// is met with other generator objects, so they are not part of the interned stack.
struct py_gens_rec {
    u64 ts;
    u32 pid;
    u32 tid;
    u16 type;
    u16 ngens;
    u32 pad;
    u64 stack_id;
    u64 gens[PY_MAX_GENS];   // frame index << PY_GEN_INDEX_SHIFT | the generator's address
    u64 codes[PY_MAX_GENS];  // the code object that frame ran (what the generator must run)
};

// ---- ptrace backend: control messages, Python -> engine (cmtrace/record/ptrace/wire.py) ----
// The engine (cmtrace/record/ptrace/engine.c) reads them from its control fd whenever it gets
// SIGUSR1 (and every tick); while it holds a process at exec it blocks on them.
enum ctl_kind {
    CTL_CONFIG = 1,  // walk Python stacks of process `pid` with `config`
    CTL_FORGET = 2,  // stop walking `pid` (the layout failed validation)
    CTL_RESUME = 3,  // let `pid`, held after its exec, run on
    CTL_STOP = 4,    // attach mode: detach from everything and exit; run mode: ignored
    CTL_HOLD_NEXT = 5,  // let `pid` run to its next stop and hold it there (CPython not loaded yet)
};

struct ctl_msg {
    u32 kind;  // enum ctl_kind
    u32 pid;
    struct py_config config;  // CTL_CONFIG only
};

// The engine's records are framed as in the BPF ring buffer: an 8-byte header (u32 payload
// length, u32 zero) before each record, the payload padded to 8 bytes.
#define ENGINE_FRAME_HEADER 8

#endif  // CMTRACE_EVENTS_H
