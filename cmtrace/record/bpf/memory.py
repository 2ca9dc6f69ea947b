"""Give back what compiling the probes took, once they are loaded.

bcc compiles the probe program in this process with clang and LLVM: the compile leaves about
40 MB of freed heap that glibc keeps, and over 100 MB of the two libraries' pages resident
(measured: RSS 110 MB before the compile, 315 MB after it; `cmtrace -p --aggregate` at 20,000
fds/s steady at 340 MB without this, 242 MB with it, the recording itself adding a few MB).
Nothing compiles again while recording (the programs are loaded; --calls attaches USDT
probes with libbcc's own code, which pages back in if it runs), so both are handed back:
`malloc_trim` returns the free heap, MADV_PAGEOUT asks the kernel to reclaim the compiler's
file pages (clean pages of a shared library: reclaiming them loses nothing, a page used again is
read back in; pages other processes map too are left where they are).

The peak (VmHWM) stays the compile's: only compiling in another process lowers it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from pathlib import Path

MADV_PAGEOUT = 21  # Linux 5.4+ (cmtrace's BPF backend needs 5.8)
# The compiler's libraries, as bcc links them (libLLVM-14.so.1, libclang-cpp.so.14, libbcc.so.0)
COMPILER_LIBRARIES = re.compile(r"/lib(LLVM|clang)[^/]*\.so[^/]*$")


def release_compiler_memory() -> None:
    """Return the compile's free heap to the kernel and let it reclaim the compiler's pages
    (best effort: a libc without malloc_trim, or a kernel refusing madvise, changes nothing)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for start, end in compiler_mappings():
        libc.madvise(start, end - start, MADV_PAGEOUT)


def compiler_mappings(maps: Path = Path("/proc/self/maps")) -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of the compiler's libraries."""
    out = []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and COMPILER_LIBRARIES.search(fields[5].strip()):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end))
    return out
