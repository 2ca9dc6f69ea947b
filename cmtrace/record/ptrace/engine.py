"""Start and talk to the ptrace engine (engine.c, a helper binary of its own).

The engine runs as its own process: in run mode it forks the command (so it is the parent, and
Yama's ptrace_scope 1 allows it), in attach mode it seizes the target's threads; its loop never
enters Python. This module finds the binary (built by `pip install` next to this file, or built
here on first use from engine.c with the C compiler when running from a checkout), starts it
with three pipes and exchanges probes/events.h's records and control messages over them.

    engine = Engine.run(["python3", "app.py"], follow=True, hold_exec=True)
    engine = Engine.attach(pid)
    batch, python_records = engine.read()    # whatever arrived (collect.Batch + stack/code recs)
    engine.configure(pid, config)             # wire.PyConfig, as the BPF map gets it
    engine.resume(pid)                        # after an EV_EXEC, with hold_exec
    stats = engine.wait()                     # the engine's counters; stats["exit_code"]
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
from dataclasses import dataclass, field

from cmtrace.record.ptrace import wire
from cmtrace.record.ptrace.build import (  # noqa: F401 (re-exported: where the engine comes from)
    BINARY,
    EngineUnavailable,
    build,
    engine_binary,
)
from cmtrace.record.records import Batch

PIPE_SIZE = 1 << 20  # the transport: blocking writes into it are the engine's backpressure
F_SETPIPE_SZ = 1031
READ_CHUNK = 1 << 20

EXIT_PTRACE_REFUSED = 77
PR_SET_PDEATHSIG = 1


def _die_with_cmtrace() -> None:
    """In the engine's process before exec: SIGKILL it when cmtrace dies (even by kill -9), so
    an attached target is detached by the kernel and runs on, and run's command dies with it
    (PTRACE_O_EXITKILL) instead of an orphaned engine tracing on with nobody reading."""
    import ctypes  # noqa: PLC0415

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        import fcntl  # noqa: PLC0415

        fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # a smaller pipe only means more, shorter waits
    return read_end, write_end


@dataclass
class Engine:
    process: subprocess.Popen
    records: int  # read end of the record stream
    control: int  # write end of the control channel
    stats_fd: int
    _pending: bytes = field(default=b"", repr=False)
    _eof: bool = field(default=False, repr=False)
    _heard: bool = field(default=False, repr=False)  # records came: its handlers are set
    _stats: dict | None = field(default=None, repr=False)  # wait()'s answer, once it ended

    @classmethod
    def run(cls, argv: list[str], follow: bool = True, hold_exec: bool = False,
            seccomp: bool = True, **popen) -> Engine:  # fmt: skip
        options = (["-f"] if follow else []) + (["-H"] if hold_exec else [])
        options += [] if seccomp else ["-n"]
        return cls._start(options + ["--", *argv], popen)

    @classmethod
    def attach(cls, pid: int, follow: bool = True, duration: float | None = None,
               hold_exec: bool = False, **popen) -> Engine:  # fmt: skip
        options = (["-f"] if follow else []) + (["-H"] if hold_exec else [])
        options += ["-d", str(duration)] if duration else []
        return cls._start(options + ["-p", str(pid)], popen)

    @classmethod
    def _start(cls, arguments: list[str], popen: dict) -> Engine:
        """`popen` may hold `binary` (another engine build), `wrapper` (a command the engine
        runs under, e.g. setpriv to drop privileges) and subprocess.Popen's own arguments."""
        binary = popen.pop("binary", None) or engine_binary()
        wrapper = list(popen.pop("wrapper", ()))
        records_r, records_w = _pipe()
        control_r, control_w = _pipe()
        stats_r, stats_w = os.pipe2(os.O_CLOEXEC)
        fds = (records_w, control_r, stats_w)
        command = [*wrapper, str(binary), "-o", str(records_w), "-c", str(control_r),
                   "-s", str(stats_w), *arguments]  # fmt: skip
        try:
            process = subprocess.Popen(command, pass_fds=fds, preexec_fn=_die_with_cmtrace, **popen)
        finally:
            for fd in fds:
                os.close(fd)
        return cls(process, records_r, control_w, stats_r)

    @property
    def pid(self) -> int:
        return self.process.pid

    def read(self, timeout: float = 0.0) -> tuple[Batch, list[bytes]]:
        """Everything that has arrived (waiting up to `timeout` s for the first bytes)."""
        chunks = [self._pending]
        wait = timeout
        while not self._eof and select.select([self.records], [], [], wait)[0]:
            data = os.read(self.records, READ_CHUNK)
            if not data:
                self._eof = True
                break
            chunks.append(data)
            self._heard = True
            wait = 0.0
        buf = b"".join(chunks)
        used, offsets, python_records = wire.split_frames(buf)
        self._pending = buf[used:]
        return Batch(buf[:used], offsets), python_records

    @property
    def finished(self) -> bool:
        """The record stream has ended (the engine exited or closed it)."""
        return self._eof

    def _send(self, message: bytes) -> None:
        """Write a control message; SIGUSR1 has the engine read it at once (else at its next
        tick), once the engine has shown it is running (before, the signal would kill it)."""
        if self.control < 0:
            return  # the engine has ended (wait() closed the channel)
        try:
            os.write(self.control, message)
            if self._heard:
                os.kill(self.process.pid, signal.SIGUSR1)
        except (BrokenPipeError, ProcessLookupError):
            pass  # the engine is gone: its end of the stream says how it ended

    def mark_running(self) -> None:
        """The engine has shown it runs (it seized its target: its handlers were installed
        before), so control messages can be signalled at once, not at its next tick."""
        self._heard = True

    def configure(self, pid: int, config: wire.PyConfig) -> None:
        self._send(wire.control_message(wire.CTL_CONFIG, pid, config))

    def forget(self, pid: int) -> None:
        self._send(wire.control_message(wire.CTL_FORGET, pid))

    def resume(self, pid: int) -> None:
        self._send(wire.control_message(wire.CTL_RESUME, pid))

    def hold_next(self, pid: int) -> None:
        """Let pid, held after its exec, run to its next stop and hold it there again."""
        self._send(wire.control_message(wire.CTL_HOLD_NEXT, pid))

    def stop(self) -> None:
        """Attach mode: detach from everything and exit (run mode records to the end)."""
        self._send(wire.control_message(wire.CTL_STOP, 0))

    def wait(self, timeout: float | None = None) -> dict:
        """Wait for the engine to exit; its counters (JSON line on the stats pipe). Again:
        the same counters."""
        if self._stats is not None:
            return self._stats
        self.process.wait(timeout)
        with os.fdopen(self.stats_fd, "r") as stats:
            line = stats.readline()
        if self.control >= 0:
            os.close(self.control)
            self.control = -1
        stats_dict = json.loads(line) if line else {"exit_code": self.process.returncode}
        stats_dict["engine_status"] = self.process.returncode
        self._stats = stats_dict
        return stats_dict

    def close(self) -> None:
        if self.records >= 0:
            os.close(self.records)
            self.records = -1
