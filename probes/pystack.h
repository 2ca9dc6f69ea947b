// cmtrace: the Python stack of the thread making a syscall, walked in the kernel.
//
// Included by probes/fdtrace.bpf.c after it declares the ring buffer `events`. Entry points:
//   u64  capture_python_stack(ctx, pid_tgid, &stack_flags)  interned stack id, 0 = none
//        (call it before reserving the fd event: its stack/code records must precede it)
//   void python_forget_thread(tid) / python_forget_process(tgid)
// Per-process configuration (struct py_config) is written into `py_targets` by user space
// (cmtrace/symbolize.py install_python_target) from cmtrace/layouts.py, the one source of
// offsets shared with the user-space walker (cmtrace/pyframes.py).
//
// Cost model (bpf_probe_read_user is ~45-90 ns here, so reads are what we count):
//   finalizing flag 1 (deaths only: births skip it) + thread state 1 (+1 cframe on 3.11-3.12)
//   + frames. The thread state is cached with the thread's key (ns tid / pthread_self), so a
//   hit costs the one read that validates it, no helper call. On 3.11+ the frames
//   of a thread live on its data stack: one read of up to PY_WINDOW bytes below the stack top
//   covers them all; only frames outside it (generators, C-stack shim frames, older chunks)
//   cost a read each. <= 3.10 frames are heap objects: one read per frame.
//   A stack seen before (same frames, same process) costs one hash lookup, none when it is the
//   thread's last one (a loop's every open); a new one emits
//   code records (once per code object per process) and a stack record before the fd event.
//   Stack ids hash (tgid, install generation, and per frame: code, instruction, f_globals).
//   Measured (--aggregate, open/close of /dev/null, 2026-12-03): of ~960 BPF ns an iteration at
//   3 frames ~750 are the syscall programs and maps without any walk, ~70 the finalizing flag,
//   ~190 the thread state; the frames themselves ~6 ns each per walk (two walks an iteration).
//
// Why no "reuse the thread's last stack id when its top frames are unchanged": it cannot be
// validated without reading every frame. A stack id depends on every frame's (code, instr,
// globals); frames below the top K can change while the top K look the same at the same
// addresses: f() and h() with equal frame sizes both calling g() -> open() put g's frame at the
// same data-stack address with the same code and instruction; so do two call sites of one
// recursive function at equal depth. CPython keeps no per-push counter (nothing in a frame or
// the thread state changes when a frame is popped and an equal one pushed at its address), and
// the thread-state depth fields (recursion_remaining, datastack_top) only see depth. Checking
// all frames is the walk itself (the hash is as cheap as a comparison), so none is kept.
//
// Verifier budget: the kernel explores ~94k instructions per inlined copy (loops are bounded,
// not unrolled; loop state lives in the per-CPU scratch, not in registers, so paths merge).
// Call capture_python_stack once per program, where few verifier states reach it: each
// distinct caller state re-explores the whole walker. PY_MAX_* below trade depth for that.
//
// Thread -> thread state, correct while the GIL is released (the GIL holder / current-tstate
// pointers are NULL or another thread's then): cache the tstate in the task's local storage, validated on every hit;
// on a miss walk interpreters -> threads and match native_thread_id against the tid in the
// target's pid namespace (3.11+), or thread_id (pthread_self) against the task's fsbase
// (<= 3.10; offset from BTF). Candidates without frames are skipped: a thread state created
// for a thread that has not started yet still carries its creator's ids.

// bcc rewrites map calls (`m.lookup()`) only in the main source file, not in headers it
// #includes: the collector therefore pastes this file in place of its #include line with
// CMTRACE_PYSTACK_INLINED defined (cmtrace.symbolize.inline_pystack). A plain #include gets
// the stub below, which records fds without stacks.
// Record layouts, flags and read sizes (also what the stubs below use).
#include "events.h"

#ifndef CMTRACE_PYSTACK_INLINED
static __always_inline u64 capture_python_stack(void *ctx, u64 pid_tgid, u32 *stack_flags,
                                                int want_finalizing) {
    *stack_flags |= PY_STACK_NO_PYTHON;
    return 0;
}
static __always_inline void python_forget_thread(u32 tid) {}
static __always_inline void python_forget_process(u32 tgid) {}
static __always_inline int python_exception_pending(u64 pid_tgid) { return -1; }
static __always_inline void python_inherit_process(u32 parent, u32 child) {}
static __always_inline void python_emit_generators(u64 pid_tgid, u64 stack_id) {}
#else

// The walk itself (shared with the ptrace engine); its reads are the kernel helper here.
#define PY_READ(dst, size, src) bpf_probe_read_user(dst, size, src)
#define PY_NO_UNROLL _Pragma("clang loop unroll(disable)")
#include "pywalk.h"

struct py_code_key {
    u64 code;
    u32 tgid;
    u32 generation;
};

BPF_HASH(py_targets, u32, struct py_config, 4096);                       // tgid -> layout
BPF_ARRAY(py_kconfig, u64, 1);                                            // [0] task fsbase offset
// What a thread's walks keep for its next one (each field validated or re-derived when used).
struct py_thread_cache {
    u64 tstate;          // its PyThreadState* (0: not known); checked against key at every use
    u64 key;             // py_thread_key's answer when tstate was found, under install
                         // key_generation
    u64 last_stack;      // the last stack id it walked that user space has (0: none)
    u32 key_generation;  // 0: key not computed yet
    u32 pad;
};
#ifdef CMTRACE_TASK_STORAGE  // (fdtrace.bpf.c: 5.12+)
BPF_TASK_STORAGE(py_threads, struct py_thread_cache);                     // with the task
#else
BPF_TABLE("lru_hash", u32, struct py_thread_cache, py_threads, 16384);    // by tid
#endif
BPF_TABLE("lru_hash", u64, u32, py_stacks, 65536);                        // interned stack ids
BPF_TABLE("lru_hash", struct py_code_key, u32, py_codes, 65536);          // code objects sent
BPF_PERCPU_ARRAY(py_scratch_map, struct py_scratch, 1);

// The id by which user space knows this thread's state: ns tid (3.11+) or pthread_self.
static __always_inline int py_thread_key(struct py_config *cfg, u64 *key) {
    if (cfg->match_native_tid) {
        struct bpf_pidns_info ns = {};
        if (bpf_get_ns_current_pid_tgid(cfg->pidns_dev, cfg->pidns_ino, &ns, sizeof(ns)))
            return -1;
        *key = ns.pid;
        return 0;
    }
    u32 zero = 0;
    u64 *off = py_kconfig.lookup(&zero);
    if (!off || !*off)
        return -1;
    void *task = (void *)bpf_get_current_task();
    return bpf_probe_read_kernel(key, sizeof(*key), task + *off);
}

// Find this thread's PyThreadState: s->tstate holds its head and s->top its top frame (0: none).
// The search is pywalk.h's py_search_threads (the ptrace engine's), written out here with the
// cache update inside the loop: through the shared function clang emits other instructions
// than those whose verifier cost was measured (py_emit_codes / py_fill_code: the same).
// Only the main interpreter's list is walked (interpreters.head), bounded by PY_MAX_THREADS.
static __always_inline void py_find_thread(struct py_config *cfg, struct py_scratch *s,
                                           struct py_thread_cache *c) {
    s->top = 0;
    // The cached state is checked against the key it was found with: a task's tid in its pid
    // namespace and its pthread_self do not change (bpf_get_ns_current_pid_tgid alone cost
    // ~50 ns a walk), and an exec, which replaces both the interpreter and the thread's TLS,
    // comes with a new install generation.
    if (c->tstate && c->key_generation == cfg->generation) {
        if (!bpf_probe_read_user(s->tstate, PY_TSTATE_READ, (void *)c->tstate))
            py_match(cfg, s, c->key);
        if (s->top)
            return;
    }
    c->tstate = 0;
    u64 key = 0;
    if (py_thread_key(cfg, &key))
        return;
    u64 interp = 0;
    bpf_probe_read_user(&interp, sizeof(interp), (void *)cfg->interp_head_addr);
    u64 tstate = 0;
    if (interp)
        bpf_probe_read_user(&tstate, sizeof(tstate), (void *)(interp + cfg->interp_threads_head));
#pragma clang loop unroll(disable)
    for (int j = 0; j < PY_MAX_THREADS; j++) {
        if (!tstate || bpf_probe_read_user(s->tstate, PY_TSTATE_READ, (void *)tstate))
            return;
        py_match(cfg, s, key);
        if (s->top) {
            c->tstate = tstate;
            c->key = key;
            c->key_generation = cfg->generation;
            return;
        }
        tstate = py_u64(s->tstate, cfg->ts_next & 0x1ff);
    }
}

// Phase 1 of a new stack: every frame's code object must be a code object; list those this
// process has not been sent yet (at most PY_CODES_PER_EVENT). Returns -1 on garbage.
static __always_inline int py_check_codes(struct py_config *cfg, struct py_scratch *s, u32 tgid) {
    s->ntodo = 0;
#pragma clang loop unroll(disable)
    for (int i = 0; i < PY_MAX_FRAMES; i++) {
        if (i >= s->nframes)
            break;
        u64 code = s->frames[i].code;
        if (bpf_probe_read_user(s->code, PY_CODE_READ, (void *)code))
            return -1;
        if (py_u64(s->code, cfg->ob_type & 0xff) != cfg->code_type)
            return -1;
        struct py_code_key key = {.code = code, .tgid = tgid, .generation = cfg->generation};
        u32 ck = py_checksum(cfg, s->code);
        u32 *seen = py_codes.lookup(&key);
        if (seen && *seen == ck)
            continue;
        u32 t = s->ntodo;
        if (t < PY_CODES_PER_EVENT) {
            s->todo[t & (PY_CODES_PER_EVENT - 1)] = code;
            s->ntodo = t + 1;
            // marked now, so a recursion's other frames of this code do not list it again;
            // py_emit_codes unmarks it if its record cannot be sent
            py_codes.update(&key, &ck);
        }
    }
    return 0;
}

// Phase 2: one code record per listed code object.
static __always_inline int py_emit_codes(struct py_config *cfg, struct py_scratch *s,
                                         u64 pid_tgid) {
    u32 tgid = pid_tgid >> 32;
#pragma clang loop unroll(disable)
    for (int j = 0; j < PY_CODES_PER_EVENT; j++) {
        if (j >= s->ntodo)
            break;
        u64 code = s->todo[j & (PY_CODES_PER_EVENT - 1)];
        struct py_code_key key = {.code = code, .tgid = tgid, .generation = cfg->generation};
        struct py_code_rec *r = NULL;
        if (!bpf_probe_read_user(s->code, PY_CODE_READ, (void *)code))
            r = events.ringbuf_reserve(sizeof(struct py_code_rec));
        if (!r) {
            py_codes.delete(&key);
            return -1;
        }
        r->ts = bpf_ktime_get_ns();
        r->pid = tgid;
        r->tid = (u32)pid_tgid;
        r->type = PY_REC_CODE;
        r->code = code;
        r->generation = cfg->generation;
        r->checksum = py_checksum(cfg, s->code);
        r->firstlineno = *(const s32 *)(s->code + (cfg->co_firstlineno & 0xff));
        r->flags = *(const u32 *)(s->code + (cfg->co_flags & 0xff));
        r->argcount = *(const u32 *)(s->code + (cfg->co_argcount & 0xff));
        r->name_state = r->qualname_state = r->file_state = 0;
        r->name_len = py_copy_str(cfg, s, py_u64(s->code, cfg->co_name & 0xff), r->name,
                                  PY_NAME_MAX, &r->name_state);
        r->qualname_len = 0;
        if (cfg->co_qualname != PY_NO_OFFSET)
            r->qualname_len = py_copy_str(cfg, s, py_u64(s->code, cfg->co_qualname & 0xff),
                                          r->qualname, PY_NAME_MAX, &r->qualname_state);
        r->file_len = py_copy_str(cfg, s, py_u64(s->code, cfg->co_filename & 0xff), r->file,
                                  PY_FILE_MAX, &r->file_state);
        py_copy_linetable(cfg, s, r);
        events.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
    }
    return 0;
}

static __always_inline int py_emit_stack(struct py_config *cfg, struct py_scratch *s,
                                         u64 pid_tgid, u64 id, u32 flags) {
    struct py_stack_rec *r = events.ringbuf_reserve(sizeof(struct py_stack_rec));
    if (!r)
        return -1;
    r->ts = bpf_ktime_get_ns();
    r->pid = pid_tgid >> 32;
    r->tid = (u32)pid_tgid;
    r->type = PY_REC_STACK;
    r->nframes = s->nframes;
    r->flags = flags;
    r->stack_id = id;
    r->generation = cfg->generation;
    r->pad = 0;
    bpf_probe_read_kernel(r->frames, sizeof(r->frames), s->frames);
    events.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
    return 0;
}

// This thread's cache, made on its first walk: task-local storage where the kernel has it (a
// pointer dereference instead of a hash lookup by tid).
static __always_inline struct py_thread_cache *py_thread_cache(u32 tid) {
#ifdef CMTRACE_TASK_STORAGE
    struct task_struct *task = (struct task_struct *)bpf_get_current_task_btf();
    return py_threads.task_storage_get(task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
#else
    struct py_thread_cache empty = {};
    return py_threads.lookup_or_try_init(&tid, &empty);
#endif
}

// want_finalizing: read the runtime's finalizing flag (one memory read): deaths need it (a
// close while the interpreter finalizes is a leak), births do not (the analysis reads it on
// closes only).
static __always_inline u64 py_capture(void *ctx, u64 pid_tgid, u32 *stack_flags,
                                      int want_finalizing) {
    u32 tgid = pid_tgid >> 32;
    struct py_config *cfg = py_targets.lookup(&tgid);
    if (!cfg) {
        *stack_flags |= PY_STACK_NO_PYTHON;
        return 0;
    }
    u32 zero = 0;
    struct py_scratch *s = py_scratch_map.lookup(&zero);
    struct py_thread_cache *c = py_thread_cache((u32)pid_tgid);
    if (!s || !c)
        return 0;
    if (want_finalizing) {
        u64 finalizing = 0;
        bpf_probe_read_user(&finalizing, sizeof(finalizing), (void *)cfg->finalizing_addr);
        if (finalizing)
            *stack_flags |= PY_STACK_FINALIZING;
    }
    py_find_thread(cfg, s, c);
    u64 frame = s->top;
    if (!frame) {
        *stack_flags |= PY_STACK_NO_PYTHON;
        return 0;
    }
    u32 flags = 0;
    u64 id = py_walk(cfg, s, tgid, &flags) | 1;   // never 0
    *stack_flags |= flags;
    if (!s->nframes) {
        *stack_flags |= PY_STACK_NO_PYTHON;
        return 0;
    }
    // The thread's last stack (a loop's every open) skips the interned-id lookup: the id hashes
    // every frame, so an equal id is the same stack, and user space has it.
    if (id == c->last_stack)
        return id;
    if (py_stacks.lookup(&id)) {
        c->last_stack = id;
        return id;
    }
    if (py_check_codes(cfg, s, tgid)) {
        *stack_flags |= PY_STACK_ERROR;
        return 0;
    }
    u32 more = s->ntodo >= PY_CODES_PER_EVENT;
    if (py_emit_codes(cfg, s, pid_tgid) || py_emit_stack(cfg, s, pid_tgid, id, flags))
        return 0;   // ring buffer full: the collector counts the loss
    if (!more) {    // else a later event sends the remaining code records, then interns it
        u32 one = 1;
        py_stacks.update(&id, &one);
        c->last_stack = id;
    }
    return id;
}

// The walk costs the verifier ~100k explored instructions: call this once per program (the
// collector's programs capture once, then emit), not at every place that emits an event.
static __always_inline u64 capture_python_stack(void *ctx, u64 pid_tgid, u32 *stack_flags,
                                                int want_finalizing) {
    return py_capture(ctx, pid_tgid, stack_flags, want_finalizing);
}

// Right after capture_python_stack, before the birth is reserved: the walk's generator frames
// (issue 13's liveness check reads them when recording stops), when it met any. stack_id 0:
// no walk ran in this program, so the scratch is another event's.
static __always_inline void python_emit_generators(u64 pid_tgid, u64 stack_id) {
    if (!stack_id)
        return;
    u32 zero = 0;
    struct py_scratch *s = py_scratch_map.lookup(&zero);
    if (!s || !s->ngens)
        return;
    struct py_gens_rec *r = events.ringbuf_reserve(sizeof(struct py_gens_rec));
    if (!r)
        return;  // the birth then has no generators: its liveness stays unproven
    r->ts = bpf_ktime_get_ns();
    r->pid = pid_tgid >> 32;
    r->tid = (u32)pid_tgid;
    r->type = PY_REC_GENS;
    r->ngens = s->ngens;
    r->pad = 0;
    r->stack_id = stack_id;
    bpf_probe_read_kernel(r->gens, sizeof(r->gens), s->gens);
    bpf_probe_read_kernel(r->codes, sizeof(r->codes), s->gen_codes);
    events.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
}

static __always_inline void python_forget_thread(u32 tid) {
#ifndef CMTRACE_TASK_STORAGE
    py_threads.delete(&tid);   // (task-local storage dies with its task)
#endif
}

// Right after capture_python_stack: is this thread raising an exception? (1 yes, 0 no, -1 not
// known: no thread state found, or the layout does not say where the field is.) At a
// function__return probe this tells a function that raised from one that returned.
static __always_inline int python_exception_pending(u64 pid_tgid) {
    u32 tgid = pid_tgid >> 32;
    struct py_config *cfg = py_targets.lookup(&tgid);
    if (!cfg || cfg->ts_exception == PY_NO_OFFSET)
        return -1;
    u32 zero = 0;
    struct py_scratch *s = py_scratch_map.lookup(&zero);
    if (!s || !s->top)
        return -1;
    return py_u64(s->tstate, cfg->ts_exception & 0x1ff) != 0;
}

static __always_inline void python_forget_process(u32 tgid) {
    py_targets.delete(&tgid);
}

// A forked child runs the same interpreter at the same addresses: it inherits the parent's
// configuration (same install generation) before it first runs, so even a child that exits
// within milliseconds has stacks. User space learns of it from the fork event.
static __always_inline void python_inherit_process(u32 parent, u32 child) {
    struct py_config *cfg = py_targets.lookup(&parent);
    if (cfg) {
        struct py_config copy = *cfg;
        py_targets.update(&child, &copy);
    }
}

#endif  // CMTRACE_PYSTACK_INLINED
