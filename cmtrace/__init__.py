"""cmtrace: trace file-descriptor lifetimes of Python processes and explain the leaks."""

__version__ = "0.1.0"
