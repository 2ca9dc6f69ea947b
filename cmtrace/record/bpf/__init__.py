"""The BPF backend (backend.py: BpfBackend), in data-flow order:

loader.py   probe source assembly, compile, load, attach, detach (bcc)
ring.py     the ring buffer read through its mmap'ed pages, a batch at a time
decode.py   fd records -> Arrow tables (schema EVENTS, CALLS)
targets.py  per-pid configuration of the kernel stack walker (map py_targets)
stacks.py   Symbolizer: stack and code records -> STACK_FRAMES rows
calls.py    --calls: USDT uprobes and semaphores
btf.py      kernel struct offsets from BTF
"""
