"""`cmtrace doctor` against what this machine really offers, read independently here.

Ground truth comes from other sources than doctor's: kernel symbols in /proc/kallsyms, tracefs
files, `readelf -n` for USDT notes, the interpreter's own `sys.version_info`. The unprivileged
runs really drop privileges (setpriv), so the permission verdict is the kernel's, not a mock.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm  # cheap and kernel-dependent: also run inside the VM guest

NOBODY = 65534
TRACEFS = Path("/sys/kernel/tracing")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="doctor's verdicts are checked as root")


def run_doctor(*args: str, prefix: tuple[str, ...] = ()) -> tuple[int, dict | None, str]:
    """Run `cmtrace doctor --format json ARGS` in a fresh interpreter: (exit code, doc, stderr)."""
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "cmtrace", "doctor", "--format", "json", *args],
        capture_output=True, text=True, timeout=180, cwd="/",
    )  # fmt: skip
    doc = json.loads(done.stdout) if done.stdout.strip().startswith("{") else None
    return done.returncode, doc, done.stderr


def checks_by_name(doc: dict) -> dict[str, dict]:
    return {check["name"]: check for check in doc["checks"]}


def kernel_symbols() -> set[str]:
    return {line.split()[2] for line in Path("/proc/kallsyms").read_text().splitlines()}


def release_tuple() -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", os.uname().release).groups()
    return int(major), int(minor)


@pytest.fixture(scope="module")
def host_doc() -> dict:
    rc, doc, err = run_doctor()
    assert doc is not None, f"doctor printed no JSON (exit {rc}): {err}"
    doc["_rc"] = rc
    return doc


@needs_root
def test_host_verdict_is_ok_and_load_test_attaches(host_doc):
    checks = checks_by_name(host_doc)
    failing = [c for c in host_doc["checks"] if c["status"] == "fail"]
    assert host_doc["_rc"] == 0 and host_doc["ok"] is True, failing
    assert checks["bpf load test"]["status"] == "ok"
    assert checks["permissions"]["status"] == "ok"
    assert checks["bcc"]["status"] == "ok"
    assert host_doc["kernel"] == os.uname().release


@needs_root
def test_kernel_features_match_kallsyms_and_tracefs(host_doc):
    """kprobes/uprobes: doctor's verdict equals what the kernel's own symbol table says."""
    checks = checks_by_name(host_doc)
    symbols = kernel_symbols()
    has_kprobes = "register_kprobe" in symbols
    assert has_kprobes == (TRACEFS / "kprobe_events").exists()  # the two witnesses agree
    assert checks["kprobes"]["status"] == ("ok" if has_kprobes else "missing")
    has_uprobes = "uprobe_register" in symbols or "uprobe_register_refctr" in symbols
    assert checks["uprobes"]["status"] == ("ok" if has_uprobes else "warn")
    has_tracepoints = (TRACEFS / "events/syscalls/sys_enter_openat").is_dir()
    assert checks["tracepoints"]["status"] == ("ok" if has_tracepoints else "fail")
    has_btf = Path("/sys/kernel/btf/vmlinux").exists()
    assert checks["btf"]["status"] == ("ok" if has_btf else "warn")
    assert checks["kernel"]["status"] == ("ok" if release_tuple() >= (5, 8) else "fail")


@needs_root
def test_headers_line_names_the_real_target(host_doc):
    build = Path(f"/lib/modules/{os.uname().release}/build")
    check = checks_by_name(host_doc)["kernel headers"]
    if (build / "include").is_dir():
        assert check["status"] == "ok"
        assert os.path.realpath(build) in check["detail"]
    else:
        assert check["status"] in ("ok", "fail")  # ok only through /sys/kernel/kheaders


def nobody_can_import_cmtrace() -> bool:
    done = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-c", "import cmtrace.cli, cmtrace.cli.doctor"],
        capture_output=True, cwd="/",
    )  # fmt: skip
    return done.returncode == 0


@needs_root
def test_unprivileged_user_records_with_ptrace_and_is_told_why_not_bpf():
    """An ordinary user cannot load BPF (said, with the fix), but can record its own command
    with ptrace: exit 0, and auto picks ptrace; attaching to root's pid 1 it cannot: exit 2."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    if not nobody_can_import_cmtrace():
        pytest.skip("this checkout is not readable by user nobody (a parent directory is 0700)")
    nobody = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
    rc, doc, err = run_doctor(prefix=nobody)
    assert rc == 0 and doc is not None, err
    assert doc["ok"] is True and doc["backends"] == ["ptrace"]
    checks = checks_by_name(doc)
    permissions = checks["permissions"]
    assert permissions["status"] == "fail"
    assert f"euid {NOBODY}" in permissions["detail"]
    assert "CAP_BPF" in permissions["detail"] and "root" in permissions["fix"]
    assert checks["backend auto (run)"] == {
        "name": "backend auto (run)", "status": "ok", "detail": "backend ptrace: not root",
        "fix": "",
    }  # fmt: skip
    rc, doc, err = run_doctor("-p", "1", prefix=nobody)
    assert rc == 2 and doc is not None and doc["ok"] is False, err
    auto = checks_by_name(doc)["backend auto (attach)"]
    assert auto["status"] == "fail" and "another user's process" in auto["detail"], auto


@needs_root
def test_root_without_capabilities_is_refused_bpf_like_a_locked_down_container():
    """uid 0 with an empty capability set (what a restricted container gives): no BPF, ptrace."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    prefix = ("setpriv", "--inh-caps=-all", "--bounding-set=-all")
    rc, doc, err = run_doctor(prefix=prefix)
    assert rc == 0 and doc is not None, err  # ptrace needs no capability to run a command
    assert doc["backends"] == ["ptrace"]
    checks = checks_by_name(doc)
    assert checks["permissions"]["status"] == "fail"
    assert "euid 0" in checks["permissions"]["detail"]
    assert "CapEff: none" in checks["permissions"]["detail"]
    assert "CAP_BPF" in checks["permissions"]["fix"]
    assert checks["ptrace"]["status"] == "warn"
    assert "capabilities: none" in checks["container"]["detail"] or (
        checks["container"]["detail"] == "not detected"
    )


# ---------------------------------------------------------------------------------- -p PID
def interpreters() -> list[tuple[str, list[str]]]:
    """(label, command prefix) of the CPython builds present here."""
    found = [("debian", ["/usr/bin/python3"])]
    for version in ("3.12", "3.10", "3.8"):
        builds = sorted(glob.glob(f"/root/.pyenv/versions/{version}.*/bin/python{version}"))
        if builds:
            found.append((f"pyenv-{version}", [builds[-1]]))
    for version in ("3.9", "3.13", "3.15"):
        wrapper = f"/opt/cmtrace/pythons/bin/python{version}"
        if os.access(wrapper, os.X_OK):
            found.append((f"debian-{version}", [wrapper]))
    return found


SLEEPER = (
    "import platform, sys, time; print(platform.python_version(), flush=True); time.sleep(120)"
)


def start(command: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd="/")
    first_line = proc.stdout.readline().strip()
    return proc, first_line


def usdt_ground_truth(pid: int) -> set[str]:
    """provider:name of the USDT notes of the process's interpreter ELFs, via readelf."""
    elves = {os.readlink(f"/proc/{pid}/exe")}
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split(None, 5)[-1]
        if re.search(r"/libpython\d\.\d+", path):
            elves.add(path)
    probes = set()
    for elf in elves:
        notes = subprocess.run(["readelf", "-n", elf], capture_output=True, text=True).stdout
        for provider, name in re.findall(r"Provider: (\S+)\s+Name: (\S+)", notes):
            probes.add(f"{provider}:{name}")
    return probes


@needs_root
@pytest.mark.parametrize("label,command", interpreters(), ids=[i[0] for i in interpreters()])
def test_pid_of_python_reports_version_usdt_and_root(label, command):
    proc, full_version = start([*command, "-c", SLEEPER])
    version = ".".join(full_version.split(".")[:2])
    try:
        assert re.fullmatch(r"\d\.\d+\.\d+.*", full_version), f"{label} did not start"
        rc, doc, err = run_doctor("--no-load-test", "-p", str(proc.pid))
        assert rc == 0 and doc is not None, err
        process = doc["process"]
        assert process["pid"] == proc.pid
        assert process["python"] is True
        assert process["version"] == version
        if shutil.which("readelf"):
            assert set(process["usdt_probes"]) == usdt_ground_truth(proc.pid)
        assert process["usdt_function_entry"] == (
            "python:function__entry" in process["usdt_probes"]
        )
        assert process["root"] == os.readlink(f"/proc/{proc.pid}/root")
        if label in ("debian-3.13", "debian-3.15"):  # the sid builds run in a chroot
            assert process["root"] != "/", "a chrooted interpreter must show its root"
        line = checks_by_name(doc)[f"pid {proc.pid}"]
        if process.get("stacks") == "available":  # cmtrace.interp.discover found and checked it
            # <= 3.10 export no Py_Version: discovery knows the minor only ("3.9")
            found = process["full_version"]
            assert found == full_version or full_version.startswith(found + ".")
            assert line["status"] == "ok" and f"CPython {found}" in line["detail"]
        else:
            assert line["status"] in ("ok", "warn") and f"CPython {version}" in line["detail"]
    finally:
        proc.kill()
        proc.wait()


@needs_root
def test_pid_of_non_python_process():
    proc = subprocess.Popen(["sleep", "120"])
    try:
        rc, doc, err = run_doctor("--no-load-test", "-p", str(proc.pid))
        assert rc == 0 and doc is not None, err
        assert doc["process"]["python"] is False
        assert doc["process"]["comm"] == "sleep"
        assert "not CPython" in checks_by_name(doc)[f"pid {proc.pid}"]["detail"]
    finally:
        proc.kill()
        proc.wait()


def test_missing_pid_is_a_target_error():
    pid = max(int(p) for p in os.listdir("/proc") if p.isdigit()) + 100000
    while Path(f"/proc/{pid}").exists():
        pid += 1
    rc, doc, err = run_doctor("--no-load-test", "-p", str(pid))
    assert rc == 4 and doc is None
    assert err.strip().count("\n") == 0 and f"no process {pid}" in err


PF_KTHREAD = 0x00200000  # task flag of kernel threads (include/linux/sched.h)


def is_kernel_thread(pid: str) -> bool:
    """From the flags field of /proc/PID/stat (every kernel has it; "Kthread:" is 6.x only)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # exited meanwhile
        return False
    flags = int(stat.rsplit(")", 1)[1].split()[6])
    return bool(flags & PF_KTHREAD)


@needs_root
def test_kernel_thread_is_a_target_error():
    kthreads = [int(p) for p in os.listdir("/proc") if p.isdigit() and is_kernel_thread(p)]
    if not kthreads:
        pytest.skip("no kernel thread is visible in /proc (a pid namespace of its own?)")
    rc, doc, err = run_doctor("--no-load-test", "-p", str(kthreads[0]))
    assert rc == 4 and "kernel thread" in err
