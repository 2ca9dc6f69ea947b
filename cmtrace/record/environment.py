"""What the host must offer a recording: kernel version, tracefs, kernel headers, root.

One implementation of each fact, read by the recorder (which refuses to start without them) and
by `cmtrace doctor` (which reports them all and says how to fix what lacks).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cmtrace.errors import EnvironmentProblem

MIN_KERNEL = (5, 8)  # BPF ring buffer (BPF_MAP_TYPE_RINGBUF)
TRACEFS = Path("/sys/kernel/tracing")
SYSCALL_EVENTS = TRACEFS / "events" / "syscalls"
KHEADERS = Path("/sys/kernel/kheaders.tar.xz")  # CONFIG_IKHEADERS: the kernel carries its own


def kernel_release() -> str:
    return os.uname().release


def parse_release(release: str) -> tuple[int, int]:
    """(major, minor) of a kernel release such as "6.18.0-1-amd64"; (0, 0) if unreadable."""
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def kernel_new_enough(release: str) -> bool:
    return parse_release(release) >= MIN_KERNEL


def module_build_dir(release: str) -> Path:
    return Path(f"/lib/modules/{release}/build")


@dataclass(frozen=True)
class Headers:
    """Where bcc finds the kernel headers it compiles the probes against."""

    kind: str  # "build" (/lib/modules/RELEASE/build) | "kheaders" (the kernel's own archive)
    path: Path


def kernel_headers(release: str) -> Headers | None:
    build = module_build_dir(release)
    if (build / "include").is_dir():
        return Headers("build", build)
    if KHEADERS.exists():
        return Headers("kheaders", KHEADERS)
    return None


def mounted_filesystems() -> dict[str, str]:
    """mount point -> filesystem type, from /proc/self/mounts."""
    try:
        text = Path("/proc/self/mounts").read_text()
    except OSError:
        text = ""
    mounts = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            mounts[parts[1]] = parts[2]
    return mounts


def available_syscall_tracepoints() -> set[str]:
    """Names under tracefs events/syscalls (sys_enter_openat, ...): what this kernel offers."""
    return {p.name for p in SYSCALL_EVENTS.iterdir()} if SYSCALL_EVENTS.is_dir() else set()


# ---- the recorder's checks: raise what to do, or return -------------------------------------


def check_environment() -> None:
    """Everything a BPF recording needs, checked before any probe is compiled."""
    if os.geteuid() != 0:
        raise EnvironmentProblem(
            "recording needs root (BPF and tracepoints): run `sudo cmtrace ...`"
        )
    release = kernel_release()
    if not kernel_new_enough(release):
        raise EnvironmentProblem(
            f"kernel {release} is older than 5.8 (no BPF ring buffer): cmtrace needs 5.8 or newer"
        )
    ensure_tracefs()
    ensure_kernel_headers()


def ensure_kernel_headers() -> None:
    """bcc compiles the probes against kernel headers (or the kheaders module)."""
    release = kernel_release()
    if kernel_headers(release) is None:
        raise EnvironmentProblem(
            f"no kernel headers for {release}: run `make install` (links the closest Debian "
            f"headers) or `apt-get install linux-headers-{release}`"
        )


def ensure_tracefs() -> None:
    """The syscall tracepoints must be visible; mount tracefs when it is not."""
    if SYSCALL_EVENTS.is_dir():
        return
    result = subprocess.run(
        ["mount", "-t", "tracefs", "tracefs", str(TRACEFS)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 or not SYSCALL_EVENTS.is_dir():
        raise EnvironmentProblem(
            "tracefs is not mounted and could not be mounted: run `mount -t tracefs tracefs "
            "/sys/kernel/tracing` (and check the kernel has CONFIG_FTRACE_SYSCALLS)"
        )
