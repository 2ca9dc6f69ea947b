// cmtrace fd-lifecycle probes: every descriptor's birth and death in the traced processes.
//
// Compiled by bcc at run time (cmtrace/collect.py), attached to syscall tracepoints only (no
// kprobes/fentry needed). Design:
//   - one generic program for all sys_enter_* and one for all sys_exit_* we care about: the
//     syscall tracepoints share a layout (nr at +8, six 8-byte args from +16, ret at +16);
//   - the pid filter is a hash of traced tgids, checked first by every program;
//   - births that return an fd stash their arguments at entry (per tid) and emit at exit;
//     deaths and flag changes emit at entry (close releases the fd even if it fails);
//   - records go to one ring buffer, submitted without wake-ups (the collector drains it in
//     batches); records the kernel could not reserve are counted per CPU, never silently lost.
// Macros set by the collector: RINGBUF_PAGES, MAX_TRACED, CMTRACE_CALLS (--calls), and for
// --aggregate CMTRACE_AGGREGATE, AGG_LIVE_MAX, AGG_PAIRS_MAX (see "Aggregation" below).

#include <uapi/linux/ptrace.h>
#include <linux/sched.h>
#include <linux/version.h>

// Task-local storage in tracepoint programs (5.12+): per-thread state kept with the task, no
// hash by tid. Older kernels (cmtrace needs 5.8) keep the LRU hashes by tid.
#if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 12, 0) && !defined(CMTRACE_NO_TASK_STORAGE)
#define CMTRACE_TASK_STORAGE 1
#endif

#include "events.h"

struct sys_enter_ctx {
    u64 common;
    s32 nr;
    s32 pad;
    u64 args[6];
};

struct sys_exit_ctx {
    u64 common;
    s32 nr;
    s32 pad;
    s64 ret;
};

struct stash_t {
    u64 nr;
    u64 args[6];
};

// tgid -> (--aggregate) the birth time up to which user space shipped this process's live fds
// (at its exec or close_range); 0 otherwise. Present = traced.
BPF_HASH(traced, u32, u64, MAX_TRACED);
BPF_ARRAY(settings, u32, SETTINGS_COUNT);  // enum settings_index (events.h)
// The arguments of a syscall in flight, kept with the task (task-local storage): no hashing and
// no LRU lists. The LRU hash by tid it replaces cost ~100 ns of BPF time per open/close pair
// (update at entry, lookup and delete at exit). `pending` tells a stash from a slot left empty;
// a slot goes away with its task.
struct stash_slot {
    struct stash_t s;
    u64 pending;
};
#ifdef CMTRACE_TASK_STORAGE
BPF_TASK_STORAGE(stash, struct stash_slot);
#else
BPF_TABLE("lru_hash", u32, struct stash_slot, stash, 65536);
#endif
BPF_PERCPU_ARRAY(lost, u64, 1);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

// With Python stacks the collector pastes the walker in place of this line; otherwise the
// header's no-op stubs compile (events then carry STACK_NO_PYTHON).
#include "pystack.h"

static __always_inline struct stash_slot *stash_slot(u64 create) {
#ifdef CMTRACE_TASK_STORAGE
    struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
    return stash.task_storage_get(task, 0, create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
#else
    u32 tid = bpf_get_current_pid_tgid();
    if (!create)
        return stash.lookup(&tid);
    struct stash_slot empty = {};
    return stash.lookup_or_try_init(&tid, &empty);
#endif
}

// This thread's syscall now entering stashes its arguments for its exit.
static __always_inline void stash_put(struct stash_t *s) {
    struct stash_slot *slot = stash_slot(1);
    if (slot) {
        slot->s = *s;
        slot->pending = 1;
    }
}

// The arguments this thread stashed, if any (they stay until stash_clear).
static __always_inline struct stash_t *stash_peek(void) {
    struct stash_slot *slot = stash_slot(0);
    return slot && slot->pending ? &slot->s : NULL;
}

// Moves this thread's stashed arguments into *out (1), or says there were none (0): one
// storage lookup for the peek and the clear of every exit.
static __always_inline int stash_take(struct stash_t *out) {
    struct stash_slot *slot = stash_slot(0);
    if (!slot || !slot->pending)
        return 0;
    *out = slot->s;
    slot->pending = 0;
    return 1;
}

static __always_inline void stash_clear(void) {
    struct stash_slot *slot = stash_slot(0);
    if (slot)
        slot->pending = 0;
}

static __always_inline int is_traced(u32 tgid) {
    return traced.lookup(&tgid) != NULL;
}

static __always_inline void count_lost(void) {
    u32 zero = 0;
    u64 *n = lost.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
}

static __always_inline void fill(struct fd_event *e, u64 pid_tgid, u16 type, u16 nr,
                                 u64 stack_id, u32 stack_flags) {
    e->ts = bpf_ktime_get_ns();
    e->pid = pid_tgid >> 32;
    e->tid = (u32)pid_tgid;
    e->type = type;
    e->nr = nr;
    e->fd = -1;
    e->fd2 = -1;
    e->err = 0;
    e->flags = 0;
    e->arg = 0;
    e->stack_id = stack_id;
    e->stack_flags = stack_flags;
    e->datalen = 0;
}

// The Python stack is captured (once per program: the walker is large and the verifier checks
// every inlined copy) before the record is reserved, so that the stack and code records it may
// emit precede this event in the ring.
struct stack_ref {
    u64 id;
    u32 flags;
};

// Deaths ask for the interpreter's finalizing flag (PY_STACK_FINALIZING: a close during
// finalization is a leak); births and forks do not, which saves them a memory read.
#define WITH_FINALIZING 1
#define NO_FINALIZING 0
static __always_inline struct stack_ref python_stack(void *ctx, u64 pid_tgid, int finalizing) {
    struct stack_ref st = {};
    st.id = capture_python_stack(ctx, pid_tgid, &st.flags, finalizing);
    return st;
}

static __always_inline struct fd_event *reserve_small(struct stack_ref *st, u64 pid_tgid, u16 type,
                                                      u16 nr) {
    u64 sid = st->id;
    u32 sflags = st->flags;
    struct fd_event *e = events.ringbuf_reserve(sizeof(struct fd_event));
    if (!e) {
        count_lost();
        return NULL;
    }
    fill(e, pid_tgid, type, nr, sid, sflags);
    return e;
}

static __always_inline struct fd_event_data *reserve_data(struct stack_ref *st, u64 pid_tgid,
                                                          u16 type, u16 nr) {
    u64 sid = st->id;
    u32 sflags = st->flags;
    struct fd_event_data *d = events.ringbuf_reserve(sizeof(struct fd_event_data));
    if (!d) {
        count_lost();
        return NULL;
    }
    fill(&d->e, pid_tgid, type, nr, sid, sflags);
    return d;
}

static __always_inline void submit_small(struct fd_event *e) {
    events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

static __always_inline void submit_data(struct fd_event_data *d) {
    events.ringbuf_submit(d, BPF_RB_NO_WAKEUP);
}

// ---------------------------------------------------------------------------------------------
// Aggregation (--aggregate). Births of single fds wait in `agg_live` (the whole record, so it
// can be shipped later as it was); a close of one never shipped counts in `agg_pairs` per
// (pid, death, open stack, close stack) with a log2 lifetime histogram, and ships nothing once
// user space has seen that pair's first close (AGG_PAIR_COUNT). Shipped instead, birth and
// close: a pair's first close (its sample), every close of a pair user space marked
// AGG_PAIR_SHIP, closes while the interpreter finalizes, and closes of fds already shipped.
// User space ships, from the map, fds older than --min-age (births up to agg_mark[0]), those of
// a process at its exit, exec and close_range (births up to traced[pid]), and all at the end.
// A birth onto a live entry (dup2, or an fd that died unseen at exec) ships both births. Full
// maps fall back to full history for the fd and are counted in agg_full.
#ifdef CMTRACE_AGGREGATE
struct live_key {
    u32 pid;
    s32 fd;
};

struct live_fd {
    struct fd_event_data birth;
    u64 shipped;  // the kernel shipped this birth already
};

struct pair_key {
    u32 pid;
    u32 death;  // syscall nr of the close
    u64 open_stack;
    u64 close_stack;
};

struct pair_val {
    u64 count;
    u64 state;  // enum agg_pair_state
    u64 hist[AGG_HIST_BUCKETS];
};

BPF_HASH(agg_live, struct live_key, struct live_fd, AGG_LIVE_MAX);
BPF_HASH(agg_pairs, struct pair_key, struct pair_val, AGG_PAIRS_MAX);
BPF_PERCPU_ARRAY(agg_full, u64, AGG_FULL_COUNT);
BPF_PERCPU_ARRAY(agg_birth, struct live_fd, 1);  // the birth being built
BPF_ARRAY(agg_zero, struct pair_val, 1);         // a new pair's value (too big for the stack)
BPF_ARRAY(agg_mark, u64, 1);                     // [0] births up to this time were shipped

static __always_inline void agg_count_full(u32 index) {
    u64 *n = agg_full.lookup(&index);
    if (n)
        __sync_fetch_and_add(n, 1);
}

static __always_inline void agg_ship(struct live_fd *lf, u32 from_live) {
    if (from_live)
        lf->birth.e.stack_flags |= AGG_FROM_LIVE;
    if (events.ringbuf_output(&lf->birth, sizeof(lf->birth), BPF_RB_NO_WAKEUP))
        count_lost();
    lf->shipped = 1;
}

static __always_inline struct fd_event_data *reserve_birth(struct stack_ref *st, u64 pid_tgid,
                                                           u16 type, u16 nr) {
    u64 sid = st->id;
    u32 sflags = st->flags;
    u32 zero = 0;
    struct live_fd *slot = agg_birth.lookup(&zero);
    if (!slot)
        return NULL;
    slot->shipped = 0;
    fill(&slot->birth.e, pid_tgid, type, nr, sid, sflags);
    return &slot->birth;
}

static __always_inline struct fd_event *reserve_small_birth(struct stack_ref *st, u64 pid_tgid,
                                                            u16 type, u16 nr) {
    struct fd_event_data *d = reserve_birth(st, pid_tgid, type, nr);
    return d ? &d->e : NULL;
}

// The birth built in agg_birth: kept in agg_live (failures are shipped as they are).
static __always_inline void submit_birth(struct fd_event_data *built) {
    u32 zero = 0;
    struct live_fd *slot = agg_birth.lookup(&zero);
    if (!slot)
        return;
    if (slot->birth.e.type != EV_BIRTH) {
        agg_ship(slot, 0);
        return;
    }
    struct live_key key = {.pid = slot->birth.e.pid, .fd = slot->birth.e.fd};
    if (!agg_live.insert(&key, slot))  // the common case: one hash operation
        return;
    struct live_fd *old = agg_live.lookup(&key);
    if (old) {  // the old lifetime ended unseen or by this dup2: the analysis needs both
        if (!old->shipped)
            agg_ship(old, 1);
        agg_ship(slot, 1);
    }
    if (agg_live.update(&key, slot)) {
        agg_count_full(AGG_FULL_LIVE);
        if (!slot->shipped)
            agg_ship(slot, 0);  // not in the map: its close is shipped as in full history
    }
}

static __always_inline void submit_small_birth(struct fd_event *e) {
    submit_birth((struct fd_event_data *)e);
}

static __always_inline u32 agg_bucket(u64 ns) {
    u64 v = ns >> AGG_HIST_MIN_SHIFT;
    u32 b = 0;
    if (v >> 16) { v >>= 16; b += 16; }
    if (v >> 8) { v >>= 8; b += 8; }
    if (v >> 4) { v >>= 4; b += 4; }
    if (v >> 2) { v >>= 2; b += 2; }
    if (v >> 1)
        b += 1;
    return b < AGG_HIST_BUCKETS ? b : AGG_HIST_BUCKETS - 1;
}

// own: the process's value in `traced` (read by the caller, which looked it up anyway).
static __always_inline u64 agg_shipped_up_to(u64 own) {
    u32 zero = 0;
    u64 mark = 0;
    u64 *global = agg_mark.lookup(&zero);
    if (global)
        mark = *global;
    return own > mark ? own : mark;
}

// Counts the close of a never-shipped fd in its pair; 0: the pair wants it shipped.
static __always_inline int agg_count(struct live_fd *lf, u32 pid, u64 close_stack, u64 age) {
    struct pair_key pk = {.pid = pid, .death = NR_close, .open_stack = lf->birth.e.stack_id,
                          .close_stack = close_stack};
    struct pair_val *p = agg_pairs.lookup(&pk);
    if (!p) {
        u32 zero = 0;
        struct pair_val *fresh = agg_zero.lookup(&zero);
        if (fresh && agg_pairs.insert(&pk, fresh))
            agg_count_full(AGG_FULL_PAIRS);
        return 0;
    }
    if (p->state != AGG_PAIR_COUNT)
        return 0;
    __sync_fetch_and_add(&p->count, 1);
    __sync_fetch_and_add(&p->hist[agg_bucket(age) & (AGG_HIST_BUCKETS - 1)], 1);
    return 1;
}

// A close(fd): 1 when counted (ship nothing), 0 when the close record is to be shipped (after
// the fd's birth, if the kernel had not shipped it yet). traced_mark: the process's `traced`
// value.
static __always_inline int agg_close(struct stack_ref *st, u64 pid_tgid, s32 fd,
                                     u64 traced_mark) {
    u32 pid = pid_tgid >> 32;
    struct live_key key = {.pid = pid, .fd = fd};
    struct live_fd *lf = agg_live.lookup(&key);
    if (!lf)
        return 0;
    u64 born = lf->birth.e.ts;
    int counted = 0;
    if (!lf->shipped && born > agg_shipped_up_to(traced_mark) &&
        !(st->flags & PY_STACK_FINALIZING))
        counted = agg_count(lf, pid, st->id, bpf_ktime_get_ns() - born);
    if (!counted && !lf->shipped)
        agg_ship(lf, 1);  // shipped by user space too? it drops the copy (same pid, fd, time)
    agg_live.delete(&key);
    return counted;
}
#else
#define reserve_birth reserve_data
#define submit_birth submit_data
#define reserve_small_birth reserve_small
#define submit_small_birth submit_small
#endif

static __always_inline void copy_user_str(struct fd_event_data *d, const void *src) {
    int n = bpf_probe_read_user_str(d->data, DATA_LEN, src);
    d->e.datalen = n > 0 ? n - 1 : 0;
}

static __always_inline void copy_sockaddr(struct fd_event_data *d, const void *addr, u64 len) {
    if (!addr || len == 0)
        return;
    if (len > SOCKADDR_MAX)
        len = SOCKADDR_MAX;
    len &= 0xff;
    if (bpf_probe_read_user(d->data, len & (SOCKADDR_MAX * 2 - 1), addr) == 0)
        d->e.datalen = len;
}

// ---------------------------------------------------------------------------------------------
// Entry: deaths, flag changes and addresses are emitted here; births stash their arguments.
// The verifier explores the (large) stack walker once per distinct state that reaches it, so
// the programs decide first, walk once, and then re-read what they need (nr, arguments, ret)
// with helper calls: values the decision branched on stay behind as dead registers, and all
// paths meet the walker in one state.
static __always_inline int emits_at_enter(u32 nr, u64 cmd) {
    switch (nr) {
    case NR_close:
    case NR_close_range:
    case NR_connect:
    case NR_bind:
        return 1;
    case NR_ioctl:
        return cmd == FIOCLEX_ || cmd == FIONCLEX_;
    case NR_fcntl:
        return cmd == F_SETFD_;
    default:
        return 0;
    }
}

static __always_inline void read_enter_args(struct sys_enter_ctx *ctx, struct stash_t *s) {
    s32 nr = 0;
    bpf_probe_read_kernel(&nr, sizeof(nr), (void *)ctx + 8);
    s->nr = (u32)nr;
    // Syscalls have 1 to 6 arguments and the kernel refuses a program whose direct context
    // reads go past the smallest record it is attached to: copy the six slots instead.
    bpf_probe_read_kernel(s->args, sizeof(s->args), (void *)ctx + 16);
}

static __always_inline void emit_at_enter(struct stack_ref *st, u64 pid_tgid, struct stash_t *sp) {
    u32 nr = sp->nr;
    u64 cmd = sp->args[1] & 0xffffffff;
    s32 fd = (s32)sp->args[0];
    if (nr == NR_connect || nr == NR_bind) {
        struct fd_event_data *d = reserve_data(st, pid_tgid, EV_ADDR, nr);
        if (d) {
            d->e.fd = fd;
            copy_sockaddr(d, (const void *)sp->args[1], sp->args[2]);
            submit_data(d);
        }
        return;
    }
    u16 type = nr == NR_close ? EV_CLOSE : nr == NR_close_range ? EV_CLOSE_RANGE : EV_CLOEXEC;
    struct fd_event *e = reserve_small(st, pid_tgid, type, nr);
    if (!e)
        return;
    e->fd = fd;
    if (nr == NR_close_range) {
        e->arg = sp->args[1];  // last fd of the range
        e->flags = sp->args[2];
    } else if (nr == NR_ioctl) {
        e->arg = cmd == FIOCLEX_;
        e->flags = cmd;
    } else if (nr == NR_fcntl) {
        e->arg = sp->args[2] & 1;  // F_SETFD with FD_CLOEXEC
        e->flags = cmd;
    }
    submit_small(e);
}

int on_sys_enter(struct sys_enter_ctx *ctx) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!is_traced(pid_tgid >> 32))
        return 0;
    struct stash_t s = {};
    read_enter_args(ctx, &s);
    u32 nr = s.nr;
    if (nr == NR_signalfd || nr == NR_signalfd4) {
        if ((s32)s.args[0] != -1)  // updates an existing signalfd: not a birth
            return 0;
    } else if (nr == NR_fcntl) {
        u64 fcmd = s.args[1] & 0xffffffff;
        if (fcmd != F_DUPFD_ && fcmd != F_DUPFD_CLOEXEC_ && fcmd != F_SETFD_)
            return 0;
    }
    if (emits_at_enter(nr, s.args[1] & 0xffffffff)) {
        struct stack_ref st = python_stack(ctx, pid_tgid, WITH_FINALIZING);
        struct stash_t fresh = {};
        read_enter_args(ctx, &fresh);
        emit_at_enter(&st, pid_tgid, &fresh);
        return 0;
    }
    if (nr == NR_ioctl)
        return 0;

    if (nr == NR_clone3) {
        u64 flags = 0;
        bpf_probe_read_user(&flags, sizeof(flags), (void *)s.args[0]);
        s.args[0] = flags;
    } else if (nr == NR_fork) {
        s.args[0] = 0;
    } else if (nr == NR_vfork) {
        s.args[0] = CLONE_VM_VFORK_;
    }
    stash_put(&s);
    return 0;
}

// Dedicated entry programs for the three syscalls every `with open()` makes: they read their
// arguments straight from the tracepoint record (no helper call), which the generic program
// cannot do. ioctl is dropped before anything else unless it changes CLOEXEC: open() calls
// ioctl(TCGETS) for isatty on every file.

int on_close_enter(struct sys_enter_ctx *ctx) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    u64 *traced_value = traced.lookup(&tgid);
    if (!traced_value)
        return 0;
    u64 traced_mark = *traced_value;  // (a value, not the pointer, crosses the walk)
    struct stack_ref st = python_stack(ctx, pid_tgid, WITH_FINALIZING);
#ifdef CMTRACE_AGGREGATE
    if (agg_close(&st, pid_tgid, (s32)ctx->args[0], traced_mark))
        return 0;
#else
    (void)traced_mark;
#endif
    struct fd_event *e = reserve_small(&st, pid_tgid, EV_CLOSE, NR_close);
    if (e) {
        e->fd = (s32)ctx->args[0];
        submit_small(e);
    }
    return 0;
}

int on_ioctl_enter(struct sys_enter_ctx *ctx) {
    u64 cmd = ctx->args[1] & 0xffffffff;
    if (cmd != FIOCLEX_ && cmd != FIONCLEX_)
        return 0;
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!is_traced(pid_tgid >> 32))
        return 0;
    struct stack_ref st = python_stack(ctx, pid_tgid, WITH_FINALIZING);
    struct fd_event *e = reserve_small(&st, pid_tgid, EV_CLOEXEC, NR_ioctl);
    if (e) {
        u64 again = ctx->args[1] & 0xffffffff;
        e->fd = (s32)ctx->args[0];
        e->arg = again == FIOCLEX_;
        e->flags = again;
        submit_small(e);
    }
    return 0;
}

int on_openat_enter(struct sys_enter_ctx *ctx) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!is_traced(pid_tgid >> 32))
        return 0;
    struct stash_t s = {};
    s.nr = NR_openat;
    s.args[0] = ctx->args[0];
    s.args[1] = ctx->args[1];
    s.args[2] = ctx->args[2];
    s.args[3] = ctx->args[3];
    stash_put(&s);
    return 0;
}

// ---------------------------------------------------------------------------------------------
// Exit: births (the fd is the return value) and failures.

static __always_inline void emit_path_birth(struct stack_ref *st, u64 pid_tgid, struct stash_t *s, s64 ret,
                                            const void *path, u64 flags) {
    u16 type = ret < 0 ? EV_FAIL : EV_BIRTH;
    struct fd_event_data *d = reserve_birth(st, pid_tgid, type, s->nr);
    if (!d)
        return;
    if (ret < 0)
        d->e.err = -ret;
    else
        d->e.fd = ret;
    d->e.flags = flags;
    d->e.arg = s->args[0];
    if (path)
        copy_user_str(d, path);
    submit_birth(d);
}

static __always_inline void emit_pair_birth(struct stack_ref *st, u64 pid_tgid, struct stash_t *s, s64 ret,
                                            const void *fds_ptr, u64 flags, u64 arg) {
    struct fd_event *e = reserve_small(st, pid_tgid, ret < 0 ? EV_FAIL : EV_BIRTH, s->nr);
    if (!e)
        return;
    if (ret < 0) {
        e->err = -ret;
    } else {
        s32 fds[2] = {-1, -1};
        bpf_probe_read_user(fds, sizeof(fds), fds_ptr);
        e->fd = fds[0];
        e->fd2 = fds[1];
    }
    e->flags = flags;
    e->arg = arg;
    submit_small(e);
}

static __always_inline void emit_simple_birth(struct stack_ref *st, u64 pid_tgid, struct stash_t *s, s64 ret,
                                              s32 src, u64 flags, u64 arg) {
    struct fd_event *e = reserve_small_birth(st, pid_tgid, ret < 0 ? EV_FAIL : EV_BIRTH, s->nr);
    if (!e)
        return;
    if (ret < 0)
        e->err = -ret;
    else
        e->fd = ret;
    e->fd2 = src;
    e->flags = flags;
    e->arg = arg;
    submit_small_birth(e);
}

static __always_inline void emit_accept(struct stack_ref *st, u64 pid_tgid, struct stash_t *s, s64 ret) {
    struct fd_event_data *d = reserve_birth(st, pid_tgid, ret < 0 ? EV_FAIL : EV_BIRTH, s->nr);
    if (!d)
        return;
    if (ret < 0)
        d->e.err = -ret;
    else
        d->e.fd = ret;
    d->e.fd2 = (s32)s->args[0];
    d->e.flags = s->nr == NR_accept4 ? s->args[3] : 0;
    if (ret >= 0 && s->args[1] && s->args[2]) {
        u32 len = 0;
        bpf_probe_read_user(&len, sizeof(len), (void *)s->args[2]);
        copy_sockaddr(d, (const void *)s->args[1], len);
    }
    submit_birth(d);
}

// recvmsg: fds passed with SCM_RIGHTS in the first control message (multiprocessing does this).
struct user_msghdr_ {
    u64 name;
    u32 namelen;
    u32 pad;
    u64 iov;
    u64 iovlen;
    u64 control;
    u64 controllen;
    s32 flags;
};

struct cmsghdr_ {
    u64 len;
    s32 level;
    s32 type;
};

// Parses the first control message of a successful recvmsg; when it passes descriptors
// (SCM_RIGHTS), keeps their address and count in the stash's unused argument slots 4 and 5.
static __always_inline int carries_scm_rights(struct stash_t *s, s64 ret) {
    if (ret < 0)
        return 0;
    struct user_msghdr_ msg = {};
    if (bpf_probe_read_user(&msg, sizeof(msg), (void *)s->args[1]) != 0)
        return 0;
    if (!msg.control || msg.controllen < sizeof(struct cmsghdr_) + 4)
        return 0;
    struct cmsghdr_ cm = {};
    if (bpf_probe_read_user(&cm, sizeof(cm), (void *)msg.control) != 0)
        return 0;
    if (cm.level != 1 || cm.type != 1)  // SOL_SOCKET, SCM_RIGHTS
        return 0;
    u64 n = (cm.len - sizeof(cm)) / 4;
    if (n == 0)
        return 0;
    s->args[4] = msg.control + sizeof(cm);
    s->args[5] = n > 16 ? 16 : n;
    return 1;
}

static __always_inline void emit_scm_rights(struct stack_ref *st, u64 pid_tgid, struct stash_t *s,
                                            s64 ret) {
    struct fd_event_data *d = reserve_data(st, pid_tgid, EV_BIRTH, s->nr);
    if (!d)
        return;
    u32 bytes = (s->args[5] * 4) & 0x7f;
    if (bytes && bpf_probe_read_user(d->data, bytes, (void *)s->args[4]) == 0)
        d->e.datalen = bytes;
    d->e.fd = -1;
    d->e.fd2 = (s32)s->args[0];
    d->e.flags = s->args[2];
    submit_data(d);
}

// Syscalls whose non-negative return value is always a new descriptor (fcntl, signalfd and
// the fd-pair/SCM_RIGHTS ones need their arguments to tell).
static __always_inline int returns_new_fd(s32 nr) {
    switch (nr) {
    case NR_open: case NR_openat: case NR_openat2: case NR_creat: case NR_socket:
    case NR_accept: case NR_accept4: case NR_dup: case NR_dup2: case NR_dup3:
    case NR_eventfd: case NR_eventfd2: case NR_epoll_create: case NR_epoll_create1:
    case NR_memfd_create: case NR_timerfd_create: case NR_inotify_init: case NR_inotify_init1:
    case NR_fanotify_init: case NR_pidfd_open: case NR_pidfd_getfd: case NR_userfaultfd:
    case NR_perf_event_open:
        return 1;
    default:
        return 0;
    }
}

#define ARGS_UNKNOWN (1ULL << 32)  // in stash_t.nr: the syscall entered before we attached

// Per-CPU slot holding the exit's arguments across the stack walk (see emits_at_enter).
BPF_PERCPU_ARRAY(exit_args, struct stash_t, 1);

// What the exit of this syscall will record, into *out; 0 = nothing to record.
static __always_inline int prepare_exit(struct sys_exit_ctx *ctx, u32 tid, s64 ret,
                                        struct stash_t *out) {
    if (!stash_take(out)) {
        // Entered before we attached (a server blocked in accept4 when `cmtrace -p` starts):
        // the arguments are unknown, but a returned descriptor is still a birth.
        if (ret < 0 || !returns_new_fd(ctx->nr))
            return 0;
        out->nr = (u32)ctx->nr | ARGS_UNKNOWN;
        return 1;
    }
    u32 nr = out->nr;
    if (nr == NR_clone || nr == NR_clone3 || nr == NR_fork || nr == NR_vfork)
        return 0;  // handled at sched_process_fork; the stash only had to be cleaned up
    if (nr == NR_recvmsg && !carries_scm_rights(out, ret))
        return 0;  // most recvmsg calls pass no descriptors: no stack walk for them
    return 1;
}

static __always_inline void emit_at_exit(struct stack_ref *st, u64 pid_tgid, struct stash_t *s,
                                         s64 ret) {
    if (s->nr & ARGS_UNKNOWN) {
        s->nr &= ~ARGS_UNKNOWN;
        emit_simple_birth(st, pid_tgid, s, ret, -1, 0, 0);
        return;
    }
    u32 nr = s->nr;
    switch (nr) {
    case NR_open:
        emit_path_birth(st, pid_tgid, s, ret, (void *)s->args[0], s->args[1]);
        break;
    case NR_openat:
        emit_path_birth(st, pid_tgid, s, ret, (void *)s->args[1], s->args[2]);
        break;
    case NR_openat2: {
        u64 how_flags = 0;
        bpf_probe_read_user(&how_flags, sizeof(how_flags), (void *)s->args[2]);
        emit_path_birth(st, pid_tgid, s, ret, (void *)s->args[1], how_flags);
        break;
    }
    case NR_creat:
        emit_path_birth(st, pid_tgid, s, ret, (void *)s->args[0], 0);
        break;
    case NR_memfd_create:
        emit_path_birth(st, pid_tgid, s, ret, (void *)s->args[0], s->args[1]);
        break;
    case NR_socket:
        emit_simple_birth(st, pid_tgid, s, ret, -1, s->args[1], s->args[0]);
        break;
    case NR_socketpair:
        emit_pair_birth(st, pid_tgid, s, ret, (void *)s->args[3], s->args[1], s->args[0]);
        break;
    case NR_pipe:
        emit_pair_birth(st, pid_tgid, s, ret, (void *)s->args[0], 0, 0);
        break;
    case NR_pipe2:
        emit_pair_birth(st, pid_tgid, s, ret, (void *)s->args[0], s->args[1], 0);
        break;
    case NR_accept:
    case NR_accept4:
        emit_accept(st, pid_tgid, s, ret);
        break;
    case NR_dup:
    case NR_dup2:
        emit_simple_birth(st, pid_tgid, s, ret, (s32)s->args[0], 0, 0);
        break;
    case NR_dup3:
        emit_simple_birth(st, pid_tgid, s, ret, (s32)s->args[0], s->args[2], 0);
        break;
    case NR_fcntl:
        emit_simple_birth(st, pid_tgid, s, ret, (s32)s->args[0], s->args[1], s->args[2]);
        break;
    case NR_eventfd:
    case NR_epoll_create:
    case NR_inotify_init:
        emit_simple_birth(st, pid_tgid, s, ret, -1, 0, s->args[0]);
        break;
    case NR_eventfd2:
    case NR_timerfd_create:
    case NR_pidfd_open:
        emit_simple_birth(st, pid_tgid, s, ret, -1, s->args[1], s->args[0]);
        break;
    case NR_epoll_create1:
    case NR_inotify_init1:
    case NR_fanotify_init:
    case NR_userfaultfd:
        emit_simple_birth(st, pid_tgid, s, ret, -1, s->args[0], 0);
        break;
    case NR_signalfd:
        emit_simple_birth(st, pid_tgid, s, ret, -1, 0, 0);
        break;
    case NR_signalfd4:
        emit_simple_birth(st, pid_tgid, s, ret, -1, s->args[3], 0);
        break;
    case NR_pidfd_getfd:
        emit_simple_birth(st, pid_tgid, s, ret, (s32)s->args[1], s->args[2], s->args[0]);
        break;
    case NR_perf_event_open:
        emit_simple_birth(st, pid_tgid, s, ret, -1, s->args[4], s->args[2]);
        break;
    case NR_recvmsg:
        emit_scm_rights(st, pid_tgid, s, ret);
        break;
    default:
        break;  // clone family: handled at sched_process_fork, stash only cleaned up here
    }
}

int on_sys_exit(struct sys_exit_ctx *ctx) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!is_traced(pid_tgid >> 32))
        return 0;
    u32 zero = 0;
    struct stash_t *slot = exit_args.lookup(&zero);
    if (!slot || !prepare_exit(ctx, (u32)pid_tgid, ctx->ret, slot))
        return 0;
    struct stack_ref st = python_stack(ctx, pid_tgid, NO_FINALIZING);
#ifndef CMTRACE_AGGREGATE  // (--aggregate ships births later, out of agg_live: no generators)
    if (ctx->ret >= 0)
        python_emit_generators(pid_tgid, st.id);
#endif
    slot = exit_args.lookup(&zero);  // re-read after the walk: one verifier state reaches it
    if (!slot)
        return 0;
    struct stash_t s = *slot;
    emit_at_exit(&st, pid_tgid, &s, ctx->ret);  // a context read is a fresh value for the verifier
    return 0;
}

// ---------------------------------------------------------------------------------------------
// Processes: fork (children inherit the table), exec (CLOEXEC fds die), exit (all fds die).

TRACEPOINT_PROBE(sched, sched_process_fork) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 parent = pid_tgid >> 32;
    if (!is_traced(parent))
        return 0;
    struct stash_t *sp = stash_peek();
    u64 flags = sp ? sp->args[0] : 0;
    if (flags & CLONE_THREAD_)
        return 0;  // a new thread shares the table: nothing to record
    u32 child = args->child_pid;
    u32 follow_key = SETTING_FOLLOW;
    u32 *follow = settings.lookup(&follow_key);
    if (follow && *follow) {
        u64 none = 0;
        traced.update(&child, &none);
        python_inherit_process(parent, child);
    }
    struct stack_ref st = python_stack(args, pid_tgid, NO_FINALIZING);
    struct fd_event *e = reserve_small(&st, pid_tgid, EV_FORK, 0);
    if (e) {
        e->arg = child;
        e->flags = flags;
        submit_small(e);
    }
    return 0;
}

// Does the exec'd path's last component start with "python" (python3, python3.13...)?
// cmtrace.record.is_python_image is the same test in user space. The last '/' is searched
// backwards over at most 32 bytes (unrolled: a loop over the whole path is too many verifier
// states); a longer last component cannot be python3.NN anyway.
static __always_inline int is_python_image(const char *path, int len) {
    int start = 0;
#pragma unroll
    for (int k = 1; k <= 32; k++) {
        int i = len - k;
        if (i < 0)
            break;
        if (path[i & (DATA_LEN - 1)] == '/') {
            start = i + 1;
            break;
        }
    }
    char name[8] = {};
    bpf_probe_read_kernel(name, 6, path + (start & (DATA_LEN - 1)));
    return name[0] == 'p' && name[1] == 'y' && name[2] == 't' && name[3] == 'h' &&
           name[4] == 'o' && name[5] == 'n';
}

TRACEPOINT_PROBE(sched, sched_process_exec) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    if (!is_traced(tgid))
        return 0;
    python_forget_process(tgid);
    struct stack_ref none = {};
    struct fd_event_data *d = reserve_data(&none, pid_tgid, EV_EXEC, NR_execve);
    if (!d)
        return 0;  // never stop a process without the event that makes user space resume it
    unsigned short off = args->data_loc_filename & 0xffff;
    int n = bpf_probe_read_kernel_str(d->data, DATA_LEN, (char *)args + off);
    d->e.datalen = n > 0 ? n - 1 : 0;
    d->e.arg = args->old_pid;
    // `cmtrace run` stops its command right after each exec, and followed processes that exec
    // a python* image, until user space has loaded the new image's Python layout: a short-lived
    // `python -c ...` would otherwise be gone before.
    u32 hold_key = SETTING_HOLD_PID, children_key = SETTING_HOLD_PYTHON;
    u32 *hold = settings.lookup(&hold_key);
    u32 *children = settings.lookup(&children_key);
    if ((hold && *hold == tgid) || (children && *children && is_python_image(d->data, d->e.datalen)))
        bpf_send_signal(19);  // SIGSTOP; the collector sends SIGCONT when it sees this event
    submit_data(d);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    u32 tid = pid_tgid;
    if (!is_traced(tgid))
        return 0;
    python_forget_thread(tid);
    stash_clear();
    if (tid != tgid)
        return 0;  // a thread ended; the table lives on
    python_forget_process(tgid);
    struct stack_ref none = {};
    struct fd_event_data *d = reserve_data(&none, pid_tgid, EV_EXIT, NR_exit);
    if (d) {
        __builtin_memcpy(d->data, args->comm, 16);
        d->e.datalen = 16;
        submit_data(d);
    }
    traced.delete(&tgid);
    return 0;
}

// ---------------------------------------------------------------------------------------------
// --calls (opt-in): USDT python:function__entry / function__return, where the build fires them.
// cmtrace/usdt.py attaches on_python_call to each probe location of a traced process and
// describes, per (tgid, address), where the probe's arguments are (the notes' `8@%r13` form):
// a register (index in struct pt_regs), memory at register + offset, or a constant. Only
// __enter__/__exit__/__aenter__/__aexit__ are recorded, with the Python stack and, at a return,
// whether the function raised: the evidence for `exit-raised` / `enter-raised`. Every Python
// call still traps into the kernel, which is why this is not on by default.
#ifdef CMTRACE_CALLS
#define CALL_NREGS 21      // u64 slots of x86_64 struct pt_regs
#define CALL_FN_SLOT 31    // where the matched function kind waits while the stack is walked

struct call_arg {
    s64 value;  // the constant, or the offset added to the register for memory arguments
    u8 kind;
    u8 reg;
    u8 pad[6];
};

struct call_site_key {
    u32 tgid;
    u32 pad;
    u64 ip;
};

struct call_site {
    struct call_arg file;
    struct call_arg name;
    struct call_arg line;
    u32 which;  // 0 function__entry, 1 function__return
    u32 pad;
};

struct call_regs {
    u64 r[32];
};

BPF_HASH(call_sites, struct call_site_key, struct call_site, 4096);
BPF_PERCPU_ARRAY(call_scratch, struct call_regs, 1);

static __always_inline u64 call_arg(struct call_regs *regs, struct call_arg *a) {
    if (a->kind == CALL_ARG_CONST)
        return a->value;
    u64 v = regs->r[a->reg & 31];
    if (a->kind == CALL_ARG_MEM) {
        u64 m = 0;
        bpf_probe_read_user(&m, sizeof(m), (void *)(v + a->value));
        v = m;
    }
    return v;
}

// 1 __enter__, 2 __exit__, 3 __aenter__, 4 __aexit__; 0 any other function.
static __always_inline u32 dunder_kind(const char *n) {
    if (n[0] != '_' || n[1] != '_')
        return 0;
    u32 a = n[2] == 'a';
    const char *w = a ? n + 3 : n + 2;
    if (w[0] == 'e' && w[1] == 'n' && w[2] == 't' && w[3] == 'e' && w[4] == 'r' && w[5] == '_' &&
        w[6] == '_' && w[7] == 0)
        return a ? 3 : 1;
    if (w[0] == 'e' && w[1] == 'x' && w[2] == 'i' && w[3] == 't' && w[4] == '_' && w[5] == '_' &&
        w[6] == 0)
        return a ? 4 : 2;
    return 0;
}

int on_python_call(struct pt_regs *ctx) {
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32;
    if (!is_traced(tgid))
        return 0;
    struct call_site_key key = {};
    key.tgid = tgid;
    key.ip = PT_REGS_IP(ctx);
    struct call_site *site = call_sites.lookup(&key);
    u32 zero = 0;
    struct call_regs *regs = call_scratch.lookup(&zero);
    if (!site || !regs)
        return 0;
    bpf_probe_read_kernel(regs->r, CALL_NREGS * 8, ctx);
    char name[12] = {};
    bpf_probe_read_user_str(name, sizeof(name), (void *)call_arg(regs, &site->name));
    regs->r[CALL_FN_SLOT] = dunder_kind(name);
    if (!regs->r[CALL_FN_SLOT])
        return 0;
    // Walk once, then re-read what the decision used (see the syscall programs above).
    struct stack_ref st = python_stack(ctx, pid_tgid, WITH_FINALIZING);
    int raised = python_exception_pending(pid_tgid);
    site = call_sites.lookup(&key);
    regs = call_scratch.lookup(&zero);
    if (!site || !regs)
        return 0;
    struct fd_event_data *d = reserve_data(&st, pid_tgid, EV_CALL, site->which);
    if (!d)
        return 0;
    d->e.fd = regs->r[CALL_FN_SLOT];
    d->e.fd2 = (s32)call_arg(regs, &site->line);
    d->e.err = raised;
    copy_user_str(d, (const void *)call_arg(regs, &site->file));
    submit_data(d);
    return 0;
}
#endif
