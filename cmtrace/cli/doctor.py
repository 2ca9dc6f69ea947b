"""`cmtrace doctor`: what this host (and optionally one process) offers each recorder backend.

Every check reads the machine directly (uname, /proc, tracefs, the kernel config, the ELF of the
target) and says what to do about what is missing. The host checks are BPF's; the rows of
cmtrace.record.choose.doctor_rows say what each backend needs and whether this user has it, and
what --backend auto would pick. The exit code tells whether recording can work with some
backend: 0 yes (the last line says which), 2 no (EXIT_ENVIRONMENT). Nothing here changes the
machine.

Statuses: ok; warn (works, with a limit); missing (a kernel feature cmtrace does not need);
fail (recording cannot work until fixed); info (a fact, no verdict).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cmtrace.errors import EXIT_ENVIRONMENT, EXIT_OK, TargetError
from cmtrace.interp import discover, elfnotes
from cmtrace.record import environment
from cmtrace.record.environment import TRACEFS, mounted_filesystems

OK, WARN, MISSING, FAIL, INFO = "ok", "warn", "missing", "fail", "info"
SUBPROCESS_TIMEOUT_S = 90  # a bcc compile takes 1-2 s here, ~15 s under an emulated VM

# Capability numbers (linux/capability.h) by name, for CapEff decoding.
CAPABILITIES = (
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid", "setuid",
    "setpcap", "linux_immutable", "net_bind_service", "net_broadcast", "net_admin", "net_raw",
    "ipc_lock", "ipc_owner", "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct",
    "sys_admin", "sys_boot", "sys_nice", "sys_resource", "sys_time", "sys_tty_config", "mknod",
    "lease", "audit_write", "audit_control", "setfcap", "mac_override", "mac_admin", "syslog",
    "wake_alarm", "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore",
)  # fmt: skip

# Kernel config options checked, with the tracefs file that proves the feature at run time
# (None: no run-time witness) and the status when the option is unset.
CONFIG_FEATURES = (
    # name, CONFIG_ option, tracefs witness, status if absent, why it matters
    ("bpf syscall", "BPF_SYSCALL", None, FAIL, "loading any BPF program"),
    ("tracepoints", "FTRACE_SYSCALLS", "events/syscalls/sys_enter_openat", FAIL,
     "the fd probes attach to syscall tracepoints"),
    ("btf", "DEBUG_INFO_BTF", None, WARN,
     "kernel struct offsets (thread matching on CPython <= 3.10)"),
    ("uprobes", "UPROBE_EVENTS", "uprobe_events", WARN, "USDT probes for --calls"),
    ("kprobes", "KPROBE_EVENTS", "kprobe_events", MISSING, "not used by cmtrace"),
)  # fmt: skip

BACKEND_ROW_PREFIXES = ("bpf:", "ptrace ", "backend auto")  # choose.doctor_rows' names

CONTAINER_CGROUP_MARKERS = ("docker", "kubepods", "containerd", "libpod", "lxc", "podman")


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass
class Diagnosis:
    checks: list[Check] = field(default_factory=list)
    process: dict[str, Any] | None = None
    backends: list[str] | None = None  # the backends that can record (None: not judged yet)

    @property
    def bpf_can_record(self) -> bool:
        """The host checks are BPF's: any of them failing stops the BPF backend."""
        return not any(check.status == FAIL and check.name not in self._row_names
                       for check in self.checks)  # fmt: skip

    @property
    def _row_names(self) -> set[str]:
        return {c.name for c in self.checks if c.name.startswith(BACKEND_ROW_PREFIXES)}

    @property
    def can_record(self) -> bool:
        if self.backends is None:
            return self.bpf_can_record
        return bool(self.backends)

    def add(self, name: str, status: str, detail: str, fix: str = "") -> Check:
        check = Check(name, status, detail, fix)
        self.checks.append(check)
        return check

    def status_of(self, name: str) -> str | None:
        return next((c.status for c in self.checks if c.name == name), None)


# ------------------------------------------------------------------------------ small readers
def read_text(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def path_exists(path: str | Path) -> bool | None:
    """True/False, or None when we may not look (tracefs is root-only)."""
    try:
        os.stat(path)
        return True
    except FileNotFoundError:
        return False
    except OSError:
        return None


def read_sysctl(name: str) -> str | None:
    text = read_text("/proc/sys/" + name.replace(".", "/"))
    return text.strip() if text is not None else None


def kernel_config() -> tuple[dict[str, str], str | None]:
    """The running kernel's config as {OPTION: value} and where it was read from."""
    release = os.uname().release
    for path in ("/proc/config.gz", f"/boot/config-{release}", f"/lib/modules/{release}/config"):
        try:
            raw = gzip.open(path, "rt").read() if path.endswith(".gz") else Path(path).read_text()
        except OSError:
            continue
        options = {}
        for line in raw.splitlines():
            match = re.match(r"CONFIG_(\w+)=(.*)", line)
            if match:
                options[match.group(1)] = match.group(2)
        return options, path
    return {}, None


def effective_capabilities(status_text: str | None = None) -> set[str]:
    """Names of the capabilities in CapEff of this process (/proc/self/status)."""
    text = status_text if status_text is not None else read_text("/proc/self/status") or ""
    match = re.search(r"^CapEff:\s*([0-9a-f]+)", text, re.M)
    mask = int(match.group(1), 16) if match else 0
    return {name for bit, name in enumerate(CAPABILITIES) if mask >> bit & 1}


# ------------------------------------------------------------------------------ host checks
def check_kernel_version(diag: Diagnosis) -> None:
    release = environment.kernel_release()
    if environment.kernel_new_enough(release):
        diag.add("kernel", OK, f"{release} (BPF ring buffer needs >= 5.8)")
    else:
        diag.add(
            "kernel", FAIL, f"{release}: older than 5.8, no BPF ring buffer",
            "boot a kernel >= 5.8 (Debian 11+, Ubuntu 20.10+), or use the Vagrant VM",
        )  # fmt: skip


def check_kernel_features(diag: Diagnosis, tracefs_ok: bool) -> None:
    config, source = kernel_config()
    if source is None:
        diag.add("kernel config", INFO, "not readable (/proc/config.gz, /boot/config-*)")
    else:
        diag.add("kernel config", INFO, f"read from {source}")
    for name, option, witness, absent_status, why in CONFIG_FEATURES:
        check_one_feature(diag, name, option, witness, absent_status, why, config, tracefs_ok)


def check_one_feature(
    diag: Diagnosis,
    name: str,
    option: str,
    witness: str | None,
    absent_status: str,
    why: str,
    config: dict[str, str],
    tracefs_ok: bool,
) -> None:
    """A feature is present if tracefs shows it; else the config decides; else it is unknown."""
    in_config = config.get(option) in ("y", "m") if config else None
    if name == "btf":
        seen = path_exists("/sys/kernel/btf/vmlinux")
    elif witness and tracefs_ok:
        seen = path_exists(TRACEFS / witness)
    else:
        seen = None
    present = seen if seen is not None else in_config
    evidence = []
    if in_config is not None:
        evidence.append(f"CONFIG_{option}={'y' if in_config else 'unset'}")
    if seen is not None:
        where = "/sys/kernel/btf/vmlinux" if name == "btf" else f"tracefs {witness}"
        evidence.append(f"{where} {'present' if seen else 'absent'}")
    detail = ", ".join(evidence) or "no evidence (config unreadable, tracefs not readable)"
    if present:
        diag.add(name, OK, f"{detail} ({why})")
    elif present is None:
        diag.add(name, WARN, detail, "run as root with tracefs mounted")
    else:
        fix = "" if absent_status == MISSING else f"needs a kernel with CONFIG_{option}=y ({why})"
        diag.add(name, absent_status, f"{detail} ({why})", fix)


def check_permissions(diag: Diagnosis, caps: set[str]) -> bool:
    """Loading and attaching needs CAP_BPF+CAP_PERFMON, or CAP_SYS_ADMIN (root has all)."""
    uid = os.geteuid()
    granted = "sys_admin" in caps or {"bpf", "perfmon"} <= caps
    lacking = sorted({"bpf", "perfmon"} - caps) if "sys_admin" not in caps else []
    who = f"euid {uid}, CapEff: {format_caps(caps)}"
    if granted:
        diag.add("permissions", OK, f"{who} (can load BPF programs)")
    else:
        names = ", ".join("CAP_" + c.upper() for c in lacking)
        diag.add(
            "permissions", FAIL, f"{who}: lacks {names}",
            "run as root (sudo cmtrace ...); in a container, grant CAP_BPF, CAP_PERFMON "
            "and CAP_SYS_PTRACE (docker run --cap-add BPF --cap-add PERFMON ...)",
        )  # fmt: skip
    if "sys_ptrace" in caps:
        diag.add("ptrace", OK, "CAP_SYS_PTRACE: can read any process's memory (/proc/PID/mem)")
    else:
        diag.add(
            "ptrace", WARN, "no CAP_SYS_PTRACE: only own processes' memory is readable",
            "run as root, or grant CAP_SYS_PTRACE (layout validation and the ptrace backend)",
        )  # fmt: skip
    return granted


def format_caps(caps: set[str]) -> str:
    if not caps:
        return "none"
    if len(caps) >= len(CAPABILITIES) - 2:
        missing = [c for c in CAPABILITIES if c not in caps]
        return "all" + (" but " + ",".join(missing) if missing else "")
    return ",".join(sorted(caps))


def check_lockdown(diag: Diagnosis) -> None:
    text = read_text("/sys/kernel/security/lockdown")
    if text is None:
        config, _ = kernel_config()
        if config.get("LOCK_DOWN_KERNEL_FORCE_CONFIDENTIALITY") == "y":
            diag.add("lockdown", FAIL, "confidentiality (forced by the kernel config)",
                     "boot with lockdown=integrity or none")  # fmt: skip
            return
        diag.add("lockdown", INFO, "securityfs not mounted; not readable",
                 "mount -t securityfs securityfs /sys/kernel/security to see it")  # fmt: skip
        return
    mode = re.search(r"\[(\w+)\]", text)
    level = mode.group(1) if mode else text.strip()
    if level == "confidentiality":
        diag.add("lockdown", FAIL, "confidentiality: BPF may not read process memory",
                 "boot with lockdown=integrity or none (e.g. disable Secure Boot lockdown)")  # fmt: skip
    else:
        diag.add("lockdown", OK, f"{level} (bpf_probe_read_user allowed)")


def check_sysctls(diag: Diagnosis, privileged: bool) -> None:
    paranoid = read_sysctl("kernel.perf_event_paranoid")
    if paranoid is None:
        diag.add("perf_event_paranoid", INFO, "not present")
    elif privileged:
        diag.add("perf_event_paranoid", OK, f"{paranoid} (no limit for CAP_PERFMON/root)")
    else:
        diag.add("perf_event_paranoid", WARN, f"{paranoid}: limits unprivileged perf events",
                 "run cmtrace as root")  # fmt: skip
    scope = read_sysctl("kernel.yama.ptrace_scope")
    if scope is None:
        diag.add("ptrace_scope", OK, "no Yama LSM: no ptrace restriction")
    elif scope == "3":
        diag.add("ptrace_scope", WARN, "3: no process may read another's memory, even root",
                 "reboot with kernel.yama.ptrace_scope <= 2 for layout validation")  # fmt: skip
    else:
        diag.add("ptrace_scope", OK, f"{scope} (root/CAP_SYS_PTRACE may read processes)")
    unpriv = read_sysctl("kernel.unprivileged_bpf_disabled")
    meaning = {"0": "unprivileged BPF allowed", "1": "BPF needs privilege (locked)",
               "2": "BPF needs privilege"}.get(unpriv or "", "unknown")  # fmt: skip
    diag.add("unprivileged_bpf_disabled", INFO, f"{unpriv} ({meaning}); cmtrace runs privileged")


def check_mounts(diag: Diagnosis) -> bool:
    mounts = mounted_filesystems()
    tracefs_at = [m for m, fs in mounts.items() if fs == "tracefs"]
    if str(TRACEFS) in tracefs_at:
        diag.add("tracefs", OK, f"mounted at {TRACEFS}")
    elif tracefs_at:
        diag.add("tracefs", WARN, f"mounted at {', '.join(tracefs_at)} but not at {TRACEFS}",
                 f"mount -t tracefs tracefs {TRACEFS}")  # fmt: skip
    else:
        diag.add("tracefs", FAIL, "not mounted", f"mount -t tracefs tracefs {TRACEFS}")
    if mounts.get("/sys/kernel/debug") == "debugfs":
        diag.add("debugfs", OK, "mounted at /sys/kernel/debug")
    else:
        diag.add("debugfs", INFO, "not mounted (not needed when tracefs is)",
                 "mount -t debugfs debugfs /sys/kernel/debug (for older tools)")  # fmt: skip
    return str(TRACEFS) in tracefs_at


def check_headers(diag: Diagnosis) -> None:
    release = environment.kernel_release()
    build = environment.module_build_dir(release)
    headers = environment.kernel_headers(release)
    if headers is not None and headers.kind == "build":
        target = os.path.realpath(build)
        if release in target:
            diag.add("kernel headers", OK, f"matching: {build} -> {target}")
        else:
            diag.add("kernel headers", OK,
                     f"linked: {build} -> {target} (not {release}; enough for tracepoints "
                     "and uprobes, struct offsets come from BTF)")  # fmt: skip
    elif headers is not None:
        diag.add("kernel headers", OK, f"from the kernel itself ({headers.path})")
    else:
        diag.add("kernel headers", FAIL, f"none at {build}",
                 f"sudo make install (links generic headers), or apt install "
                 f"linux-headers-{release}")  # fmt: skip


def run_python(code: str, extra_env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `code` in a fresh interpreter: a broken bcc (segfault, abort) cannot crash doctor."""
    env = dict(os.environ, **(extra_env or {}))
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True,
            timeout=SUBPROCESS_TIMEOUT_S, env=env,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {SUBPROCESS_TIMEOUT_S} s"
    output = (done.stdout + done.stderr).strip()
    return done.returncode, output


def check_bcc(diag: Diagnosis) -> bool:
    rc, out = run_python("import bcc, os; print(bcc.__version__, os.path.dirname(bcc.__file__))")
    if rc == 0:
        diag.add("bcc", OK, f"bcc {out}")
        return True
    last = out.splitlines()[-1] if out else f"exit status {rc}"
    diag.add("bcc", FAIL, f"import bcc failed: {last}",
             "apt install python3-bpfcc and use a venv made with /usr/bin/python3 -m venv "
             "--system-site-packages (sudo make install does both)")  # fmt: skip
    return False


# A tracepoint program of the kind cmtrace loads: proves compile + load + attach end to end.
PROBE_LOAD_TEST = """
from bcc import BPF
b = BPF(text='TRACEPOINT_PROBE(syscalls, sys_enter_close) { return 0; }')
print("attached", b.num_open_tracepoints())
"""


def check_probe_load(diag: Diagnosis, prerequisites_ok: bool) -> None:
    if not prerequisites_ok:
        diag.add("bpf load test", INFO, "skipped: a prerequisite above failed")
        return
    rc, out = run_python(PROBE_LOAD_TEST)
    if rc == 0 and "attached" in out:
        diag.add("bpf load test", OK, "compiled, loaded and attached a syscall tracepoint program")
    else:
        tail = " | ".join(out.splitlines()[-2:]) if out else f"exit status {rc}"
        diag.add("bpf load test", FAIL, f"failed: {tail}",
                 "see the lines above; run as root on a kernel with BPF and tracepoints")  # fmt: skip


def container_markers() -> list[str]:
    markers = [p for p in ("/.dockerenv", "/run/.containerenv") if Path(p).exists()]
    cgroup = read_text("/proc/self/cgroup") or ""
    markers += [f"cgroup {m}" for m in CONTAINER_CGROUP_MARKERS if m in cgroup]
    init_env = read_text("/proc/1/environ") or ""
    match = re.search(r"(?:^|\0)container=([^\0]*)", init_env)
    if match:
        markers.append(f"container={match.group(1)}")
    uid_map = (read_text("/proc/self/uid_map") or "").split()
    if uid_map and uid_map[:3] != ["0", "0", "4294967295"]:
        markers.append(f"user namespace (uid_map {' '.join(uid_map[:3])})")
    return markers


def check_container(diag: Diagnosis, caps: set[str]) -> None:
    markers = container_markers()
    if markers:
        diag.add("container", INFO, f"yes ({'; '.join(markers)}); capabilities: "
                 f"{format_caps(caps)}")  # fmt: skip
    else:
        diag.add("container", INFO, "not detected")


def diagnose_host(diag: Diagnosis, load_test: bool = True) -> None:
    caps = effective_capabilities()
    check_kernel_version(diag)
    tracefs_ok = guarded(diag, "tracefs", check_mounts, diag)
    guarded(diag, "kernel config", check_kernel_features, diag, bool(tracefs_ok))
    privileged = check_permissions(diag, caps)
    guarded(diag, "lockdown", check_lockdown, diag)
    guarded(diag, "sysctls", check_sysctls, diag, privileged)
    guarded(diag, "kernel headers", check_headers, diag)
    bcc_ok = check_bcc(diag)
    guarded(diag, "container", check_container, diag, caps)
    if load_test:
        check_probe_load(diag, bool(privileged and tracefs_ok and bcc_ok))


def guarded(diag: Diagnosis, name: str, check: Callable[..., Any], *args: Any) -> Any:
    """Run one check; a file we may not read becomes an info line, never a traceback."""
    try:
        return check(*args)
    except OSError as exc:
        diag.add(name, INFO, f"could not check: {exc}", "run as root to see this")
        return None


# ------------------------------------------------------------------------------ -p PID
PYTHON_ELF = re.compile(r"(?:^|/)(?:lib)?python(\d)\.(\d+)[a-z]*(?:\.so[.\d]*|$)")


def python_mappings(pid: int) -> list[tuple[str, str]]:
    """(map_files name "start-end", path) of the mappings that look like a CPython ELF,
    libpython first (it holds the interpreter when both exist), one per path."""
    found: dict[str, str] = {}
    for line in (read_text(f"/proc/{pid}/maps") or "").splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and PYTHON_ELF.search(parts[5].strip()) and parts[5] not in found:
            found[parts[5].strip()] = parts[0]
    return sorted(((r, p) for p, r in found.items()), key=lambda rp: "libpython" not in rp[1])


def open_mapped_file(pid: int, region: str, path: str) -> BinaryIO | None:
    """Open a file mapped by pid as the process sees it (containers, chroots): map_files first."""
    for candidate in (f"/proc/{pid}/map_files/{region}", f"/proc/{pid}/root{path}", path):
        try:
            return open(candidate, "rb")
        except OSError:
            continue
    return None


def layout_source(major: int, minor: int) -> str:
    if (major, minor) >= (3, 13):
        return "_Py_DebugOffsets read from the process"
    if (3, 8) <= (major, minor) <= (3, 12):
        return f"cmtrace's table for {major}.{minor}, validated at attach"
    return "unsupported version: fds are recorded without Python stacks"


def discover_with_interpreter_module(pid: int) -> dict[str, Any] | None:
    """What cmtrace.interp.discover (the recorder's own discovery) finds: the exact version, the
    runtime address and a checked layout, or why stacks would be unavailable."""
    try:
        found = discover.find_interpreter(pid)
    except Exception as exc:  # NotPython/NotReady say why; anything else is reported, not raised
        return {"stacks": f"unavailable: {exc}"}
    return {
        "stacks": "available",
        "full_version": str(getattr(found, "version", "")),
        "runtime_address": hex(getattr(found, "runtime", 0)),
        "elf": str(getattr(found, "path", "")),
    }


def jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return str(value)


def namespace_facts(pid: int) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    try:
        facts["root"] = os.readlink(f"/proc/{pid}/root")
        facts["pid_namespace_differs"] = os.readlink(f"/proc/{pid}/ns/pid") != os.readlink(
            "/proc/self/ns/pid"
        )
        facts["mount_namespace_differs"] = os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink(
            "/proc/self/ns/mnt"
        )
    except OSError as exc:
        facts["error"] = f"cannot read /proc/{pid} namespaces: {exc.strerror}"
    status = read_text(f"/proc/{pid}/status") or ""
    match = re.search(r"^NSpid:\s*(.+)$", status, re.M)
    if match:
        facts["ns_pids"] = [int(p) for p in match.group(1).split()]
    return facts


def describe_process(pid: int) -> dict[str, Any]:
    if not Path(f"/proc/{pid}").is_dir():
        raise TargetError(f"no process {pid}: give the pid of a running process (see ps)")
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except FileNotFoundError:
        raise TargetError(f"pid {pid} is a kernel thread: give a user-space process") from None
    except PermissionError:
        exe = None
    comm = (read_text(f"/proc/{pid}/comm") or "").strip()
    info: dict[str, Any] = {"pid": pid, "comm": comm, "exe": exe}
    info.update(namespace_facts(pid))
    mappings = python_mappings(pid)
    info["python"] = bool(mappings)
    if mappings:
        describe_python(pid, mappings, info)
    return info


def describe_python(pid: int, mappings: list[tuple[str, str]], info: dict[str, Any]) -> None:
    region, path = mappings[0]
    match = PYTHON_ELF.search(path)
    assert match is not None  # python_mappings keeps only the paths PYTHON_ELF matches
    major, minor = int(match.group(1)), int(match.group(2))
    info.update(version=f"{major}.{minor}", interpreter_elf=path,
                layout_source=layout_source(major, minor))  # fmt: skip
    probes: list[elfnotes.Probe] = []
    for region, path in mappings:  # probes may sit in the executable or in libpython
        handle = open_mapped_file(pid, region, path)
        if handle is None:
            continue
        with handle:
            try:
                probes += elfnotes.probes_in(handle)
            except Exception:  # not an ELF we can parse: no probes to report
                continue
    info["usdt_probes"] = sorted({f"{p.provider}:{p.name}" for p in probes})
    info["usdt_function_entry"] = "python:function__entry" in info["usdt_probes"]
    info["calls"] = elfnotes.calls_unavailable(minor, probes) or "available"
    discovered = discover_with_interpreter_module(pid)
    if discovered is not None:
        info.update(discovered)


def add_process_checks(diag: Diagnosis, info: dict[str, Any]) -> None:
    pid = info["pid"]
    name = f"pid {pid}"
    where = info.get("root", "/")
    container = []
    if where != "/":
        container.append(f"root {where}")
    if info.get("pid_namespace_differs"):
        container.append(f"own pid namespace (pids {info.get('ns_pids')})")
    if info.get("mount_namespace_differs"):
        container.append("own mount namespace")
    context = f"; {', '.join(container)}" if container else ""
    if not info["python"]:
        diag.add(name, INFO, f"{info['comm']} ({info['exe']}): not CPython; its fds are "
                 f"recorded without Python stacks{context}")  # fmt: skip
        return
    probes = info["usdt_probes"]
    usdt = (f"{len(probes)} USDT probes, function__entry "
            f"{'present' if info['usdt_function_entry'] else 'absent'}") if probes else "no USDT probes"  # fmt: skip
    calls = info.get("calls", "available")
    usdt += "; --calls available" if calls == "available" else f"; --calls unavailable: {calls}"
    version = info.get("full_version") or info["version"]
    stacks = info.get("stacks", "available")
    status = OK if stacks == "available" else WARN
    fix = "" if status == OK else "fds are still recorded, without Python stacks"
    diag.add(name, status, f"CPython {version} ({info['interpreter_elf']}); layout: "
             f"{info['layout_source']}; Python stacks {stacks}; {usdt}{context}", fix)  # fmt: skip


# ------------------------------------------------------------------------------ output
STATUS_STYLE = {OK: "green", WARN: "yellow", MISSING: "dim", FAIL: "bold red", INFO: "cyan"}


def to_json(diag: Diagnosis) -> str:
    doc = {
        "ok": diag.can_record,
        "backends": diag.backends,
        "kernel": os.uname().release,
        "checks": [dataclasses.asdict(c) for c in diag.checks],
        "process": diag.process,
    }
    return json.dumps(doc, indent=2)


def print_table(diag: Diagnosis) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # logs and CI: wider than rich's 80-column default
    table = Table(title="cmtrace doctor")
    for column in ("check", "status", "detail / fix"):
        table.add_column(column, overflow="fold")
    for check in diag.checks:
        style = STATUS_STYLE.get(check.status, "")
        text = escape(check.detail)
        if check.fix:
            text += f"\n[bold]fix:[/] {escape(check.fix)}"
        table.add_row(check.name, f"[{style}]{check.status}[/]", text)
    console.print(table)
    if diag.can_record:
        which = " or ".join(diag.backends or ["bpf"])
        console.print(f"cmtrace doctor: recording can work (backend {which})")
    else:
        console.print("cmtrace doctor: recording cannot work: fix the [bold red]fail[/] lines")


# ------------------------------------------------------------------------------ command
def add_backend_rows(diag: Diagnosis, pid: int | None) -> None:
    """What each backend needs and whether this user has it (choose.doctor_rows), then which
    backends can record: BPF when its host checks and its access pass, ptrace when this user
    may trace in every mode asked (run, and attach to pid)."""
    from cmtrace.record import choose, permissions  # noqa: PLC0415

    for row in choose.doctor_rows(pid):
        diag.add(row["name"], row["status"], row["detail"], row["fix"])
    modes = [("run", None)] + ([("attach", pid)] if pid is not None else [])
    backends = []
    if diag.bpf_can_record and permissions.bpf_access("run").allowed:
        backends.append("bpf")
    if all(permissions.ptrace_access(mode, target).allowed for mode, target in modes):
        backends.append("ptrace")
    diag.backends = backends


def run(args: argparse.Namespace) -> int:
    diag = Diagnosis()
    diagnose_host(diag, load_test=not args.no_load_test)
    if args.pid is not None:
        diag.process = describe_process(args.pid)
        add_process_checks(diag, diag.process)
    add_backend_rows(diag, args.pid)
    if args.format == "json":
        print(to_json(diag))
    else:
        print_table(diag)
    return EXIT_OK if diag.can_record else EXIT_ENVIRONMENT


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "doctor",
        description="Check kernel, permissions, mounts, headers and bcc (the BPF backend) and "
        "what the ptrace backend needs (ptrace_scope, CAP_SYS_PTRACE, seccomp, the engine); "
        "with -p, a process and whether this user may attach to it. Exit 0 if some backend "
        "can record (the last line says which), 2 if none.",
    )
    parser.add_argument("-p", "--pid", type=int, help="also examine this process")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument(
        "--no-load-test", action="store_true",
        help="skip compiling and attaching a test BPF program (saves 1-2 s)",
    )  # fmt: skip
    parser.set_defaults(func=run)
