// cmtrace ptrace engine: the fd births and deaths of a command (run) or process (attach), with
// the Python stack of the thread at each event, without BPF and without root.
//
//   cmtrace-ptrace-engine [options] -- CMD ARGS...   run mode: fork CMD and trace it
//   cmtrace-ptrace-engine [options] -p PID           attach mode: trace PID's threads
// options:
//   -o FD   record stream (default 1): the records of probes/events.h, framed as in the BPF ring
//   -c FD   control messages (struct ctl_msg) from the collector; SIGUSR1 says "read them"
//   -s FD   one JSON line of counters at the end (default 2)
//   -f      follow children: record their events too (they are traced regardless in run mode)
//   -H      hold every exec: emit EV_EXEC, then wait for CTL_RESUME for that pid
//   -n      no seccomp filter in run mode (stop at every syscall, like attach mode)
//   -d SECS attach mode: detach after SECS
// Exit status: the command's (run), 0 (attach), 2 usage, 70 internal error, 77 ptrace refused.
//
// Run mode: the child waits on a pipe until seized, installs a SECCOMP_RET_TRACE filter for the
// traced syscalls (so nothing else stops), then execs. PTRACE_O_EXITKILL: a filter whose tracer
// is gone fails every traced syscall with ENOSYS, so the command dies with the engine instead.
// Attach mode: every thread is seized and stopped at every syscall; detaching (SIGINT, SIGTERM,
// -d, CTL_STOP) interrupts each thread, detaches it and hands back any signal it was about to get.
// Births: arguments and the stack at entry, the fd at the exit stop; deaths: one stop at entry.
// Stacks come from probes/pywalk.h (the kernel walker's code) over process_vm_readv, interned
// by the same ids as in BPF (code records once per code object per process and generation).
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "events.h"

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

static long target_read(void *dst, u32 size, const void *src);
#define PY_READ(dst, size, src) target_read(dst, size, src)
#define PY_NO_UNROLL
#include "pywalk.h"

#define EXIT_USAGE 2
#define EXIT_INTERNAL 70
#define EXIT_PTRACE_REFUSED 77
#define EXIT_EXEC_FAILED 127
#define ERESTART_FIRST 512  // -ERESTARTSYS .. -ERESTART_RESTARTBLOCK: the syscall will run again
#define ERESTART_LAST 516
#define TICK_MS 5           // records wait at most this long in the buffer
#define IDLE_TICK_MS 250    // control poll interval while no record waits (SIGUSR1 says sooner)
#define NO_ARG -1

// ---- the syscall table: what each traced syscall records --------------------------------------

enum handling {
    H_NONE = 0,
    H_PATH,    // birth: fd = ret, data = path
    H_SIMPLE,  // birth: fd = ret, fd2 = source fd
    H_PAIR,    // birth: two fds written to user memory (pipe, socketpair)
    H_ACCEPT,  // birth: fd = ret, fd2 = listener, data = peer address
    H_SCM,     // recvmsg: fds received with SCM_RIGHTS
    H_CLOSE,   // death at entry
    H_CLOSE_RANGE,
    H_CLOEXEC,  // ioctl FIOCLEX/FIONCLEX, fcntl F_SETFD
    H_ADDR,     // connect / bind: the address
    H_EXECVE,   // the path, kept for EV_EXEC
};

// Which argument goes where, as probes/fdtrace.bpf.c's emit_at_exit fills each record.
struct syscall_shape {
    u16 nr;
    u8 handling;
    int8_t ptr;    // path / fd-pair / msghdr / sockaddr argument
    int8_t src;    // source fd (fd2)
    int8_t flags;  // flags field (NO_ARG: 0)
    int8_t arg;    // arg field (NO_ARG: 0)
    u8 check;  // the filter stops only for some values of an argument (see filter_checks)
};

#define FLAGS_DEREF 9  // openat2: flags are the first u64 of struct open_how at args[2]

static const struct syscall_shape SHAPES[] = {
    {NR_open, H_PATH, 0, NO_ARG, 1, 0, 0},
    {NR_openat, H_PATH, 1, NO_ARG, 2, 0, 0},
    {NR_openat2, H_PATH, 1, NO_ARG, FLAGS_DEREF, 0, 0},
    {NR_creat, H_PATH, 0, NO_ARG, NO_ARG, 0, 0},
    {NR_memfd_create, H_PATH, 0, NO_ARG, 1, 0, 0},
    {NR_socket, H_SIMPLE, NO_ARG, NO_ARG, 1, 0, 0},
    {NR_socketpair, H_PAIR, 3, NO_ARG, 1, 0, 0},
    {NR_pipe, H_PAIR, 0, NO_ARG, NO_ARG, NO_ARG, 0},
    {NR_pipe2, H_PAIR, 0, NO_ARG, 1, NO_ARG, 0},
    {NR_accept, H_ACCEPT, 1, 0, NO_ARG, NO_ARG, 0},
    {NR_accept4, H_ACCEPT, 1, 0, 3, NO_ARG, 0},
    {NR_dup, H_SIMPLE, NO_ARG, 0, NO_ARG, NO_ARG, 0},
    {NR_dup2, H_SIMPLE, NO_ARG, 0, NO_ARG, NO_ARG, 0},
    {NR_dup3, H_SIMPLE, NO_ARG, 0, 2, NO_ARG, 0},
    {NR_fcntl, H_SIMPLE, NO_ARG, 0, 1, 2, 1},
    {NR_eventfd, H_SIMPLE, NO_ARG, NO_ARG, NO_ARG, 0, 0},
    {NR_epoll_create, H_SIMPLE, NO_ARG, NO_ARG, NO_ARG, 0, 0},
    {NR_inotify_init, H_SIMPLE, NO_ARG, NO_ARG, NO_ARG, 0, 0},
    {NR_eventfd2, H_SIMPLE, NO_ARG, NO_ARG, 1, 0, 0},
    {NR_timerfd_create, H_SIMPLE, NO_ARG, NO_ARG, 1, 0, 0},
    {NR_pidfd_open, H_SIMPLE, NO_ARG, NO_ARG, 1, 0, 0},
    {NR_epoll_create1, H_SIMPLE, NO_ARG, NO_ARG, 0, NO_ARG, 0},
    {NR_inotify_init1, H_SIMPLE, NO_ARG, NO_ARG, 0, NO_ARG, 0},
    {NR_fanotify_init, H_SIMPLE, NO_ARG, NO_ARG, 0, NO_ARG, 0},
    {NR_userfaultfd, H_SIMPLE, NO_ARG, NO_ARG, 0, NO_ARG, 0},
    {NR_signalfd, H_SIMPLE, NO_ARG, NO_ARG, NO_ARG, NO_ARG, 2},
    {NR_signalfd4, H_SIMPLE, NO_ARG, NO_ARG, 3, NO_ARG, 2},
    {NR_pidfd_getfd, H_SIMPLE, NO_ARG, 1, 2, 0, 0},
    {NR_perf_event_open, H_SIMPLE, NO_ARG, NO_ARG, 4, 2, 0},
    {NR_recvmsg, H_SCM, 1, 0, 2, NO_ARG, 0},
    {NR_close, H_CLOSE, NO_ARG, NO_ARG, NO_ARG, NO_ARG, 0},
    {NR_close_range, H_CLOSE_RANGE, NO_ARG, NO_ARG, 2, 1, 0},
    {NR_ioctl, H_CLOEXEC, NO_ARG, NO_ARG, NO_ARG, NO_ARG, 3},
    {NR_connect, H_ADDR, 1, NO_ARG, NO_ARG, NO_ARG, 0},
    {NR_bind, H_ADDR, 1, NO_ARG, NO_ARG, NO_ARG, 0},
    {NR_execve, H_EXECVE, 0, NO_ARG, NO_ARG, NO_ARG, 0},
};
#define N_SHAPES (sizeof SHAPES / sizeof SHAPES[0])

// Argument checks in the filter: the syscalls that matter only for some values of one argument
// (ioctl: open() makes an ioctl(TCGETS) per file, which must not stop).
struct filter_check {
    u8 arg;
    u8 nvalues;
    u32 values[3];  // compared with the argument's low 32 bits
};
static const struct filter_check FILTER_CHECKS[] = {
    [1] = {1, 3, {F_DUPFD_, F_DUPFD_CLOEXEC_, F_SETFD_}},  // fcntl: dup or CLOEXEC change
    [2] = {0, 1, {0xffffffffu}},                           // signalfd*: a new one (fd -1)
    [3] = {1, 2, {FIOCLEX_, FIONCLEX_}},                   // ioctl: CLOEXEC change
};

#define NR_SPACE 512
static const struct syscall_shape *shape_by_nr[NR_SPACE];

static const struct syscall_shape *shape_of(long nr) {
    return nr >= 0 && nr < NR_SPACE ? shape_by_nr[nr] : NULL;
}

static int is_birth(const struct syscall_shape *sh) {
    return sh->handling >= H_PATH && sh->handling <= H_SCM;
}

// ---- counters (the JSON line at the end) ------------------------------------------------------

static struct {
    long stops, events, stacks, codes, reads, read_bytes, no_stack, write_errors, dropped;
    long threads_seen, processes_seen;
    long untracked;  // processes beyond MAX_PROCS at once: traced, not recorded
} stat;

// ---- record stream ----------------------------------------------------------------------------

static int out_fd = 1;
static char out_buf[1 << 17];
static size_t out_len;

// Run mode after CTL_STOP (--max-size, a full disk): the trace is finished but the command
// runs on, and its seccomp filter needs the engine: every stop is still served, nothing is
// recorded or written any more (no stack walks, no records; the stream is closed, which tells
// the collector that everything up to the stop has arrived).
static int recording_off;

// Blocking writes: a slow collector slows the target down instead of losing records. Only a
// collector that is gone (EPIPE) loses them, and they are counted.
static void flush_records(void) {
    size_t done = 0;
    while (done < out_len && !recording_off) {
        ssize_t n = write(out_fd, out_buf + done, out_len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            stat.write_errors++;
            break;
        }
        done += (size_t)n;
    }
    out_len = 0;
}

// The timer ticks every IDLE_TICK_MS, and TICK_MS after a record lands in an empty buffer: an
// engine whose target makes no traced syscall wakes 4 times a second, not 50 (each wake-up is
// taken from the target when they share a CPU).
static void arm_tick(long first_ms) {
    struct itimerval t = {{0, IDLE_TICK_MS * 1000}, {0, first_ms * 1000}};
    setitimer(ITIMER_REAL, &t, NULL);
}

static void put_record(const void *payload, u32 len) {
    u32 framed = ENGINE_FRAME_HEADER + ((len + 7) & ~7u);
    if (recording_off)
        return;
    if (!out_len)
        arm_tick(TICK_MS);
    if (out_len + framed > sizeof out_buf)
        flush_records();
    if (framed > sizeof out_buf) {
        stat.dropped++;
        return;
    }
    u32 head[2] = {len, 0};
    memcpy(out_buf + out_len, head, sizeof head);
    memcpy(out_buf + out_len + ENGINE_FRAME_HEADER, payload, len);
    memset(out_buf + out_len + ENGINE_FRAME_HEADER + len, 0, framed - ENGINE_FRAME_HEADER - len);
    out_len += framed;
}

static u64 now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);  // bpf_ktime_get_ns's clock
    return (u64)t.tv_sec * 1000000000ull + (u64)t.tv_nsec;
}

// ---- target memory: process_vm_readv, small reads served from blocks read once per stop -----

#define BLOCK 4096
#define N_BLOCKS 16
#define SMALL_READ 256
#define POINTER_READ 8
static pid_t mem_pid;
static u64 mem_epoch;
static struct {
    u64 addr, epoch;
    int ok;
    u8 data[BLOCK];
} blocks[N_BLOCKS];

// The reads a stack walk made, replayed at the thread's next walk as one process_vm_readv
// (a syscall costs far more than the bytes it copies): a walk of an unchanged stack, or of one
// whose top moved a little, then reads nothing more. Requests are served only from bytes read
// during the same stop, so a stale plan costs bytes, never a wrong frame.
#define PLAN_MAX 16                          // heap frames (<= 3.10): a block each, at most
#define PLAN_BYTES (PY_WINDOW + 12 * BLOCK)
struct read_plan {
    u64 addr[PLAN_MAX];
    u32 len[PLAN_MAX];
    u32 n;
};

static struct {
    u64 addr[PLAN_MAX];
    u32 len[PLAN_MAX], got[PLAN_MAX], at[PLAN_MAX];  // asked, read, offset in data
    u32 n;
    u64 epoch;
    u8 data[PLAN_BYTES];
} prefetched;
static struct read_plan learned;  // the regions the walk in progress used
static int learning;
// One more region read by the same call, first: a birth's path, taken while its stack is read
// rather than with a syscall of its own at the exit stop (got: bytes read, set by prefetch).
static struct {
    void *dst;
    u64 addr;
    u32 len, got;
} passenger;

static void learn(u64 addr, u32 len) {
    if (!learning)
        return;
    for (u32 i = 0; i < learned.n; i++) {
        if (learned.addr[i] == addr) {
            learned.len[i] = len > learned.len[i] ? len : learned.len[i];
            return;
        }
    }
    if (learned.n < PLAN_MAX) {
        learned.addr[learned.n] = addr;
        learned.len[learned.n++] = len;
    }
}

static long read_direct(void *dst, u64 addr, size_t size) {
    struct iovec local = {dst, size}, remote = {(void *)addr, size};
    stat.reads++;
    stat.read_bytes += (long)size;
    return process_vm_readv(mem_pid, &local, 1, &remote, 1, 0) == (ssize_t)size ? 0 : -1;
}

// Start reading another stopped thread's memory: everything cached before may have changed.
static void mem_begin(pid_t pid) {
    mem_pid = pid;
    mem_epoch++;
}

// Read a plan's regions at once, in order (a region that fails ends the read: the rest are
// read again, one by one, if the walk asks for them).
static void prefetch(const struct read_plan *plan) {
    struct iovec local[PLAN_MAX + 1], remote[PLAN_MAX + 1];
    u32 total = 0, n = 0, first = passenger.len ? 1 : 0;
    if (first) {
        local[0] = (struct iovec){passenger.dst, passenger.len};
        remote[0] = (struct iovec){(void *)passenger.addr, passenger.len};
    }
    passenger.got = 0;
    for (u32 i = 0; i < plan->n && total + plan->len[i] <= PLAN_BYTES; i++, n++) {
        prefetched.addr[n] = plan->addr[i];
        prefetched.len[n] = plan->len[i];
        prefetched.at[n] = total;
        local[first + n] = (struct iovec){prefetched.data + total, plan->len[i]};
        remote[first + n] = (struct iovec){(void *)plan->addr[i], plan->len[i]};
        total += plan->len[i];
    }
    prefetched.n = 0;
    prefetched.epoch = mem_epoch;
    if (!n && !first)
        return;
    stat.reads++;
    stat.read_bytes += total + passenger.len;
    ssize_t got = process_vm_readv(mem_pid, local, first + n, remote, first + n, 0);
    u32 left = got > 0 ? (u32)got : 0;
    passenger.got = left < passenger.len ? left : passenger.len;
    left -= passenger.got;
    for (u32 i = 0; i < n; i++) {
        prefetched.got[i] = left < prefetched.len[i] ? left : prefetched.len[i];
        left -= prefetched.got[i];
    }
    prefetched.n = n;
}

// The data-stack window grows and shrinks with the call depth: plan it as long as it was plus
// some room, up to the end of its last page, so a deeper stack next time is still served
// (another page would cost more than the miss). It replaces a block that served it.
#define WINDOW_ROOM 1024
static void plan_window(struct read_plan *plan, u64 window, u64 len) {
    u64 last = window + len;
    u64 page_end = (last + BLOCK - 1) & ~(u64)(BLOCK - 1);
    u64 end = page_end - last > WINDOW_ROOM ? last + WINDOW_ROOM : page_end;
    for (u32 i = 0; i < plan->n; i++) {
        if (window < plan->addr[i] || window >= plan->addr[i] + plan->len[i])
            continue;
        plan->addr[i] = window;
        plan->len[i] = end - window > PY_WINDOW ? PY_WINDOW : (u32)(end - window);
    }
}

static int from_prefetched(void *dst, u64 addr, u32 size) {
    if (prefetched.epoch != mem_epoch)
        return -1;
    for (u32 i = 0; i < prefetched.n; i++) {
        u64 base = prefetched.addr[i];
        if (addr >= base && addr + size <= base + prefetched.got[i]) {
            memcpy(dst, prefetched.data + prefetched.at[i] + (addr - base), size);
            learn(base, prefetched.len[i]);
            return 0;
        }
    }
    return -1;
}

static long target_read(void *dst, u32 size, const void *src) {
    u64 addr = (u64)src;
    if (!addr || !size)
        return -1;
    if (!from_prefetched(dst, addr, size))
        return 0;
    u64 base = addr & ~(u64)(BLOCK - 1);
    // a pointer (one word) is read once per stop: a whole block for it costs more than it saves
    if (size <= POINTER_READ || size > SMALL_READ || addr + size > base + BLOCK) {
        if (read_direct(dst, addr, size))
            return -1;
        learn(addr, size);
        return 0;
    }
    unsigned slot = (unsigned)((base / BLOCK) * 0x9E3779B1u) % N_BLOCKS;
    if (blocks[slot].epoch != mem_epoch || blocks[slot].addr != base) {
        blocks[slot].addr = base;
        blocks[slot].epoch = mem_epoch;
        blocks[slot].ok = read_direct(blocks[slot].data, base, BLOCK) == 0;
    }
    if (!blocks[slot].ok)  // part of the block is not mapped: read just what was asked
        return read_direct(dst, addr, size);
    learn(base, BLOCK);
    memcpy(dst, blocks[slot].data + (addr - base), size);
    return 0;
}

// A NUL-terminated string of at most cap - 1 bytes; returns its length (bpf_probe_read_user_str
// semantics as the probes record them: datalen excludes the NUL).
static u32 read_string(char *dst, u64 addr, u32 cap) {
    u32 got = 0;
    while (addr && got < cap - 1) {
        u64 page_left = BLOCK - ((addr + got) & (BLOCK - 1));
        u32 chunk = (u32)(page_left < cap - 1 - got ? page_left : cap - 1 - got);
        if (read_direct(dst + got, addr + got, chunk))
            break;
        char *nul = memchr(dst + got, 0, chunk);
        if (nul)
            return (u32)(nul - dst);
        got += chunk;
    }
    return got;
}

// ---- interned sets: stack ids, code objects sent ----------------------------------------------

#define SET_BITS 17
#define SET_SIZE (1u << SET_BITS)
struct set_entry {
    u64 key, key2;
    u32 value;
    u8 used;
};
static struct set_entry stack_set[SET_SIZE], code_set[SET_SIZE];
static u32 stack_count, code_count;

static struct set_entry *set_slot(struct set_entry *set, u64 key, u64 key2) {
    u64 h = (key ^ (key2 * 0xff51afd7ed558ccdull)) * 0x9E3779B97F4A7C15ull;
    u32 i = (u32)(h >> (64 - SET_BITS));
    for (u32 n = 0; n < SET_SIZE; i = (i + 1) & (SET_SIZE - 1), n++)
        if (!set[i].used || (set[i].key == key && set[i].key2 == key2))
            return &set[i];
    return NULL;
}

// A full set forgets everything (like the kernel's LRU maps, only coarser): records repeat.
static void set_reset_if_full(struct set_entry *set, u32 *count) {
    if (*count < SET_SIZE / 2)
        return;
    memset(set, 0, sizeof(struct set_entry) * SET_SIZE);
    *count = 0;
}

// ---- processes and threads ------------------------------------------------------------------

struct proc {
    pid_t tgid;
    u8 used, has_config, recorded, exit_sent;
    struct py_config cfg;
    char comm[16];
    char exec_path[DATA_LEN];
    u32 exec_path_len;
};

struct thread {
    pid_t tid;
    u8 used, held, hold_next;
    u8 unfiled;       // stopped before its parent's clone event: not resumed until filed
    int unfiled_sig;  // what its first stop asked for: a signal to hand on, or LISTEN_AT_FILING
    struct proc *proc;
    const struct syscall_shape *pending;  // a birth waiting for its exit stop
    u64 args[6];
    u64 stack_id;
    u32 stack_flags;
    u64 tstate;    // cached PyThreadState, validated at each use
    u64 key;       // what the thread state's id must equal (ns tid or fsbase), 0 = unknown
    int key_tries;
    u32 path_len;           // a pending birth's path, read at its entry (PATH_UNREAD: not)
    // Without the filter every syscall stops twice; once an entry stop was seen, the next
    // syscall stop is that syscall's exit, which needs no question to the kernel when the
    // syscall records nothing there (phase_known: in_syscall says which stop comes next).
    u8 phase_known, in_syscall;
};

#define PATH_UNREAD 0xffffffffu

#define MAX_THREADS 16384
#define MAX_PROCS 8192
static struct thread threads[MAX_THREADS];
// by thread slot, kept apart so that the loops over threads[] stay small: what its last stack
// walk read, and a pending birth's path
static struct read_plan plans[MAX_THREADS];
static char pending_paths[MAX_THREADS][DATA_LEN];
// the generator frames of a pending birth's stack, walked at its entry, sent at its exit
struct kept_gens {
    u64 stack_id;
    u32 n;
    u64 gens[PY_MAX_GENS], codes[PY_MAX_GENS];
};
static struct kept_gens kept_gens[MAX_THREADS];
static struct proc procs[MAX_PROCS];
static int live_threads;
// The process of a task whose first stop came before its parent's clone event, until that
// event says which one it is (not in procs[], so not counted; recorded = 0).
static struct proc unfiled_proc;
#define LISTEN_AT_FILING -1
// Children of an attached process without -f: not recorded, so not traced either (every
// syscall of theirs would stop): detached at their first stop. And processes that found no
// free slot in procs[]: still traced (run mode: their filter needs the engine), not recorded.
static struct proc released_proc, untracked_proc;

static struct thread *find_thread(pid_t tid) {
    for (u32 i = (u32)tid % MAX_THREADS, n = 0; n < MAX_THREADS; i = (i + 1) % MAX_THREADS, n++) {
        if (threads[i].used && threads[i].tid == tid)
            return &threads[i];
        if (!threads[i].used && !threads[i].tid)
            return NULL;
    }
    return NULL;
}

static struct proc *find_proc(pid_t tgid, int create) {
    struct proc *free_slot = NULL;
    for (u32 i = (u32)tgid % MAX_PROCS, n = 0; n < MAX_PROCS; i = (i + 1) % MAX_PROCS, n++) {
        if (procs[i].used && procs[i].tgid == tgid)
            return &procs[i];
        if (!procs[i].used && !free_slot)
            free_slot = &procs[i];
    }
    if (!create || !free_slot)
        return NULL;
    memset(free_slot, 0, sizeof *free_slot);
    free_slot->used = 1;
    free_slot->tgid = tgid;
    stat.processes_seen++;
    return free_slot;
}

static struct thread *add_thread(pid_t tid, struct proc *proc) {
    struct thread *t = find_thread(tid);
    if (t)
        return t;
    for (u32 i = (u32)tid % MAX_THREADS, n = 0; n < MAX_THREADS; i = (i + 1) % MAX_THREADS, n++) {
        if (!threads[i].used) {
            t = &threads[i];
            memset(t, 0, sizeof *t);
            plans[i].n = 0;
            t->used = 1;
            t->tid = tid;
            t->proc = proc;
            live_threads++;
            stat.threads_seen++;
            return t;
        }
    }
    fprintf(stderr, "cmtrace-ptrace-engine: more than %d threads\n", MAX_THREADS);
    exit(EXIT_INTERNAL);
}

// Freed slots keep their tid so that lookups probing past them go on (tombstones), unless the
// next slot ends every probe anyway (never used): then it and the tombstones before it do too.
// Without that, a long trace of short-lived tasks left tombstones everywhere, and each lookup
// of a new tid scanned the whole table.
static void drop_thread(struct thread *t) {
    t->used = 0;
    live_threads--;
    u32 i = (u32)(t - threads), next = (i + 1) % MAX_THREADS;
    if (threads[next].used || threads[next].tid)
        return;
    while (!threads[i].used && threads[i].tid) {
        threads[i].tid = 0;
        i = (i + MAX_THREADS - 1) % MAX_THREADS;
    }
}

// A process whose leader is gone: its slot is free (a recycled pid starts afresh).
static void drop_proc(struct proc *p) {
    if (p >= procs && p < procs + MAX_PROCS)
        p->used = 0;
}

// ---- Python stacks ----------------------------------------------------------------------------

static struct py_scratch scratch;

// The id the thread's PyThreadState carries: its tid in the target's pid namespace (3.11+,
// NSpid's last field) or pthread_self, which is the thread's fs base on x86_64 (<= 3.10).
static u64 thread_key(struct thread *t) {
    if (t->proc->cfg.match_native_tid) {
        char path[64], line[256];
        snprintf(path, sizeof path, "/proc/%d/status", t->tid);
        FILE *f = fopen(path, "r");
        u64 key = 0;
        while (f && fgets(line, sizeof line, f)) {
            if (strncmp(line, "NSpid:", 6))
                continue;
            char *last = strrchr(line, '\t');
            key = last ? strtoull(last + 1, NULL, 10) : 0;
            break;
        }
        if (f)
            fclose(f);
        return key;
    }
    struct user_regs_struct regs;
    if (ptrace(PTRACE_GETREGS, t->tid, 0, &regs))
        return 0;
    return regs.fs_base;
}

// Find the thread's state (cached, validated) and leave its top frame in scratch.top.
static void find_thread_state(struct thread *t) {
    struct py_config *cfg = &t->proc->cfg;
    struct py_scratch *s = &scratch;
    s->top = 0;
    if (!t->key || (t->tstate == 0 && t->key_tries < 3)) {
        // the fs base is set by the C library at thread start: ask again until a state matches
        t->key = thread_key(t);
        t->key_tries++;
    }
    if (!t->key)
        return;
    if (t->tstate) {
        if (!target_read(s->tstate, PY_TSTATE_READ, (void *)t->tstate))
            py_match(cfg, s, t->key);
        if (s->top)
            return;
        t->tstate = 0;
    }
    t->tstate = py_search_threads(cfg, s, t->key);
}

static void emit_code(struct thread *t, u64 code) {
    static struct py_code_rec r;
    struct py_config *cfg = &t->proc->cfg;
    r.ts = now_ns();
    r.pid = (u32)t->proc->tgid;
    r.tid = (u32)t->tid;
    py_fill_code(cfg, &scratch, code, &r);
    put_record(&r, sizeof r);
    stat.codes++;
}

static void emit_stack(struct thread *t, u64 id, u32 flags) {
    static struct py_stack_rec r;
    struct py_scratch *s = &scratch;
    r.ts = now_ns();
    r.pid = (u32)t->proc->tgid;
    r.tid = (u32)t->tid;
    r.type = PY_REC_STACK;
    r.nframes = (u16)s->nframes;
    r.flags = flags;
    r.stack_id = id;
    r.generation = t->proc->cfg.generation;
    r.pad = 0;
    memcpy(r.frames, s->frames, s->nframes * sizeof(struct py_frame));
    size_t frames = s->nframes * sizeof(struct py_frame);
    put_record(&r, (u32)(offsetof(struct py_stack_rec, frames) + frames));
    stat.stacks++;
}

// Keep the last walk's generator frames for this thread's birth (the scratch is the next walk's).
static void keep_generators(struct thread *t, u64 stack_id) {
    struct kept_gens *k = &kept_gens[t - threads];
    struct py_scratch *s = &scratch;
    k->stack_id = stack_id;
    k->n = stack_id ? s->ngens : 0;
    memcpy(k->gens, s->gens, k->n * sizeof(u64));
    memcpy(k->codes, s->gen_codes, k->n * sizeof(u64));
}

// Just before a birth's record: the generator frames of its stack, when it had any.
static void emit_generators(struct thread *t) {
    static struct py_gens_rec r;
    struct kept_gens *k = &kept_gens[t - threads];
    if (!k->n || !t->proc->recorded)
        return;
    memset(&r, 0, sizeof r);
    r.ts = now_ns();
    r.pid = (u32)t->proc->tgid;
    r.tid = (u32)t->tid;
    r.type = PY_REC_GENS;
    r.ngens = (u16)k->n;
    r.stack_id = k->stack_id;
    memcpy(r.gens, k->gens, k->n * sizeof(u64));
    memcpy(r.codes, k->codes, k->n * sizeof(u64));
    put_record(&r, sizeof r);
    k->n = 0;
}

// Every frame's code object must be one; send those this process has not been sent (once per
// code object, process and generation, re-sent when the address holds another code object).
static int send_codes(struct thread *t) {
    struct py_config *cfg = &t->proc->cfg;
    struct py_scratch *s = &scratch;
    u64 owner = ((u64)(u32)t->proc->tgid << 32) | cfg->generation;
    for (u32 i = 0; i < s->nframes; i++) {
        u64 code = s->frames[i].code;
        if (target_read(s->code, PY_CODE_READ, (void *)code))
            return -1;
        if (py_u64(s->code, cfg->ob_type & 0xff) != cfg->code_type)
            return -1;
        u32 sum = py_checksum(cfg, s->code);
        struct set_entry *e = set_slot(code_set, code, owner);
        if (!e)
            return -1;
        if (e->used && e->value == sum)
            continue;
        if (!e->used)
            code_count++;
        e->used = 1;
        e->key = code;
        e->key2 = owner;
        e->value = sum;
        emit_code(t, code);
    }
    return 0;
}

// The interned stack id of the thread's Python stack (0: none); flags get PY_STACK_*. Deaths
// ask for the runtime's finalizing flag (a close while the interpreter finalizes is a leak);
// births and forks do not carry it: the analysis reads it on closes only (as the BPF probes,
// which skip the read at births).
#define WITH_FINALIZING 1
#define NO_FINALIZING 0
static u64 capture_stack(struct thread *t, u32 *flags, int want_finalizing) {
    struct proc *p = t->proc;
    if (recording_off)
        return 0;
    if (!p->has_config) {
        *flags |= PY_STACK_NO_PYTHON;
        stat.no_stack++;
        return 0;
    }
    struct py_config *cfg = &p->cfg;
    struct py_scratch *s = &scratch;
    s->ngens = 0;
    mem_begin(t->tid);
    prefetch(&plans[t - threads]);
    learned.n = 0;
    learning = 1;
    // read at births too: the thread's read plan (one process_vm_readv) serves both walks
    u64 finalizing = 0;
    target_read(&finalizing, sizeof finalizing, (void *)cfg->finalizing_addr);
    if (finalizing && want_finalizing)
        *flags |= PY_STACK_FINALIZING;
    find_thread_state(t);
    u32 walk_flags = 0;
    u64 id = s->top ? py_walk(cfg, s, (u32)p->tgid, &walk_flags) | 1 : 0;
    learning = 0;
    if (s->top && s->win)
        plan_window(&learned, s->win, py_u64(s->tstate, cfg->ts_top & 0x1ff) - s->win);
    plans[t - threads] = learned;
    if (!s->top) {
        *flags |= PY_STACK_NO_PYTHON;
        stat.no_stack++;
        return 0;
    }
    *flags |= walk_flags;
    if (!s->nframes) {
        *flags |= PY_STACK_NO_PYTHON;
        stat.no_stack++;
        return 0;
    }
    set_reset_if_full(stack_set, &stack_count);
    set_reset_if_full(code_set, &code_count);
    struct set_entry *e = set_slot(stack_set, id, 0);
    if (e && e->used)
        return id;
    if (send_codes(t)) {
        *flags |= PY_STACK_ERROR;
        return 0;
    }
    emit_stack(t, id, walk_flags);
    if (e) {
        e->used = 1;
        e->key = id;
        stack_count++;
    }
    return id;
}

// ---- fd records -------------------------------------------------------------------------------

static struct fd_event_data rec;

static void begin_event(struct thread *t, u16 type, u16 nr, u64 stack_id, u32 stack_flags) {
    memset(&rec.e, 0, sizeof rec.e);
    rec.e.ts = now_ns();
    rec.e.pid = (u32)t->proc->tgid;
    rec.e.tid = (u32)t->tid;
    rec.e.type = type;
    rec.e.nr = nr;
    rec.e.fd = -1;
    rec.e.fd2 = -1;
    rec.e.stack_id = stack_id;
    rec.e.stack_flags = stack_flags;
}

static void end_event(struct thread *t) {
    if (!t->proc->recorded)
        return;
    put_record(&rec, (u32)(sizeof rec.e + rec.e.datalen));
    stat.events++;
}

static u64 arg_or_zero(const u64 *args, int8_t index) {
    return index == NO_ARG ? 0 : args[index];
}

static void copy_sockaddr(u64 addr, u64 len) {
    if (!addr || !len)
        return;
    if (len > SOCKADDR_MAX)
        len = SOCKADDR_MAX;
    mem_begin(rec.e.pid);
    if (!read_direct(rec.data, addr, len))
        rec.e.datalen = (u32)len;
}

// The fds a successful recvmsg received (SCM_RIGHTS), from every control message: a socket
// with SO_PASSCRED gets SCM_CREDENTIALS first, and one message carries up to SCM_MAX_FD fds.
#define CONTROL_MAX 2048  // control bytes read: SCM_MAX_FD (253) fds and credentials fit
#define CMSG_HEAD 16      // struct cmsghdr on x86_64: u64 len, s32 level, s32 type
#define MAX_RECEIVED (CONTROL_MAX / 4)
static u32 received_fds(pid_t pid, u64 msghdr_addr, s32 *fds) {
    struct {
        u64 name;
        u32 namelen, pad;
        u64 iov, iovlen, control, controllen;  // controllen: what the kernel filled in
        s32 flags;
    } msg;
    static u8 control[CONTROL_MAX];
    mem_begin(pid);
    if (read_direct(&msg, msghdr_addr, sizeof msg) || !msg.control ||
        msg.controllen < CMSG_HEAD + 4)
        return 0;
    u64 len = msg.controllen < CONTROL_MAX ? msg.controllen : CONTROL_MAX;
    if (read_direct(control, msg.control, len))
        return 0;
    u32 n = 0;
    for (u64 at = 0; at + CMSG_HEAD <= len;) {
        struct {
            u64 len;
            s32 level, type;
        } cm;
        memcpy(&cm, control + at, sizeof cm);
        if (cm.len < CMSG_HEAD || cm.len > len - at)
            break;
        if (cm.level == 1 && cm.type == 1) {  // SOL_SOCKET, SCM_RIGHTS
            u32 count = (u32)((cm.len - CMSG_HEAD) / 4);
            memcpy(fds + n, control + at + CMSG_HEAD, count * 4);
            n += count;
        }
        at += (cm.len + 7) & ~7ull;  // CMSG_ALIGN
    }
    return n;
}

// recvmsg's births: the fds it received, one record per DATA_LEN / 4 of them, with the stack
// (walked only for the few recvmsg calls that pass fds).
static void emit_received(struct thread *t, const struct syscall_shape *sh) {
    static s32 fds[MAX_RECEIVED];
    const u64 *a = t->args;
    u32 n = received_fds(t->tid, a[sh->ptr], fds), per_record = DATA_LEN / 4;
    if (!n)
        return;
    u32 flags = 0;
    u64 id = capture_stack(t, &flags, NO_FINALIZING);
    keep_generators(t, id);
    for (u32 at = 0; at < n; at += per_record) {
        emit_generators(t);  // (the first record only: it clears what it sent)
        u32 count = n - at < per_record ? n - at : per_record;
        begin_event(t, EV_BIRTH, sh->nr, id, flags);
        memcpy(rec.data, fds + at, count * 4);
        rec.e.datalen = count * 4;
        rec.e.fd2 = (s32)a[sh->src];
        rec.e.flags = a[sh->flags];
        end_event(t);
    }
}

// A birth's record, at its exit stop (ret: the syscall's return value).
static void emit_birth(struct thread *t, const struct syscall_shape *sh, s64 ret) {
    const u64 *a = t->args;
    if (sh->handling == H_SCM) {
        if (ret >= 0)
            emit_received(t, sh);
        return;
    }
    if (ret >= 0)
        emit_generators(t);
    begin_event(t, ret < 0 ? EV_FAIL : EV_BIRTH, sh->nr, t->stack_id, t->stack_flags);
    if (ret < 0)
        rec.e.err = (s32)-ret;
    else if (sh->handling != H_PAIR)
        rec.e.fd = (s32)ret;
    rec.e.flags = arg_or_zero(a, sh->flags);
    rec.e.arg = arg_or_zero(a, sh->arg);
    mem_begin(t->tid);
    switch (sh->handling) {
    case H_PATH:
        if (sh->flags == FLAGS_DEREF) {
            u64 how_flags = 0;
            target_read(&how_flags, sizeof how_flags, (void *)a[2]);
            rec.e.flags = how_flags;
        }
        rec.e.arg = a[0];
        if (t->path_len != PATH_UNREAD) {
            memcpy(rec.data, pending_paths[t - threads], t->path_len);
            rec.e.datalen = t->path_len;
        } else {
            rec.e.datalen = read_string(rec.data, a[sh->ptr], DATA_LEN);
        }
        break;
    case H_SIMPLE:
        rec.e.fd2 = sh->src == NO_ARG ? -1 : (s32)a[sh->src];
        break;
    case H_PAIR:
        if (ret >= 0) {
            s32 fds[2] = {-1, -1};
            read_direct(fds, a[sh->ptr], sizeof fds);
            rec.e.fd = fds[0];
            rec.e.fd2 = fds[1];
        }
        break;
    case H_ACCEPT:
        rec.e.fd2 = (s32)a[sh->src];
        rec.e.flags = sh->nr == NR_accept4 ? a[3] : 0;
        if (ret >= 0 && a[1] && a[2]) {
            u32 len = 0;
            read_direct(&len, a[2], sizeof len);
            copy_sockaddr(a[1], len);
        }
        break;
    }
    end_event(t);
}

// A syscall recorded at entry (deaths, CLOEXEC changes, addresses).
static void emit_at_entry(struct thread *t, const struct syscall_shape *sh, const u64 *a) {
    u32 flags = 0;
    u64 id = capture_stack(t, &flags, WITH_FINALIZING);
    u64 cmd = a[1] & 0xffffffff;
    switch (sh->handling) {
    case H_CLOSE:
        begin_event(t, EV_CLOSE, sh->nr, id, flags);
        break;
    case H_CLOSE_RANGE:
        begin_event(t, EV_CLOSE_RANGE, sh->nr, id, flags);
        rec.e.arg = a[1];
        rec.e.flags = a[2];
        break;
    case H_CLOEXEC:
        begin_event(t, EV_CLOEXEC, sh->nr, id, flags);
        rec.e.flags = cmd;
        rec.e.arg = sh->nr == NR_ioctl ? cmd == FIOCLEX_ : a[2] & 1;
        break;
    case H_ADDR:
        begin_event(t, EV_ADDR, sh->nr, id, flags);
        rec.e.fd = (s32)a[0];
        copy_sockaddr(a[1], a[2]);
        end_event(t);
        return;
    }
    rec.e.fd = (s32)a[0];
    end_event(t);
}

// Have the stack's read take the path along: as read_string would read it, up to the end of
// its page (a path running onto the next page is read at the exit stop as before).
static void take_path_along(struct thread *t, u64 addr) {
    u64 page_left = BLOCK - (addr & (BLOCK - 1));
    passenger.dst = pending_paths[t - threads];
    passenger.addr = addr;
    passenger.len = addr ? (u32)(page_left < DATA_LEN - 1 ? page_left : DATA_LEN - 1) : 0;
    passenger.got = 0;
}

// read_string's length of a path of which `got` bytes were read (PATH_UNREAD: it would have
// read more, or nothing was read).
static u32 path_length(const char *path, u32 got) {
    const char *nul = memchr(path, 0, got);
    if (nul)
        return (u32)(nul - path);
    return got == DATA_LEN - 1 ? got : PATH_UNREAD;
}

// What a syscall does at entry: 1 if its exit stop is needed.
static int on_syscall_entry(struct thread *t, long nr, const u64 *args) {
    const struct syscall_shape *sh = shape_of(nr);
    if (!sh)
        return 0;
    u64 cmd = args[1] & 0xffffffff;
    if (sh->handling == H_EXECVE) {
        mem_begin(t->tid);
        t->proc->exec_path_len = read_string(t->proc->exec_path, args[0], DATA_LEN);
        return 0;
    }
    if (sh->nr == NR_fcntl && cmd == F_SETFD_) {  // fcntl is a birth but for this command
        static const struct syscall_shape setfd = {NR_fcntl, H_CLOEXEC, NO_ARG, NO_ARG,
                                                   NO_ARG, NO_ARG, 0};
        emit_at_entry(t, &setfd, args);
        return 0;
    }
    if (sh->check) {  // attach mode has no filter: the same argument checks, here
        const struct filter_check *c = &FILTER_CHECKS[sh->check];
        int match = 0;
        for (int i = 0; i < c->nvalues; i++)
            match |= (args[c->arg] & 0xffffffff) == c->values[i];
        if (!match)
            return 0;
    }
    if (!is_birth(sh)) {
        emit_at_entry(t, sh, args);
        return 0;
    }
    t->pending = sh;
    memcpy(t->args, args, sizeof t->args);
    t->stack_flags = 0;
    if (sh->handling == H_PATH)
        take_path_along(t, args[sh->ptr]);
    t->stack_id = sh->handling == H_SCM ? 0 : capture_stack(t, &t->stack_flags, NO_FINALIZING);
    keep_generators(t, t->stack_id);
    char *path = pending_paths[t - threads];
    t->path_len = passenger.len ? path_length(path, passenger.got) : PATH_UNREAD;
    passenger.len = 0;
    return 1;
}

// Syscalls that always return a new descriptor: recorded even when their entry was not seen
// (in flight when attaching), like the probes' ARGS_UNKNOWN.
static int returns_new_fd(long nr) {
    const struct syscall_shape *sh = shape_of(nr);
    return sh && (sh->handling == H_PATH || sh->handling == H_ACCEPT ||
                  (sh->handling == H_SIMPLE && nr != NR_fcntl && nr != NR_signalfd &&
                   nr != NR_signalfd4));
}

static void on_syscall_exit(struct thread *t, s64 ret) {
    if (ret <= -ERESTART_FIRST && ret >= -ERESTART_LAST)
        return;  // interrupted: it runs again (and stops again) after the signal
    const struct syscall_shape *sh = t->pending;
    t->pending = NULL;
    if (sh) {
        emit_birth(t, sh, ret);
        return;
    }
    struct user_regs_struct regs;
    if (ret < 0 || ptrace(PTRACE_GETREGS, t->tid, 0, &regs) || !returns_new_fd((long)regs.orig_rax))
        return;
    u32 flags = 0;
    u64 id = capture_stack(t, &flags, NO_FINALIZING);
    keep_generators(t, id);
    emit_generators(t);
    begin_event(t, EV_BIRTH, (u16)regs.orig_rax, id, flags);
    rec.e.fd = (s32)ret;
    end_event(t);
}

// ---- seccomp filter ---------------------------------------------------------------------------

#define MAX_FILTER 256
#define LOAD_WORD (BPF_LD | BPF_W | BPF_ABS)

// RET_TRACE for the table's syscalls, ALLOW for all others: one load of the number, one compare
// per syscall; those with an argument check jump to a block of their own after the returns
// (cBPF jumps only forward, at most 255 instructions).
static int build_filter(struct sock_filter *f) {
    int n = 0;
    f[n++] = (struct sock_filter)BPF_STMT(LOAD_WORD, offsetof(struct seccomp_data, arch));
    f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0);
    f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    f[n++] = (struct sock_filter)BPF_STMT(LOAD_WORD, offsetof(struct seccomp_data, nr));
    int allow = n + (int)N_SHAPES, trace = allow + 1, block = trace + 1;
    for (size_t i = 0; i < N_SHAPES; i++, n++) {
        int target = trace;
        if (SHAPES[i].check) {  // block: load the argument, compare, allow, trace
            const struct filter_check *c = &FILTER_CHECKS[SHAPES[i].check];
            int at = block;
            target = block;
            f[at++] = (struct sock_filter)BPF_STMT(
                LOAD_WORD, offsetof(struct seccomp_data, args) + 8 * c->arg);  // low half
            for (int v = 0; v < c->nvalues; v++, at++)
                f[at] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, c->values[v],
                                                     (u8)(c->nvalues - v), 0);
            f[at++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
            f[at++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRACE);
            block = at;
        }
        int jt = target - n - 1;
        if (jt > 255 || block > MAX_FILTER) {
            fprintf(stderr, "cmtrace-ptrace-engine: seccomp filter too long\n");
            _exit(EXIT_INTERNAL);
        }
        f[n] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SHAPES[i].nr, (u8)jt, 0);
    }
    f[allow] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    f[trace] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRACE);
    return block;
}

#ifndef SECCOMP_FILTER_FLAG_SPEC_ALLOW
#define SECCOMP_FILTER_FLAG_SPEC_ALLOW (1UL << 2)
#endif

// seccomp(2) with SPEC_ALLOW: where the kernel mitigates speculative store bypass "for seccomp"
// (spec_store_bypass_disable=seccomp, the default on affected CPUs), a filter would otherwise
// turn SSBD on for the command, slowing code that makes no syscall at all; the command keeps
// the mitigation state it has without cmtrace. Kernels before 4.17 do not know the flag.
static int set_filter(struct sock_fprog *prog) {
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_SPEC_ALLOW, prog) == 0)
        return 0;
    if (errno != EINVAL)
        return -1;
    return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, prog);
}

// In the child, after the engine has seized it. Without CAP_SYS_ADMIN the kernel wants
// NO_NEW_PRIVS first (set-uid programs then run without their privileges).
static void install_filter(void) {
    static struct sock_filter f[MAX_FILTER];
    struct sock_fprog prog = {(unsigned short)build_filter(f), f};
    if (set_filter(&prog) == 0)
        return;
    if (errno == EACCES && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 && set_filter(&prog) == 0)
        return;
    fprintf(stderr, "cmtrace-ptrace-engine: seccomp filter refused: %s\n", strerror(errno));
    _exit(EXIT_EXEC_FAILED);
}

// ---- control channel --------------------------------------------------------------------------

static int ctl_fd = -1;
static volatile sig_atomic_t ctl_signal, stop_signal, tick;
static int attach_mode, use_seccomp = 1, follow, hold_exec;
static pid_t root_pid;
static int detach_requested;
// The collector said stop (CTL_STOP), or (attach) a stop signal came: no exec is held any more,
// so a held process never keeps a Ctrl-C waiting (run: the command runs on to its end).
static int stopping;

static void stop_recording(void) {
    flush_records();
    recording_off = 1;
    out_len = 0;
    if (out_fd >= 0)
        close(out_fd);
    out_fd = -1;
}

static void apply_control(const struct ctl_msg *m) {
    struct proc *p = find_proc((pid_t)m->pid, m->kind == CTL_CONFIG);
    switch (m->kind) {
    case CTL_CONFIG:
        if (p) {
            p->cfg = m->config;
            p->has_config = 1;
        }
        break;
    case CTL_FORGET:
        if (p)
            p->has_config = 0;
        break;
    case CTL_RESUME:
        // Configured (or given up): no more holds, not even one asked for earlier (CTL_HOLD_NEXT)
        // that has not begun yet. A resume read while the thread ran on to its next stop, or
        // while another thread's hold had the engine waiting, was lost, and the thread then
        // stayed held at that stop for good (a subprocess child of a shared-libpython build:
        // the 300 s hang of stdlib_leaks under pyenv 3.10).
        for (int i = 0; i < MAX_THREADS; i++)
            if (threads[i].used && threads[i].tid == (pid_t)m->pid)
                threads[i].held = threads[i].hold_next = 0;
        break;
    case CTL_HOLD_NEXT:
        for (int i = 0; i < MAX_THREADS; i++)
            if (threads[i].used && threads[i].tid == (pid_t)m->pid) {
                threads[i].held = 0;
                threads[i].hold_next = 1;
            }
        break;
    case CTL_STOP:
        stopping = 1;
        if (attach_mode)
            detach_requested = 1;
        else
            stop_recording();  // run: the command runs to its end, unrecorded
        break;
    }
}

// Read whole messages; blocking: wait until at least one arrives (or the channel closes).
static int read_control(int blocking) {
    static struct ctl_msg m;
    static size_t have;
    if (ctl_fd < 0)
        return -1;
    int flags = fcntl(ctl_fd, F_GETFL);
    fcntl(ctl_fd, F_SETFL, blocking ? flags & ~O_NONBLOCK : flags | O_NONBLOCK);
    for (;;) {
        ssize_t n = read(ctl_fd, (char *)&m + have, sizeof m - have);
        if (n < 0 && errno == EINTR && !blocking)
            continue;
        if (n < 0 && errno == EINTR)
            return 0;
        if (n < 0)
            return 0;  // EAGAIN: nothing more now
        if (n == 0) {  // the collector is gone: nothing will be held or configured any more
            close(ctl_fd);
            ctl_fd = -1;
            return -1;
        }
        have += (size_t)n;
        if (have == sizeof m) {
            have = 0;
            apply_control(&m);
            if (blocking)
                return 1;
        }
    }
}

static void service_control(void) {
    if (ctl_signal || tick) {
        ctl_signal = 0;
        read_control(0);
    }
}

// ---- ptrace plumbing --------------------------------------------------------------------------

static long trace_options(void) {
    long o = PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACECLONE | PTRACE_O_TRACEFORK |
             PTRACE_O_TRACEVFORK | PTRACE_O_TRACEEXEC | PTRACE_O_TRACEEXIT;
    if (!attach_mode)
        o |= PTRACE_O_EXITKILL | (use_seccomp ? PTRACE_O_TRACESECCOMP : 0);
    return o;
}

// Without the filter every syscall stops; with it, only the exit stop of a birth is asked for.
static void resume(struct thread *t, int sig) {
    int req = (!use_seccomp || attach_mode || t->pending) ? PTRACE_SYSCALL : PTRACE_CONT;
    if (ptrace(req, t->tid, 0, sig) < 0 && errno != ESRCH)
        fprintf(stderr, "cmtrace-ptrace-engine: resume %d: %s\n", t->tid, strerror(errno));
}

static int seize(pid_t tid) {
    if (ptrace(PTRACE_SEIZE, tid, 0, trace_options()) == 0)
        return 0;
    int err = errno;
    fprintf(stderr, "cmtrace-ptrace-engine: cannot trace %d: %s\n", tid, strerror(err));
    return err;
}

static void emit_fork(struct thread *parent, pid_t child_pid, u64 clone_flags) {
    u32 flags = 0;
    u64 id = capture_stack(parent, &flags, NO_FINALIZING);
    begin_event(parent, EV_FORK, 0, id, flags);
    rec.e.arg = (u64)child_pid;
    rec.e.flags = clone_flags;
    end_event(parent);
}

// The flags of the clone that made `event`: read from the parent's registers (still in it).
static u64 clone_flags_of(struct thread *t, int event) {
    if (event == PTRACE_EVENT_FORK)
        return 0;
    if (event == PTRACE_EVENT_VFORK)
        return CLONE_VM_VFORK_;
    struct user_regs_struct regs;
    if (ptrace(PTRACE_GETREGS, t->tid, 0, &regs))
        return 0;
    if (regs.orig_rax == NR_clone3) {
        u64 flags = 0;
        mem_begin(t->tid);
        read_direct(&flags, regs.rdi, sizeof flags);
        return flags;
    }
    return regs.rdi;
}

// Detach a task in a ptrace stop, handing on the signal it was about to get (a group-stopped
// one stays stopped).
static void release_task(struct thread *t, int sig) {
    ptrace(PTRACE_DETACH, t->tid, 0, sig);
    drop_thread(t);
}

// The process a new child belongs to: its own slot (run mode traces every child, and records
// it with -f; attach mode with -f), released_proc (attach mode without -f) or, procs[] being
// full, untracked_proc.
static struct proc *child_proc(struct proc *parent, pid_t child) {
    if (attach_mode && !follow)
        return &released_proc;
    struct proc *c = find_proc(child, 1);
    if (!c) {
        stat.untracked++;
        return &untracked_proc;
    }
    c->cfg = parent->cfg;  // same interpreter at the same addresses, same generation
    c->has_config = parent->has_config;
    c->recorded = parent->recorded && follow;  // run mode traces children regardless
    memcpy(c->comm, parent->comm, sizeof c->comm);
    return c;
}

// A task whose first stop came before its parent's event was left stopped, so that none of its
// syscalls go by unrecorded: it runs from here, in its process.
static void file_task(struct thread *t, struct proc *p) {
    t->proc = p;
    t->unfiled = 0;
    if (p == &released_proc)
        release_task(t, t->unfiled_sig == LISTEN_AT_FILING ? 0 : t->unfiled_sig);
    else if (t->unfiled_sig == LISTEN_AT_FILING)
        ptrace(PTRACE_LISTEN, t->tid, 0, 0);
    else
        resume(t, t->unfiled_sig);
}

static void on_new_task(struct thread *parent, int event) {
    unsigned long child = 0;
    ptrace(PTRACE_GETEVENTMSG, parent->tid, 0, &child);
    u64 flags = clone_flags_of(parent, event);
    struct proc *p = parent->proc;
    if (!(flags & CLONE_THREAD_)) {
        emit_fork(parent, (pid_t)child, flags);
        p = child_proc(p, (pid_t)child);
    }
    struct thread *t = find_thread((pid_t)child);
    if (t && t->unfiled)
        file_task(t, p);
    else if (!t)
        add_thread((pid_t)child, p);
}

static void read_comm(struct proc *p) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/comm", p->tgid);
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    if (fgets(p->comm, sizeof p->comm, f))
        p->comm[strcspn(p->comm, "\n")] = 0;
    fclose(f);
}

static void emit_exit(struct thread *t) {
    struct proc *p = t->proc;
    if (p->exit_sent)
        return;
    p->exit_sent = 1;
    begin_event(t, EV_EXIT, NR_exit, 0, 0);
    memcpy(rec.data, p->comm, 16);
    rec.e.datalen = 16;
    end_event(t);
}

// Wait, after an exec, for the collector to have configured (or declined) the new image.
static void hold_until_resumed(struct thread *t) {
    flush_records();
    t->held = 1;
    // a signal interrupts the blocking read: attach mode then detaches (the caller resumes
    // the thread first, so that detach_all's interrupt gets a stop to wait for)
    while (t->held && ctl_fd >= 0 && !stopping && !(attach_mode && stop_signal))
        if (read_control(1) < 0)
            break;
    t->held = 0;
}

static void on_exec(struct thread *t) {
    unsigned long old_tid = 0;
    ptrace(PTRACE_GETEVENTMSG, t->tid, 0, &old_tid);
    struct proc *p = t->proc;
    // the other threads are gone; a non-leader that exec'd now has the leader's tid
    for (int i = 0; i < MAX_THREADS; i++)
        if (threads[i].used && threads[i].proc == p && &threads[i] != t)
            drop_thread(&threads[i]);
    p->has_config = 0;  // another image: the collector configures it again
    t->tstate = 0;
    plans[t - threads].n = 0;
    t->key = 0;
    t->key_tries = 0;
    t->pending = NULL;
    t->phase_known = 0;  // a non-leader's exec took the leader's tid: ask again at the next stop
    begin_event(t, EV_EXEC, NR_execve, 0, 0);
    if (p->exec_path_len) {
        memcpy(rec.data, p->exec_path, p->exec_path_len);
        rec.e.datalen = p->exec_path_len;
    } else {
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/exe", t->tid);
        ssize_t n = readlink(path, rec.data, DATA_LEN - 1);
        rec.e.datalen = n > 0 ? (u32)n : 0;
    }
    rec.e.arg = old_tid;
    end_event(t);
    p->exec_path_len = 0;
    read_comm(p);
    if (hold_exec && p->recorded)
        hold_until_resumed(t);
}

static void on_syscall_stop(struct thread *t) {
    struct __ptrace_syscall_info info;
    if (recording_off) {  // run: served, not recorded (resumed with PTRACE_CONT: no exit stop)
        t->pending = NULL;
        return;
    }
    int every_syscall = !use_seccomp || attach_mode;
    if (every_syscall && t->phase_known && t->in_syscall && !t->pending) {
        t->in_syscall = 0;  // the exit of a syscall recorded at its entry, or not at all
        return;
    }
    if (ptrace(PTRACE_GET_SYSCALL_INFO, t->tid, sizeof info, &info) <= 0) {
        t->phase_known = 0;
        return;
    }
    t->phase_known = info.op == PTRACE_SYSCALL_INFO_ENTRY || info.op == PTRACE_SYSCALL_INFO_EXIT;
    t->in_syscall = info.op == PTRACE_SYSCALL_INFO_ENTRY;
    if (info.op == PTRACE_SYSCALL_INFO_ENTRY) {
        // A birth interrupted by a signal (-ERESTART*) waits for its exit, but the next exit
        // stop may be a signal handler's syscall or its rt_sigreturn (whose "result" is the
        // restored rax: the syscall number). Whatever enters now is not that birth: its
        // restart enters, and stops, again.
        t->pending = NULL;
        // With the filter, an entry stop only shows up while a birth waits for its exit (a
        // restarted syscall): its seccomp stop follows.
        if (!use_seccomp || attach_mode)
            on_syscall_entry(t, (long)info.entry.nr, (const u64 *)info.entry.args);
    } else if (info.op == PTRACE_SYSCALL_INFO_EXIT) {
        on_syscall_exit(t, info.exit.rval);
    } else if (info.op == PTRACE_SYSCALL_INFO_SECCOMP) {
        on_syscall_entry(t, (long)info.seccomp.nr, (const u64 *)info.seccomp.args);
    }
}

static int is_stop_signal(int sig) {
    return sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU;
}

// One ptrace stop of a known thread. Returns the signal to deliver when resuming.
static int on_stop(struct thread *t, int status, int *listen) {
    int sig = WSTOPSIG(status), event = (unsigned)status >> 16;
    *listen = 0;
    if (sig == (SIGTRAP | 0x80)) {
        on_syscall_stop(t);
        return 0;
    }
    if (sig != SIGTRAP && event != PTRACE_EVENT_STOP)
        return sig;  // a signal on its way to the thread: hand it on
    switch (event) {
    case PTRACE_EVENT_SECCOMP:
        on_syscall_stop(t);
        return 0;
    case PTRACE_EVENT_CLONE:
    case PTRACE_EVENT_FORK:
    case PTRACE_EVENT_VFORK:
        on_new_task(t, event);
        return 0;
    case PTRACE_EVENT_EXEC:
        on_exec(t);
        return 0;
    case PTRACE_EVENT_EXIT:
        if (t->tid == t->proc->tgid)
            read_comm(t->proc);
        return 0;
    case PTRACE_EVENT_STOP:
        // SIGSTOP & co: a group stop; stay stopped (PTRACE_LISTEN) until SIGCONT
        *listen = is_stop_signal(sig);
        return 0;
    default:
        return 0;
    }
}

static void on_gone(pid_t tid, int status) {
    struct thread *t = find_thread(tid);
    if (!t)
        return;
    if (tid == t->proc->tgid) {
        emit_exit(t);
        if (tid == root_pid && !attach_mode)
            root_pid = -(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status)) - 1;
        drop_proc(t->proc);  // its leader is reported gone after every other thread
    }
    drop_thread(t);
}

// ---- attach / detach --------------------------------------------------------------------------

// Seize every thread, re-reading the task list until no new thread shows up.
static int attach_all(pid_t pid) {
    struct proc *p = find_proc(pid, 1);
    p->recorded = 1;
    read_comm(p);
    for (int again = 1; again;) {
        again = 0;
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/task", pid);
        DIR *d = opendir(path);
        if (!d) {
            fprintf(stderr, "cmtrace-ptrace-engine: no process %d\n", pid);
            return ESRCH;
        }
        struct dirent *e;
        while ((e = readdir(d))) {
            pid_t tid = atoi(e->d_name);
            if (tid <= 0 || find_thread(tid))
                continue;
            int err = seize(tid);
            if (err == ESRCH)
                continue;  // exited meanwhile
            if (err) {
                closedir(d);
                return err;
            }
            add_thread(tid, p);
            ptrace(PTRACE_INTERRUPT, tid, 0, 0);  // its first stop: then PTRACE_SYSCALL
            again = 1;
        }
        closedir(d);
    }
    return 0;
}

// Every tracee must be in a ptrace stop to be detached: interrupt, wait for its stop, detach,
// handing back a signal it was about to receive. A group-stopped thread stays stopped.
static void detach_all(void) {
    flush_records();
    for (int i = 0; i < MAX_THREADS; i++) {
        struct thread *t = &threads[i];
        if (!t->used)
            continue;
        if (t->unfiled) {  // in a stop already waited for: no other stop would come
            ptrace(PTRACE_DETACH, t->tid, 0, t->unfiled_sig > 0 ? t->unfiled_sig : 0);
            drop_thread(t);
            continue;
        }
        ptrace(PTRACE_INTERRUPT, t->tid, 0, 0);
        int status, sig = 0;
        for (;;) {
            if (waitpid(t->tid, &status, __WALL) < 0) {
                if (errno == EINTR)
                    continue;
                break;
            }
            if (WIFEXITED(status) || WIFSIGNALED(status))
                break;
            int s = WSTOPSIG(status), event = (unsigned)status >> 16;
            if (s != SIGTRAP && s != (SIGTRAP | 0x80) && event == 0)
                sig = s;  // signal-delivery stop
            ptrace(PTRACE_DETACH, t->tid, 0, sig);
            break;
        }
        drop_thread(t);
    }
}

// ---- run mode ---------------------------------------------------------------------------------

static int start_command(char **argv) {
    int go[2];
    if (pipe2(go, O_CLOEXEC))
        return -1;
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        char c;
        close(go[1]);
        if (read(go[0], &c, 1) != 1)  // the engine died before seizing us
            _exit(EXIT_EXEC_FAILED);
        if (use_seccomp)
            install_filter();
        execvp(argv[0], argv);
        fprintf(stderr, "cmtrace-ptrace-engine: cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(EXIT_EXEC_FAILED);
    }
    close(go[0]);
    root_pid = pid;
    int err = seize(pid);
    if (err) {
        kill(pid, SIGKILL);
        return err;
    }
    struct proc *p = find_proc(pid, 1);
    p->recorded = 1;
    read_comm(p);
    struct thread *t = add_thread(pid, p);
    if (!use_seccomp) {  // PTRACE_SYSCALL needs a stopped tracee: stop it once first
        int status;
        ptrace(PTRACE_INTERRUPT, pid, 0, 0);
        waitpid(pid, &status, __WALL);
        resume(t, 0);
    }
    if (write(go[1], "g", 1) != 1)
        return -1;
    close(go[1]);
    return 0;
}

// ---- main loop --------------------------------------------------------------------------------

static void on_signal(int sig) {
    if (sig == SIGUSR1)
        ctl_signal = 1;
    else if (sig == SIGALRM)
        tick = 1;
    else
        stop_signal = sig;
}

static void install_handlers(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;  // no SA_RESTART: a blocked waitpid returns EINTR
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGALRM, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    arm_tick(IDLE_TICK_MS);
}

// SIGINT/SIGTERM: attach mode detaches; run mode passes SIGTERM/SIGHUP on to the command (a
// terminal's Ctrl-C reaches the command's process group by itself) and records to its end.
static void service_stop_signal(void) {
    int sig = stop_signal;
    stop_signal = 0;
    if (attach_mode)
        detach_requested = 1;
    else if (sig != SIGINT && root_pid > 0)
        kill(root_pid, sig);
}

static void run_loop(double duration) {
    u64 deadline = duration > 0 ? now_ns() + (u64)(duration * 1e9) : 0;
    while (live_threads > 0) {
        if (stop_signal)
            service_stop_signal();
        service_control();
        if (tick) {
            tick = 0;
            flush_records();
            if (deadline && now_ns() >= deadline && attach_mode)
                detach_requested = 1;
        }
        if (detach_requested) {
            detach_all();
            return;
        }
        int status;
        pid_t tid = waitpid(-1, &status, __WALL);
        if (tid < 0) {
            if (errno == EINTR)
                continue;
            break;  // ECHILD: nothing left
        }
        if (WIFEXITED(status) || WIFSIGNALED(status)) {
            on_gone(tid, status);
            continue;
        }
        stat.stops++;
        struct thread *t = find_thread(tid);
        int listen = 0;
        if (!t) {  // a new task whose first stop came before its parent's event: it waits
            t = add_thread(tid, &unfiled_proc);
            t->unfiled = 1;
        }
        int sig = on_stop(t, status, &listen);
        if (t->unfiled) {
            t->unfiled_sig = listen ? LISTEN_AT_FILING : sig;
            continue;
        }
        if (t->proc == &released_proc) {
            release_task(t, listen ? 0 : sig);
            continue;
        }
        if (t->hold_next) {  // the collector waits for CPython to be loaded: stop here too
            t->hold_next = 0;
            hold_until_resumed(t);
        }
        if (listen)
            ptrace(PTRACE_LISTEN, tid, 0, 0);
        else
            resume(t, sig);
    }
}

static void write_stats(int fd, int exit_code) {
    char line[512];
    int n = snprintf(line, sizeof line,
                     "{\"stops\": %ld, \"events\": %ld, \"stacks\": %ld, \"codes\": %ld, "
                     "\"reads\": %ld, \"read_bytes\": %ld, \"no_stack\": %ld, "
                     "\"write_errors\": %ld, \"dropped\": %ld, \"threads\": %ld, "
                     "\"processes\": %ld, \"untracked\": %ld, \"exit_code\": %d}\n",
                     stat.stops, stat.events, stat.stacks, stat.codes, stat.reads, stat.read_bytes,
                     stat.no_stack, stat.write_errors, stat.dropped, stat.threads_seen,
                     stat.processes_seen, stat.untracked, exit_code);
    if (write(fd, line, (size_t)n) < 0)
        return;
}

static int parse_fd(const char *s) {
    char *end;
    long v = strtol(s, &end, 10);
    if (*end || v < 0) {
        fprintf(stderr, "cmtrace-ptrace-engine: bad fd %s\n", s);
        exit(EXIT_USAGE);
    }
    fcntl((int)v, F_SETFD, FD_CLOEXEC);  // never inherited by the command
    return (int)v;
}

int main(int argc, char **argv) {
    int stats_fd = 2, opt;
    pid_t attach = 0;
    double duration = 0;
    while ((opt = getopt(argc, argv, "+o:c:s:fHnp:d:")) != -1) {
        switch (opt) {
        case 'o': out_fd = parse_fd(optarg); break;
        case 'c': ctl_fd = parse_fd(optarg); break;
        case 's': stats_fd = parse_fd(optarg); break;
        case 'f': follow = 1; break;
        case 'H': hold_exec = 1; break;
        case 'n': use_seccomp = 0; break;
        case 'p': attach = (pid_t)atoi(optarg); attach_mode = 1; break;
        case 'd': duration = atof(optarg); break;
        default: return EXIT_USAGE;
        }
    }
    if (!attach_mode && optind >= argc) {
        fprintf(stderr, "usage: cmtrace-ptrace-engine [-o FD] [-c FD] [-s FD] [-f] [-H] [-n] "
                        "-- CMD ARGS... | -p PID [-d SECS]\n");
        return EXIT_USAGE;
    }
    for (size_t i = 0; i < N_SHAPES; i++)
        shape_by_nr[SHAPES[i].nr] = &SHAPES[i];
    install_handlers();
    int err = attach_mode ? attach_all(attach) : start_command(argv + optind);
    if (err) {
        detach_all();
        write_stats(stats_fd, err == EPERM ? EXIT_PTRACE_REFUSED : EXIT_INTERNAL);
        return err == EPERM ? EXIT_PTRACE_REFUSED : EXIT_INTERNAL;
    }
    run_loop(duration);
    flush_records();
    int exit_code = root_pid < 0 ? -root_pid - 1 : 0;
    write_stats(stats_fd, exit_code);
    return exit_code;
}
