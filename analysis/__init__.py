"""cmtrace.analysis: the pandas layer over a recorded trace.

    import cmtrace.analysis as cma
    trace = cma.load("cmtrace-1234-20260101-120000")
    trace.leaks()                  # leaked fd lifetimes with site, with statement, cause, fix
    trace.sites()                  # per opening line: opened, closed, leaked, leaks/s, cause
    trace.fds                      # every fd lifetime (pid, fd, kind, path, born_ns, died_ns...)
    trace.live_fds(at=2_000_000_000)     # the fd table 2 s into the trace
    trace.timeline(by="site", freq="100ms")   # live fds per site over time

Nothing here imports bcc: a trace recorded on a server is analysed on any machine.
"""

from cmtrace.analysis.api import Trace, load, read_exclude_file, site_matches
from cmtrace.analysis.causes import CAUSES
from cmtrace.analysis.lifetimes import build_lifetimes

__all__ = ["CAUSES", "Trace", "build_lifetimes", "load", "read_exclude_file", "site_matches"]
