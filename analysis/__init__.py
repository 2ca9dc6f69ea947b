"""cmtrace.analysis: the pandas layer over a recorded trace (see load())."""
