"""Exit codes and the one error type every command turns into a one-line message."""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 1  # bad arguments, output directory refused
EXIT_ENVIRONMENT = 2  # not root, no BPF, no bcc, no headers, tracefs...
EXIT_LEAKS = 3  # --fail-on-leak and leaks were found
EXIT_TARGET = 4  # no such pid, kernel thread, target vanished before attach
EXIT_TRACE = 5  # trace directory missing, corrupt or unreadable
EXIT_DISK_FULL = 6  # recording stopped because the disk filled up (the trace is kept)


class CmtraceError(Exception):
    """An error the user can act on: `message` says what is wrong and what to do."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(CmtraceError):
    exit_code = EXIT_USAGE


class EnvironmentProblem(CmtraceError):
    exit_code = EXIT_ENVIRONMENT


class TargetError(CmtraceError):
    exit_code = EXIT_TARGET


class TraceError(CmtraceError):
    exit_code = EXIT_TRACE
