"""Recording: the session over a Backend, its options, spawning, environment checks.

options.py      RecordOptions: what a recording is asked to do (the engine's one input)
session.py      Recording: the loop over a Backend; attach(options) and run(options)
backend.py      the Backend protocol, PythonTarget, Records (the seam both backends fill)
records.py      Python mirrors of probes/events.h (record layouts and kinds)
spawn.py        `run`'s command: held until traced, as the user behind sudo
environment.py  kernel version, tracefs, kernel headers (shared with `cmtrace doctor`)
procfs.py       what /proc says about a process;  syscalls.py: the traced syscalls
bpf/            the BPF backend;  ptrace/: the ptrace backend
"""
