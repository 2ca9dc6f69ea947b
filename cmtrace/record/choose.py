"""`--backend auto|bpf|ptrace`: which backend records, and the words that say why.

The reason goes into the attached line (`cmtrace: attached to PID (python3, Python 3.11.2,
backend ptrace: not root)`), the summary and meta.json. A backend that cannot work raises
EnvironmentProblem (exit 2) with one line: what is wrong and the fix; a pid that is no user
process raises TargetError (exit 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cmtrace.errors import EnvironmentProblem, UsageError
from cmtrace.record import permissions
from cmtrace.record.permissions import PROC, Access

BACKENDS = ("auto", "bpf", "ptrace")
MODES = ("run", "attach")


@dataclass(frozen=True)
class Choice:
    backend: str  # "bpf" or "ptrace"
    reason: str  # "backend bpf", "backend ptrace: not root"
    access: tuple[Access, ...]  # every backend examined, in the order tried


def choose_backend(requested: str, mode: str, pid: int | None = None, proc: Path = PROC) -> Choice:
    """The backend for `requested` in `mode` ("run", or "attach" to pid). auto takes BPF when
    its checks pass, else ptrace, and names the BPF check that failed."""
    if requested not in BACKENDS:
        raise UsageError(f"--backend {requested}: choose one of {', '.join(BACKENDS)}")
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    if requested == "bpf":
        bpf = permissions.bpf_access(mode, proc)
        return Choice("bpf", "backend bpf", (require(bpf),))
    if requested == "ptrace":
        ptrace = permissions.ptrace_access(mode, pid, proc)
        return Choice("ptrace", "backend ptrace", (require(ptrace),))
    return choose_automatically(mode, pid, proc)


def choose_automatically(mode: str, pid: int | None, proc: Path) -> Choice:
    bpf = permissions.bpf_access(mode, proc)
    if mode == "attach" and pid is not None:
        permissions.read_target(pid, proc)  # no such process: exit 4 whatever the backend
    if bpf.allowed:
        return Choice("bpf", "backend bpf", (bpf,))
    ptrace = permissions.ptrace_access(mode, pid, proc)
    why = short_reason(bpf)
    if ptrace.allowed:
        return Choice("ptrace", f"backend ptrace: {why}", (bpf, ptrace))
    raise EnvironmentProblem(f"cannot record: bpf: {why}; {ptrace.message()}")


def short_reason(access: Access) -> str:
    denial = access.denial
    if denial is None:
        return ""
    return denial.short or denial.reason


def require(access: Access) -> Access:
    """access itself when allowed; else the one-line EnvironmentProblem (exit 2)."""
    if not access.allowed:
        raise EnvironmentProblem(f"--backend {access.backend}: {access.message()}")
    return access


# ---- doctor ----------------------------------------------------------------------------------
def doctor_rows(pid: int | None = None, proc: Path = PROC) -> list[dict[str, str]]:
    """What each backend needs and whether this user has it, as doctor's rows: name ("ptrace
    attach: target user"), status (ok/warn/fail/info), detail, fix. Run mode always, attach
    when pid is given; probes only where /proc cannot tell (see permissions). A check fails
    only when no backend can record in that mode (auto falls back); otherwise a backend's
    failing checks are warnings. Each mode ends with a "backend auto (MODE)" row."""
    modes = [("run", None)] + ([("attach", pid)] if pid is not None else [])
    bpf = permissions.bpf_access("run", proc)  # BPF's needs are the same in both modes
    rows: list[dict[str, str]] = []
    for mode, target in modes:
        ptrace = permissions.ptrace_access(mode, target, proc)
        usable = [a for a in (bpf, ptrace) if a.allowed]
        shown = (ptrace,) if mode == "attach" else (bpf, ptrace)
        for access in shown:
            rows += access_rows(access, soften=bool(usable))
        rows.append(auto_row(mode, bpf, ptrace))
    return rows


def access_rows(access: Access, soften: bool) -> list[dict[str, str]]:
    label = "bpf" if access.backend == "bpf" else f"ptrace {access.mode}"
    rows = []
    for verdict in access.verdicts:
        status = "warn" if soften and verdict.status == permissions.FAIL else verdict.status
        rows.append(
            {
                "name": f"{label}: {verdict.check}",
                "status": status,
                "detail": verdict.reason,
                "fix": verdict.fix,
            }
        )
    return rows


def auto_row(mode: str, bpf: Access, ptrace: Access) -> dict[str, str]:
    """What --backend auto would do in mode, with the same words as the attached line."""
    name = f"backend auto ({mode})"
    if bpf.allowed:
        return {"name": name, "status": "ok", "detail": "backend bpf", "fix": ""}
    if ptrace.allowed:
        return {
            "name": name,
            "status": "ok",
            "fix": "",
            "detail": f"backend ptrace: {short_reason(bpf)}",
        }
    denial = ptrace.denial
    return {
        "name": name,
        "status": "fail",
        "fix": denial.fix if denial else "",
        "detail": f"cannot record: bpf: {short_reason(bpf)}; ptrace: {short_reason(ptrace)}",
    }
