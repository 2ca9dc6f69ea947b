// cmtrace: the Python frame walker both recording backends share (no maps, no helpers but
// memory reads), so that a stack has the same frames and the same id whichever recorded it.
//
// Included by probes/pystack.h (BPF: the reads are bpf_probe_read_user) and by the ptrace
// engine cmtrace/record/ptrace/engine.c (user space: a cached process_vm_readv of the stopped
// target). The includer defines, before the #include:
//   PY_READ(dst, size, src)  copy `size` bytes at target address `src` (a pointer); 0 on success
//   PY_NO_UNROLL             the loop pragma its compiler wants before a bounded loop (or nothing)
// and includes probes/events.h (struct py_config, read sizes, record layouts).
// The masks on offsets (& 0x1ff, & 0x7f ...) keep the BPF verifier's bounds; user space keeps
// them too: they are what makes a configured offset safe against the buffer sizes below.
#ifndef CMTRACE_PYWALK_H
#define CMTRACE_PYWALK_H

#include "events.h"

#define PY_MAX_STEPS 144        // frames visited per walk, shim frames included
#define PY_WINDOW 8192          // bytes of data stack read at once (power of two)
#define PY_MAX_THREADS 96       // thread states searched on a cache miss
#define PY_CODES_PER_EVENT 8    // code records one event may emit (power of two)

struct py_scratch {
    u8 window[PY_WINDOW + 136];
    u8 frame[136];
    u8 tstate[528];
    u8 code[264];
    u8 str[72];
    struct py_frame frames[PY_MAX_FRAMES];
    u64 todo[PY_CODES_PER_EVENT];   // code objects to send
    u64 gens[PY_MAX_GENS];           // generator frames of the walk (struct py_gens_rec.gens)
    u64 gen_codes[PY_MAX_GENS];
    u64 top;       // top frame of the thread found
    u64 win, win_reach;
    struct {
        u64 code, previous, instr, globals, gen;
        u8 owner;
    } cur;         // the frame being walked
    u32 nframes;   // kept in memory, not registers, so the verifier does not fork states on it
    u32 ntodo;
    u32 ngens;
};

static __always_inline u64 py_u64(const u8 *buf, u32 off) {
    return *(const u64 *)(buf + off);
}

static __always_inline u64 py_mix(u64 h, u64 v) {
    h ^= v;
    h *= 0x100000001b3ULL;
    return h ^ (h >> 29);
}

static __always_inline u64 py_tstate_id(struct py_config *cfg, struct py_scratch *s) {
    u32 off = cfg->match_native_tid ? cfg->ts_native_thread_id : cfg->ts_thread_id;
    return py_u64(s->tstate, off & 0x1ff);
}

// The top frame of the thread state in s->tstate (0 when it runs no Python code).
static __always_inline u64 py_top_frame(struct py_config *cfg, struct py_scratch *s) {
    u64 frame = py_u64(s->tstate, cfg->ts_frame & 0x1ff);
    if (frame && cfg->cframe_current_frame != PY_NO_OFFSET) {
        u64 cframe = frame;
        frame = 0;
        PY_READ(&frame, sizeof(frame), (void *)(cframe + cfg->cframe_current_frame));
    }
    return frame;
}

// Is the thread state in s->tstate this thread's, and running Python code? Leaves the top
// frame in s->top (0 otherwise).
static __always_inline void py_match(struct py_config *cfg, struct py_scratch *s, u64 key) {
    s->top = 0;
    if (py_tstate_id(cfg, s) == key)
        s->top = py_top_frame(cfg, s);
}

// Walk the main interpreter's thread list (interpreters.head, at most PY_MAX_THREADS) for the
// state whose id is `key`: leaves it in s->tstate, its top frame in s->top, and returns its
// address (0: not found, or found running no Python code).
static __always_inline u64 py_search_threads(struct py_config *cfg, struct py_scratch *s,
                                             u64 key) {
    u64 interp = 0;
    PY_READ(&interp, sizeof(interp), (void *)cfg->interp_head_addr);
    u64 tstate = 0;
    if (interp)
        PY_READ(&tstate, sizeof(tstate), (void *)(interp + cfg->interp_threads_head));
    PY_NO_UNROLL
    for (int j = 0; j < PY_MAX_THREADS; j++) {
        if (!tstate || PY_READ(s->tstate, PY_TSTATE_READ, (void *)tstate))
            return 0;
        py_match(cfg, s, key);
        if (s->top)
            return tstate;
        tstate = py_u64(s->tstate, cfg->ts_next & 0x1ff);
    }
    return 0;
}

// One read of the data stack below its top (3.11+); returns the window's start address.
static __always_inline u64 py_read_window(struct py_config *cfg, struct py_scratch *s, u32 *len) {
    *len = 0;
    if (cfg->frames != PY_FRAMES_INTERP)
        return 0;
    u64 chunk = py_u64(s->tstate, cfg->ts_chunk & 0x1ff);
    u64 top = py_u64(s->tstate, cfg->ts_top & 0x1ff);
    u64 lo = chunk + cfg->chunk_data;
    if (!chunk || top <= lo || top - lo > (1 << 24))
        return 0;
    u64 start = top - lo > PY_WINDOW - 8 ? top - (PY_WINDOW - 8) : lo;
    u32 size = (u32)(top - start) & (PY_WINDOW - 1);
    if (!size || PY_READ(s->window, size, (void *)start))
        return 0;
    *len = size;
    return start;
}

// The fields of one frame header at fb, copied to s->cur (so that the two ways of getting a
// frame join into one verifier state).
static __always_inline void py_take_frame(struct py_config *cfg, struct py_scratch *s,
                                          const u8 *fb) {
    s->cur.code = py_u64(fb, cfg->fr_code & 0x7f);
    s->cur.previous = py_u64(fb, cfg->fr_previous & 0x7f);
    s->cur.instr = py_u64(fb, cfg->fr_instr & 0x7f);
    s->cur.owner = fb[cfg->fr_owner & 0x7f];
    s->cur.globals = py_u64(fb, cfg->fr_globals & 0x7f);
    s->cur.gen = py_u64(fb, cfg->fr_gen & 0x7f);   // f_gen (<= 3.10); unused when PY_NO_OFFSET
}

// The generator (coroutine, async generator) object whose frame the walk is at (0: none): the
// frame's f_gen on <= 3.10; on 3.11+ a generator's frame is embedded in the generator object,
// gen_iframe bytes in, and its owner says so.
static __always_inline u64 py_frame_generator(struct py_config *cfg, struct py_scratch *s,
                                              u64 frame) {
    if (cfg->fr_gen != PY_NO_OFFSET)
        return s->cur.gen;
    if (cfg->gen_iframe != PY_NO_OFFSET && s->cur.owner == cfg->owner_generator)
        return frame - cfg->gen_iframe;
    return 0;
}

// Keep frame number n's generator for the birth's py_gens_rec (the innermost PY_MAX_GENS).
static __always_inline void py_note_generator(struct py_scratch *s, u32 n, u64 gen, u64 code) {
    u32 g = s->ngens;
    if (!gen || g >= PY_MAX_GENS)
        return;
    s->gens[g & (PY_MAX_GENS - 1)] = ((u64)n << PY_GEN_INDEX_SHIFT) |
                                     (gen & ((1ULL << PY_GEN_INDEX_SHIFT) - 1));
    s->gen_codes[g & (PY_MAX_GENS - 1)] = code;
    s->ngens = g + 1;
}

// Walk the frame chain from s->top into s->frames, and the generator frames into s->gens (not
// part of the hash: one stack meets many generator objects); returns the stack hash.
static __always_inline u64 py_walk(struct py_config *cfg, struct py_scratch *s, u32 tgid,
                                   u32 *flags) {
    u32 win_len = 0;
    s->win = py_read_window(cfg, s, &win_len);
    // frames starting at most this far into the window are wholly inside it (0: no window)
    s->win_reach = win_len >= PY_FRAME_READ ? win_len - PY_FRAME_READ : 0;
    u64 hash = py_mix(0xcbf29ce484222325ULL, ((u64)tgid << 32) | cfg->generation);
    u64 frame = s->top;
    s->nframes = 0;
    s->ngens = 0;
    PY_NO_UNROLL
    for (int i = 0; i < PY_MAX_STEPS; i++) {
        if (!frame)
            return hash;
        u64 off = frame - s->win;
        if (s->win_reach && off <= s->win_reach) {
            py_take_frame(cfg, s, s->window + (off & (PY_WINDOW - 1)));
        } else {
            if (PY_READ(s->frame, PY_FRAME_READ, (void *)frame)) {
                *flags |= PY_STACK_ERROR;
                return hash;
            }
            py_take_frame(cfg, s, s->frame);
        }
        u64 here = frame;
        frame = s->cur.previous;
        u64 code = s->cur.code & ~cfg->code_tag_mask;
        // C-stack shim / entry frames (owner) and 3.13 entry frames (None) are not Python.
        if (s->cur.owner >= cfg->owner_not_python || code == cfg->none_addr)
            code = 0;
        if (!code)
            continue;
        u32 n = s->nframes;
        if (n >= PY_MAX_FRAMES) {
            *flags |= PY_STACK_TRUNCATED;
            return hash;
        }
        s->frames[n].code = code;
        s->frames[n].instr = s->cur.instr;
        s->nframes = n + 1;
        py_note_generator(s, n, py_frame_generator(cfg, s, here), code);
        // f_globals (the module's dict) too: a module body's code object is freed after the
        // import, and the next module's may get its address and run at the same offsets.
        hash = py_mix(py_mix(py_mix(hash, code), s->cur.instr), s->cur.globals);
    }
    if (frame)
        *flags |= PY_STACK_TRUNCATED;
    return hash;
}

// Identifies the code object now at an address, so a freed one whose address was reused by
// another (a module body run once, then `exec`'d code...) gets a new code record. Names and
// first line alone are not enough: site.py exec()s each .pth line as <string> <module> line 1,
// and the `python -c` program's module code, also <string> <module> 1, often gets the freed
// address; the line table pointer tells them apart (else every -c line read as line 1).
static __always_inline u32 py_checksum(struct py_config *cfg, const u8 *code) {
    u64 first = *(const u32 *)(code + (cfg->co_firstlineno & 0xff));
    u64 h = py_mix(py_u64(code, cfg->co_filename & 0xff) ^ (first << 40),
                   py_u64(code, cfg->co_name & 0xff));
    h = py_mix(h, py_u64(code, cfg->co_linetable & 0xff));
    return (u32)(h ^ (h >> 32));
}

// Branch-free helpers: on kernels before ~6.3 the verifier prunes few states in the code-record
// loop, and every `if` in a copied string or line table multiplied its work (on_sys_exit went
// past the 1M-instruction limit on 6.1): scripts/verifier-stats.py measures it.
// min(value, cap) for values < 2^63.
static __always_inline u64 py_min(u64 value, u64 cap) {
    s64 over = (s64)(value - cap);
    return cap + (u64)(over & (over >> 63));
}

// `size` when a read returned 0 (success), else 0 (a read's result is 0 or negative).
static __always_inline u64 py_if_read(long err, u64 size) {
    return size & (((u64)err >> 63) - 1);
}

// Copy a compact str's bytes; returns the number of bytes copied (0 when a read fails). The one
// branch left is the header read's: without a header there is no length to trust.
static __always_inline u16 py_copy_str(struct py_config *cfg, struct py_scratch *s, u64 obj,
                                       u8 *dst, u32 cap, u32 *state) {
    if (!obj || PY_READ(s->str, PY_STR_HEAD, (void *)obj))
        return 0;
    u64 length = py_u64(s->str, cfg->str_length & 0x3f);
    u32 st = *(const u32 *)(s->str + (cfg->str_state & 0x3f));
    *state = st;
    u32 kind = (st >> 2) & 7;
    u32 wide = kind + (((kind - 1) >> 31) & 1);    // bytes per character: kind, 1 for 0
    u64 ascii = (st >> 5) & (st >> 6) & 1;          // compact and ASCII: the short header
    u64 off = cfg->str_compact + (u64)(((s64)cfg->str_ascii - (s64)cfg->str_compact) * (s64)ascii);
    u64 size = py_min(length * wide, cap - 1) & (cap - 1);
    return (u16)py_if_read(PY_READ(dst, size, (void *)(obj + off)), size);
}

// The line table's bytes into r (as much as fits) and its whole length.
static __always_inline void py_copy_linetable(struct py_config *cfg, struct py_scratch *s,
                                              struct py_code_rec *r) {
    u64 table = py_u64(s->code, cfg->co_linetable & 0xff);
    u64 total = 0;
    long err = PY_READ(&total, sizeof(total), (void *)(table + cfg->bytes_size));
    total = py_if_read(err, total) & ((1ULL << 62) - 1);
    u64 size = py_min(total, PY_LINETABLE_MAX - 1) & (PY_LINETABLE_MAX - 1);
    r->linetable_len = py_if_read(PY_READ(r->linetable, size, (void *)(table + cfg->bytes_data)), size);
    r->linetable_total = total;
}

// A code record from the PyCodeObject header in s->code (all but ts, pid and tid): names,
// file, first line, flags and as much of the line table as fits.
static __always_inline void py_fill_code(struct py_config *cfg, struct py_scratch *s, u64 code,
                                         struct py_code_rec *r) {
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
}

#endif  // CMTRACE_PYWALK_H
